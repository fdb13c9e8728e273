#!/usr/bin/env bash
# Install OpenLDAP's slapd and the ldap-utils clients (ldapsearch) from Debian's packages for
# the real-software tier (realworld/ldap.py). Runs as root on Debian 12; the package's own
# system slapd is never started (policy-rc.d, as in install.sh): realworld/ldap.py runs a
# private one with its own slapd.conf on a loopback port. Idempotent.
set -euo pipefail

if [ -x /usr/sbin/slapd ] && [ -x /usr/sbin/slapadd ] && command -v ldapsearch >/dev/null 2>&1; then
    echo "realworld/install-ldap.sh: slapd and ldapsearch already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "realworld/install-ldap.sh: needs root to apt-get install slapd ldap-utils" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    made_policy=1
fi
trap 'if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends slapd ldap-utils >/dev/null
# Belt and braces: never leave a system slapd listening on 389.
if [ -f /run/slapd/slapd.pid ]; then
    kill "$(cat /run/slapd/slapd.pid)" 2>/dev/null || true
fi
echo "realworld/install-ldap.sh: $(/usr/sbin/slapd -VV 2>&1 | head -n1 | sed 's/^@(#) \$OpenLDAP: //; s/ (.*//') and ldapsearch ready"

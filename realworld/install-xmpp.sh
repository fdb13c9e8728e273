#!/usr/bin/env bash
# Install Prosody (XMPP server) from Debian's packages for the real-software tier
# (realworld/xmpp.py). Runs as root on Debian 12; the package's own system prosody is never
# started (policy-rc.d, as in install.sh): realworld/xmpp.py runs a private one with its own
# configuration on a loopback port, as the package's prosody user. lua-unbound is installed
# too: without it every prosody command prints a warning (no DNS is used: no s2s). Idempotent.
set -euo pipefail

if [ -x /usr/bin/prosody ] && [ -x /usr/bin/prosodyctl ] && dpkg -s lua-unbound >/dev/null 2>&1; then
    echo "realworld/install-xmpp.sh: prosody already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "realworld/install-xmpp.sh: needs root to apt-get install prosody" >&2
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
apt-get install -y -qq --no-install-recommends prosody lua-unbound >/dev/null
# Belt and braces: never leave a system prosody listening on 5222.
if [ -f /run/prosody/prosody.pid ]; then
    kill "$(cat /run/prosody/prosody.pid)" 2>/dev/null || true
fi
echo "realworld/install-xmpp.sh: prosody $(dpkg-query -W -f '${Version}' prosody) ready"

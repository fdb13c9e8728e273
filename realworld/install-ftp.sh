#!/usr/bin/env bash
# Install the real FTP servers of realworld/ftpservers.py: ProFTPD with mod_tls from Debian's
# packages, and Pure-FTPd and vsftpd unpacked (not installed) into /opt/starttls-ftpservers,
# because the three Debian packages all provide ftp-server and conflict with each other.
# Runs as root on Debian 12; the packages' own system services are never started
# (policy-rc.d, as in install.sh). Idempotent.
set -euo pipefail

unpacked=/opt/starttls-ftpservers
if [ "$(id -u)" -ne 0 ]; then
    echo "realworld/install-ftp.sh: needs root" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive

if [ ! -x /usr/sbin/proftpd ] || [ ! -e /usr/lib/proftpd/mod_tls.so ]; then
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        made_policy=1
    fi
    trap 'if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
    echo "proftpd-core shared/proftpd/inetd_or_standalone select standalone" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends proftpd-core proftpd-mod-crypto >/dev/null
fi

if [ ! -x "$unpacked/usr/sbin/pure-ftpd" ] || [ ! -x "$unpacked/usr/sbin/vsftpd" ]; then
    work=$(mktemp -d)
    chmod 0755 "$work"  # apt's download user writes here
    (cd "$work" && apt-get download pure-ftpd pure-ftpd-common vsftpd >/dev/null)
    for deb in "$work"/*.deb; do dpkg -x "$deb" "$unpacked"; done
    rm -rf "$work"
fi
echo "realworld/install-ftp.sh: proftpd, $unpacked/usr/sbin/pure-ftpd and vsftpd ready"

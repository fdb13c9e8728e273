#!/usr/bin/env bash
# Install Postfix and Dovecot (IMAP, POP3, ManageSieve) from Debian's packages for the real-server tier,
# and the real clients of the client tier: curl, msmtp, fetchmail, and Node.js with npm (the
# npm clients themselves, imapflow and nodemailer, are installed by
# realworld/clients.py into a cache folder with npm install --prefix).
#
# Idempotent: does nothing when every binary is already there. Runs as root on
# Debian 12 (CI's kind of machine). Only the packages are wanted: the system
# instances their postinst may start are stopped again, because run.py starts
# private instances on high loopback ports with their own configuration.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

# binary -> Debian package
packages=()
have postfix || packages+=(postfix)
have dovecot || packages+=(dovecot-imapd)
# Dovecot's POP3 and ManageSieve services are daemons of the same master.
[ -x /usr/lib/dovecot/pop3 ] || packages+=(dovecot-pop3d)
[ -x /usr/lib/dovecot/managesieve ] || packages+=(dovecot-managesieved)
have curl || packages+=(curl)
have msmtp || packages+=(msmtp)
have fetchmail || packages+=(fetchmail)
have node || packages+=(nodejs)
have npm || packages+=(npm)

if [ "${#packages[@]}" -eq 0 ]; then
    echo "realworld/install.sh: postfix, dovecot (imap, pop3, managesieve), curl, msmtp, fetchmail, node and npm already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "realworld/install.sh: needs root to apt-get install ${packages[*]}" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
# Postfix asks what kind of mail system this is; "No configuration" writes no
# main.cf of its own and so configures nothing that could relay.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo "postfix postfix/mailname string localhost" | debconf-set-selections

# Keep the packages' maintainer scripts from starting the system services: a
# policy-rc.d that answers 101 ("action forbidden") is Debian's own way to say so.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

# Belt and braces: if a system instance was started anyway (no policy-rc.d
# honoured, or one existed before us), stop it; never leave port 25/143 open.
if [ -x /usr/sbin/postfix ] && /usr/sbin/postfix status >/dev/null 2>&1; then
    /usr/sbin/postfix stop >/dev/null 2>&1 || true
fi
if [ -f /run/dovecot/master.pid ]; then
    kill "$(cat /run/dovecot/master.pid)" 2>/dev/null || true
fi

for binary in postfix dovecot curl msmtp fetchmail node npm; do
    if ! have "$binary"; then
        echo "realworld/install.sh: $binary missing after apt-get install ${packages[*]}" >&2
        exit 1
    fi
done
for daemon in pop3 managesieve; do
    if [ ! -x "/usr/lib/dovecot/$daemon" ]; then
        echo "realworld/install.sh: dovecot's $daemon missing after apt-get install ${packages[*]}" >&2
        exit 1
    fi
done
# The FTP servers of realworld/ftpservers.py (their own script: the packages conflict).
bash "$(dirname "${BASH_SOURCE[0]}")/install-ftp.sh"
echo "realworld/install.sh: installed ${packages[*]}: $(/usr/sbin/postconf -d -h mail_version 2>/dev/null | sed 's/^/postfix /'), dovecot $(/usr/sbin/dovecot --version 2>/dev/null), $(curl --version | head -n1 | cut -d' ' -f1-2), $(msmtp --version | head -n1), node $(node --version)"

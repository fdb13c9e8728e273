#!/usr/bin/env bash
# Install Postfix, Dovecot (IMAP, POP3, ManageSieve, LMTP) and INN (nnrpd) from Debian's packages
# for the real-server tier, and the real clients of the client tier: curl, msmtp, fetchmail,
# sieve-connect, and Node.js with npm (the
# npm clients themselves, imapflow and nodemailer, are installed by
# realworld/clients.py into a cache folder with npm install --prefix).
#
# Idempotent: does nothing when every binary is already there. Runs as root on
# Debian 12 (CI's kind of machine). Only the packages are wanted: the system
# instances their postinst may start are stopped again, because run.py starts
# private instances on high loopback ports with their own configuration.
set -euo pipefail

# OpenLDAP slapd and ldapsearch (realworld/ldap.py) have their own script.
bash "$(dirname "$0")/install-ldap.sh"
# PostgreSQL 15 (realworld/postgres.py) has a script of its own.
bash "$(dirname "${BASH_SOURCE[0]}")/install-postgres.sh"
# Prosody (realworld/xmpp.py) has a script of its own.
bash "$(dirname "${BASH_SOURCE[0]}")/install-xmpp.sh"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

# binary -> Debian package
packages=()
have postfix || packages+=(postfix)
have dovecot || packages+=(dovecot-imapd)
# Dovecot's POP3 and ManageSieve services are daemons of the same master.
[ -x /usr/lib/dovecot/pop3 ] || packages+=(dovecot-pop3d)
[ -x /usr/lib/dovecot/managesieve ] || packages+=(dovecot-managesieved)
[ -x /usr/lib/dovecot/lmtp ] || packages+=(dovecot-lmtpd)
have sieve-connect || packages+=(sieve-connect)
have curl || packages+=(curl)
have msmtp || packages+=(msmtp)
have fetchmail || packages+=(fetchmail)
have node || packages+=(nodejs)
have npm || packages+=(npm)
# inn2 is installed on its own below (its postinst needs help on a bare host).
need_inn=0
[ -x /usr/lib/news/bin/nnrpd ] || need_inn=1

if [ "${#packages[@]}" -eq 0 ] && [ "$need_inn" = 0 ]; then
    echo "realworld/install.sh: postfix, dovecot (imap, pop3, managesieve, lmtp), inn2, curl, msmtp, fetchmail, sieve-connect, node and npm already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "realworld/install.sh: needs root to apt-get install ${packages[*]} (inn2: $need_inn)" >&2
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
if [ "${#packages[@]}" -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
if [ "$need_inn" = 1 ]; then
    # inn2's postinst (a) adds an alias for "usenet" and runs newaliases, which fails without
    # a Postfix main.cf ("No configuration" above): the alias is added first, so it skips
    # that; (b) refuses a host name without a domain ("innconfval: hostname does not
    # resolve"): when it fails, inn.conf gets a domain and the package is configured again.
    if [ -f /etc/aliases ] && ! grep -q '^usenet:' /etc/aliases; then
        echo "usenet: root" >>/etc/aliases
    fi
    if ! apt-get install -y -qq --no-install-recommends inn2 >/dev/null 2>&1; then
        if grep -q '^#domain:' /etc/news/inn.conf; then
            sed -i 's/^#domain:.*/domain: localdomain/' /etc/news/inn.conf
        fi
        dpkg --configure -a >/dev/null
    fi
    packages+=(inn2)
fi

# Belt and braces: if a system instance was started anyway (no policy-rc.d
# honoured, or one existed before us), stop it; never leave port 25/143 open.
if [ -x /usr/sbin/postfix ] && /usr/sbin/postfix status >/dev/null 2>&1; then
    /usr/sbin/postfix stop >/dev/null 2>&1 || true
fi
if [ -f /run/dovecot/master.pid ]; then
    kill "$(cat /run/dovecot/master.pid)" 2>/dev/null || true
fi
if [ -f /run/news/innd.pid ]; then
    kill "$(cat /run/news/innd.pid)" 2>/dev/null || true
fi

for binary in postfix dovecot curl msmtp fetchmail sieve-connect node npm /usr/lib/news/bin/nnrpd; do
    if ! have "$binary"; then
        echo "realworld/install.sh: $binary missing after apt-get install ${packages[*]}" >&2
        exit 1
    fi
done
for daemon in pop3 managesieve lmtp; do
    if [ ! -x "/usr/lib/dovecot/$daemon" ]; then
        echo "realworld/install.sh: dovecot's $daemon missing after apt-get install ${packages[*]}" >&2
        exit 1
    fi
done
# The FTP servers of realworld/ftpservers.py (their own script: the packages conflict).
bash "$(dirname "${BASH_SOURCE[0]}")/install-ftp.sh"
echo "realworld/install.sh: installed ${packages[*]}: $(/usr/sbin/postconf -d -h mail_version 2>/dev/null | sed 's/^/postfix /'), dovecot $(/usr/sbin/dovecot --version 2>/dev/null), $(curl --version | head -n1 | cut -d' ' -f1-2), $(msmtp --version | head -n1), node $(node --version)"

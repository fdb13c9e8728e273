#!/bin/sh
# Fetch the INBOX with fetchmail over IMAP (or POP3), STARTTLS/STLS required (sslproto tls1.2+).
#
# Usage: sh fetchmail_fetch.sh HOST PORT CAFILE [IMAP|POP3]
#
# Certificate checking is ON (sslcertck): fetchmail matches the subject CN and
# DNS names only, so HOST is the certificate's name ({hostname}, localhost),
# which the harness's server certificate carries as CN and DNS SAN. Exit 1 is
# fetchmail's "no mail to retrieve", a success
# here (the fake server's INBOX is empty); every other status is kept.
set -u
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
umask 077
cat >"$dir/rc" <<RC
poll $1 port $2 protocol ${4:-IMAP} timeout 10
  user tester password secret
  sslproto "tls1.2+" sslcertck sslcertfile "$3"
  mda "cat >/dev/null" keep
RC
FETCHMAILHOME=$dir fetchmail -f "$dir/rc" --pidfile "$dir/pid" --nodetach --nosyslog "$1"
status=$?
if [ "$status" -eq 1 ]; then
    exit 0
fi
exit "$status"

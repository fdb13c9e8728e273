#!/bin/sh
# Fetch the INBOX with fetchmail over IMAP, STARTTLS required (sslproto tls1.2+).
#
# Usage: sh fetchmail_fetch.sh HOST PORT CAFILE
#
# Certificate checking is OFF (no sslcertck), the one client of the tier run so:
# fetchmail 6.4 checks the certificate's subject CN and DNS names only, and the
# harness's throwaway server certificate has no CN and is checked here by IP
# ('Server name not specified in certificate!' even with sslcommonname
# localhost). The trust control in realworld/clients.py records that it
# connects regardless. Exit 1 is fetchmail's "no mail to retrieve", a success
# here (the fake server's INBOX is empty); every other status is kept.
set -u
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
umask 077
cat >"$dir/rc" <<RC
poll $1 port $2 protocol IMAP timeout 10
  user tester password secret
  sslproto "tls1.2+" no sslcertck sslcertfile "$3"
  mda "cat >/dev/null" keep
RC
FETCHMAILHOME=$dir fetchmail -f "$dir/rc" --pidfile "$dir/pid" --nodetach --nosyslog "$1"
status=$?
if [ "$status" -eq 1 ]; then
    exit 0
fi
exit "$status"

#!/bin/sh
# Upload one Sieve script with sieve-connect (Debian), STARTTLS required, certificate checked.
#
# Usage: sh sieve_connect_upload.sh HOST PORT CAFILE
#
# --noclearchan: no fallback to a plaintext session when STARTTLS is missing or fails;
# --tlscafile: trust only the run's CA (the hostname is checked too: the certificate
# carries the loopback IP as a SAN); --nosrv: no DNS look-up; the password comes on fd 3
# (sieve-connect reads no password from its arguments or environment).
set -u
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
printf 'keep;\n' >"$dir/harness.sieve"
sieve-connect --nosrv --server "$1" --port "$2" --user tester --passwordfd 3 \
    --tlscafile "$3" --noclearchan \
    --upload --localsieve "$dir/harness.sieve" --remotesieve harness 3<<EOF
secret
EOF

#!/bin/sh
# Upload one Sieve script with sieve-connect (Debian), STARTTLS required, certificate checked.
#
# Usage: sh sieve_connect_upload.sh HOST PORT CAFILE [TLS_VERSION [USER PASSWORD]]
#
# --noclearchan: no fallback to a plaintext session when STARTTLS is missing or fails;
# --tlscafile: trust only the run's CA (the hostname is checked too: the certificate
# carries the loopback IP as a SAN); --nosrv: no DNS look-up; the password comes on fd 3
# (sieve-connect reads no password from its arguments or environment).  sieve-connect
# has no option for the TLS version: TLS_VERSION (1.2 or 1.3) pins it through an
# OpenSSL configuration of this run only (the path tier, where a real server answers).
set -u
umask 077
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
printf 'keep;\n' >"$dir/harness.sieve"
if [ -n "${4:-}" ]; then
    printf '%s\n' "openssl_conf = harness_conf" "[harness_conf]" "ssl_conf = harness_ssl" \
        "[harness_ssl]" "system_default = harness_pin" "[harness_pin]" \
        "MinProtocol = TLSv$4" "MaxProtocol = TLSv$4" >"$dir/openssl.cnf"
    OPENSSL_CONF="$dir/openssl.cnf"
    export OPENSSL_CONF
fi
printf '%s\n' "${6:-secret}" >"$dir/password"
sieve-connect --nosrv --server "$1" --port "$2" --user "${5:-tester}" --passwordfd 3 \
    --tlscafile "$3" --noclearchan \
    --upload --localsieve "$dir/harness.sieve" --remotesieve harness 3<"$dir/password"

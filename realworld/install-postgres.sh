#!/usr/bin/env bash
# Install PostgreSQL 15 and its client (psql, libpq) from Debian's packages for the real-server
# and real-client tiers (realworld/postgres.py). Only the binaries are wanted: the cluster the
# package's postinst creates is never started (policy-rc.d, as in install.sh), and run.py makes
# its own data directory with initdb and starts it with pg_ctl on a loopback port.
# Idempotent; runs as root on Debian 12.
set -euo pipefail

if [ -x /usr/lib/postgresql/15/bin/pg_ctl ] && command -v psql >/dev/null 2>&1; then
    echo "realworld/install-postgres.sh: postgresql-15 and psql already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "realworld/install-postgres.sh: needs root to apt-get install postgresql-15" >&2
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
apt-get install -y -qq --no-install-recommends postgresql-15 postgresql-client-15 >/dev/null
# Belt and braces: a system cluster started anyway is stopped again.
if command -v pg_ctlcluster >/dev/null 2>&1 && pg_lsclusters -h 2>/dev/null | grep -q online; then
    pg_lsclusters -h | awk '$4 == "online" {print $1, $2}' | while read -r version name; do
        pg_ctlcluster "$version" "$name" stop || true
    done
fi
if [ ! -x /usr/lib/postgresql/15/bin/pg_ctl ]; then
    echo "realworld/install-postgres.sh: pg_ctl missing after apt-get install postgresql-15" >&2
    exit 1
fi
echo "realworld/install-postgres.sh: installed $(/usr/lib/postgresql/15/bin/postgres --version), $(psql --version)"

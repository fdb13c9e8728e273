#!/usr/bin/env bash
# Tools the test suite uses beyond Python packages: tshark (Debian), which
# tests/test_capture.py uses to open the pcapng captures the harness writes.
# Idempotent: does nothing when tshark is already installed.  CI runs as root.
set -euo pipefail
if command -v tshark >/dev/null 2>&1; then
    exit 0
fi
# wireshark-common asks whether non-root users may capture; the tests only
# read files, so the answer is no.
echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
if ! apt-cache show tshark >/dev/null 2>&1; then
    apt-get update -q
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tshark

#!/bin/sh
# Install Debian's chromium for the status page's browser test, when missing.
# Exits 0 when a chromium is available afterwards; 1 (with a reason) otherwise.
set -eu
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "chromium is missing and installing it needs root: sudo apt install chromium" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is missing and there is no apt-get to install it" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends chromium >&2
command -v chromium >/dev/null 2>&1

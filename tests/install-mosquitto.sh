#!/bin/sh
# Install Debian's mosquitto (broker and mosquitto_passwd) for the MQTT tests, when missing.
# Exits 0 when a mosquitto is available afterwards; 1 (with a reason) otherwise.
set -eu
PATH="$PATH:/usr/sbin"
command -v mosquitto >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "mosquitto is missing and installing it needs root: sudo apt install mosquitto" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "mosquitto is missing and there is no apt-get to install it" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends mosquitto >&2
# Tests start their own broker; the packaged service is not needed.
systemctl disable --now mosquitto >/dev/null 2>&1 || true
command -v mosquitto >/dev/null 2>&1

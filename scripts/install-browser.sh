#!/usr/bin/env bash
# Install a headless browser for the page's browser test (tests/system/test_page.py): Debian's
# chromium and chromium-driver, used through Selenium (a pip package in the test extras).
#
#   scripts/install-browser.sh        # as root (CI on a fresh Debian 12)
#
# Idempotent and fast when done: apt runs only when /usr/bin/chromium or /usr/bin/chromedriver
# is missing. Nothing is downloaded but Debian's packages: Selenium's own driver manager is
# never used (the test names both binaries).
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

if [ ! -x "$CHROMIUM" ] || [ ! -x "$CHROMEDRIVER" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: chromium or chromium-driver is missing and installing them needs root" >&2
        exit 1
    fi
    echo "Installing chromium and chromium-driver (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    for f in "$CHROMIUM" "$CHROMEDRIVER"; do
        if [ ! -x "$f" ]; then
            echo "error: no $f after installing chromium and chromium-driver" >&2
            exit 1
        fi
    done
fi

echo "Browser ready: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"), $CHROMEDRIVER"

#!/usr/bin/env bash
# Debian's nginx, for the mutual-TLS tests (devstack/nginx.py runs it in the foreground on
# 127.0.0.1 with a configuration of the test's own, in front of the real Cartd and Policy).
# Idempotent: nothing happens when nginx is installed.
set -euo pipefail
if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
    echo "nginx already installed"
    exit 0
fi
apt-get update -qq
# The package's own site (port 80) is never started here: the tests run nginx with -c.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx

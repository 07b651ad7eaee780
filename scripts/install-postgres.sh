#!/usr/bin/env bash
# Install a PostgreSQL server for the integration tests (devstack/postgres.py runs its
# own throw-away cluster on 127.0.0.1; nothing here configures or starts a server).
#
#   scripts/install-postgres.sh        # as root (CI on a fresh Debian 12)
#
# Idempotent and fast when done: it only checks for an initdb under
# /usr/lib/postgresql/*/bin and for the unprivileged user the test server runs as
# (PostgreSQL refuses to run as root). Debian's package may create and start its own
# cluster on port 5432; the tests neither use nor touch it.
set -euo pipefail

PG_USER="${POSTGRES_TEST_USER:-downloader-pg}"

have_initdb() {
    local f
    for f in /usr/lib/postgresql/*/bin/initdb; do
        [ -x "$f" ] && return 0
    done
    return 1
}

if ! have_initdb; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: PostgreSQL is not installed and installing it needs root" >&2
        exit 1
    fi
    echo "Installing PostgreSQL (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
    if ! have_initdb; then
        echo "error: no initdb under /usr/lib/postgresql/*/bin after installing postgresql" >&2
        exit 1
    fi
fi

if ! id -u "$PG_USER" >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: user $PG_USER is missing and creating it needs root" >&2
        exit 1
    fi
    echo "Creating system user $PG_USER"
    useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
fi

echo "PostgreSQL ready: $(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1), user $PG_USER"

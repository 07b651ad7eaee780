#!/usr/bin/env bash
# Install the real Pacifica Cartd + Archive Interface + Notifications into a separate
# virtualenv, for the integration tests (devstack/pacifica.py and
# devstack/notifications.py start them on 127.0.0.1).
#
#   scripts/install-pacifica-stack.sh            # venv at $PACIFICA_VENV or <repo>/.venv-pacifica
#   PACIFICA_VENV=/some/dir scripts/install-pacifica-stack.sh
#
# Idempotent: a second run only checks a stamp file and the imports (well under a second).
# No system server is needed: Celery uses kombu's filesystem transport (a directory as the
# broker), which the test module configures; the result backend is in-process memory
# (every Cartd task is ignore_result=True). Only Python 3.11 + pip are required.
# Notifications needs a PostgreSQL server at test time (its dbsync fails on SQLite):
# scripts/install-postgres.sh installs one; psycopg2-binary here is its driver.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PACIFICA_VENV:-$REPO_ROOT/.venv-pacifica}"
PYTHON="${PYTHON:-python3}"

# Exact versions verified together on Python 3.11 (Debian 12).
PACKAGES=(
    "pacifica-cartd==0.7.0"
    "pacifica-archiveinterface==0.4.2"
    "pacifica-notifications==0.5.2"
    "jsonpath2==0.4.5"
    "antlr4-python3-runtime==4.10"
    "psycopg2-binary==2.9.13"
    "celery==5.7.0"
    "kombu==5.7.0"
    "billiard==4.3.2"
    "vine==5.1.0"
    "peewee==4.5.3"
    "CherryPy==18.10.0"
    "cheroot==11.1.2"
    "requests==2.34.2"
    "jsonschema==4.26.0"
    "psutil==7.2.2"
    "PyYAML==6.0.4"
)
EXECUTABLES="pacifica-cartd pacifica-cartd-cmd pacifica-archiveinterface pacifica-notifications pacifica-notifications-cmd celery"
STAMP="$VENV/.pacifica-stack-installed"
WANT="${PACKAGES[*]}"

check_installed() {
    [ -x "$VENV/bin/python" ] || return 1
    [ -f "$STAMP" ] || return 1
    [ "$(cat "$STAMP")" = "$WANT" ] || return 1
    for exe in $EXECUTABLES; do
        [ -x "$VENV/bin/$exe" ] || return 1
    done
    "$VENV/bin/python" -c 'import pacifica.archiveinterface, pacifica.cartd, pacifica.notifications, jsonpath2, psycopg2, kombu.transport.filesystem, celery, peewee, cherrypy' \
        >/dev/null 2>&1 || return 1
}

if check_installed; then
    echo "Pacifica stack already installed in $VENV"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
# Fail here rather than in the tests if the entry points are not there.
for exe in $EXECUTABLES; do
    if [ ! -x "$VENV/bin/$exe" ]; then
        echo "error: $VENV/bin/$exe missing after install" >&2
        exit 1
    fi
done
printf '%s' "$WANT" > "$STAMP"
echo "Pacifica stack installed in $VENV"

#!/usr/bin/env bash
# The environment upstream's own tests run in against the drop-in (tests/integration/test_upstream.py):
#   - the sdists of pacifica-downloader 0.4.1 and pacifica-dispatcher 0.2.5 (their tests),
#     downloaded once into $PACIFICA_UPSTREAM_CACHE (~/.cache/pacifica-downloader/upstream);
#   - .venv-upstream: pacifica-dispatcher 0.2.5 with its dependencies (cloudevents-python,
#     pacifica-uploader, celery, peewee, ...) and this project installed as a site installs it:
#     pacifica-downloader-service and the drop-in distribution pacifica-downloader (./dropin),
#     built, not editable -- so pacifica-dispatcher's requirement on pacifica-downloader is met
#     by the drop-in and upstream's is never installed.
# Idempotent: the dependencies are installed once (a stamp), this project again whenever its
# sources change (a hash of them). Usage: bash scripts/install-upstream.sh
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UPSTREAM_VENV:-$REPO_ROOT/.venv-upstream}"
CACHE="${PACIFICA_UPSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pacifica-downloader/upstream}"
PYTHON="${PYTHON:-python3}"
PIP=(-m pip install --quiet --disable-pip-version-check)

SDISTS=("pacifica-downloader==0.4.1" "pacifica-dispatcher==0.2.5")
# pkg_resources (gone from setuptools 81) is imported by the pacifica/__init__.py that
# pacifica-dispatcher, pacifica-namespace and pacifica-uploader install.
DEPS=("setuptools<81" "pytest==9.2.0")
DEPS_STAMP="$VENV/.upstream-deps"
SOURCE_STAMP="$VENV/.upstream-source"

mkdir -p "$CACHE"
for spec in "${SDISTS[@]}"; do
    file="$CACHE/${spec/==/-}.tar.gz"
    if [ ! -s "$file" ]; then
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
            "$spec" -d "$CACHE"
    fi
    [ -s "$file" ] || { echo "error: $file missing after pip download" >&2; exit 1; }
done

source_hash() {
    # Every file that goes into the two distributions, by content.
    (cd "$REPO_ROOT" && find setup.py pyproject.toml README.md downloader_service dropin \
        -type f \( -name '*.py' -o -name '*.toml' -o -name '*.md' -o -name '*.mako' -o -name '*.js' \
        -o -name '*.css' -o -name py.typed \) -not -path '*/build/*' -not -path '*.egg-info/*' \
        -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
WANT="${DEPS[*]} $(cd "$CACHE" && sha256sum pacifica-dispatcher-0.2.5.tar.gz | cut -d' ' -f1)"
if [ "$(cat "$DEPS_STAMP" 2>/dev/null)" != "$WANT" ]; then
    # One resolution: the local ./dropin is the pacifica-downloader pacifica-dispatcher requires.
    "$VENV/bin/python" "${PIP[@]}" "${DEPS[@]}" "$REPO_ROOT" "$REPO_ROOT/dropin" \
        "$CACHE/pacifica-dispatcher-0.2.5.tar.gz"
    printf '%s' "$WANT" > "$DEPS_STAMP"
    rm -f "$SOURCE_STAMP"
fi
HASH="$(source_hash)"
if [ "$(cat "$SOURCE_STAMP" 2>/dev/null)" != "$HASH" ]; then
    # setuptools reuses build/lib: a module removed from the sources would stay in the wheel.
    rm -rf "$REPO_ROOT/build" "$REPO_ROOT/dropin/build"
    "$VENV/bin/python" "${PIP[@]}" --no-deps --force-reinstall "$REPO_ROOT" "$REPO_ROOT/dropin"
    printf '%s' "$HASH" > "$SOURCE_STAMP"
fi
# The drop-in, not upstream's, must be what `import pacifica.downloader` finds.
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import pacifica.downloader
import pacifica.downloader.downloader as module

dist = md.distribution("pacifica-downloader")
assert any(str(req).startswith("pacifica-downloader-service") for req in dist.requires or []), dist.requires
assert issubclass(module.Downloader, __import__("downloader_service").Downloader), module.Downloader
EOF
echo "upstream test environment ready in $VENV"

# Sourced by scripts/test-container, scripts/compose-images and scripts/test-compose: makes
# rootful podman/buildah work on this kind of machine (no Docker engine, no registry) and
# builds the Debian base image every local image starts from. After it:
#   CONTAINERS_CONF, CONTAINERS_STORAGE_CONF  exported (our own config; /etc is not changed)
#   CONTAINER_DIR   config, logs and cache stamps;  BASE_TAG  the base image;  SUITE
#   say/skip/die/since, build_image            helpers (skip prints "SKIPPED: <reason>", exits 0)
# The caller has done `set -euo pipefail` and `cd` to the repository.
# shellcheck shell=bash

START=$EPOCHREALTIME
say() { printf '== %s\n' "$*"; }
skip() {
    printf 'SKIPPED: %s\n' "$*"
    exit 0
}
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

CALLER=${CALLER:-scripts/$(basename "$0")}
[ "$(id -u)" = 0 ] || skip "$CALLER needs root (it installs packages and runs rootful podman)"

CONTAINER_DIR=${CONTAINER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pacifica-downloader/container}
mkdir -p "$CONTAINER_DIR"
# One run at a time on a machine: they share the base image, the store and host ports 8080,
# 8081 and 8070. A script started by one that holds the lock (test-compose runs
# compose-images) inherits it.
if [ "${PODMAN_LOCK_HELD:-}" != "$CONTAINER_DIR" ]; then
    exec 9>"$CONTAINER_DIR/lock"
    flock -w 1800 9 || die "another container test holds $CONTAINER_DIR/lock"
    export PODMAN_LOCK_HELD=$CONTAINER_DIR
fi

# --------------------------------------------------------------------------- 1. tools
t0=$EPOCHREALTIME
# shellcheck source=/dev/null
SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
declare -A TOOL_PACKAGE=([podman]=podman [buildah]=buildah [runc]=runc [mmdebstrap]=mmdebstrap)
missing=()
for tool in "${!TOOL_PACKAGE[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${TOOL_PACKAGE[$tool]}")
done
# EXTRA_PACKAGES: Debian packages a caller needs besides these (e.g. CNI's dnsname plugin).
for package in ${EXTRA_PACKAGES:-}; do
    dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done

# Storage: the kernel's overlay when it can mount one where podman keeps its images (not on
# an overlay file system itself, as in many CI containers), else fuse-overlayfs, else vfs.
GRAPHROOT=/var/lib/containers/storage
overlay_works() {
    grep -qw overlay /proc/filesystems || return 1
    mkdir -p "$(dirname "$GRAPHROOT")"
    local probe rc=1
    probe=$(mktemp -d "$(dirname "$GRAPHROOT")/.overlay-probe.XXXXXX")
    mkdir "$probe/lower" "$probe/upper" "$probe/work" "$probe/merged"
    if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
        "$probe/merged" 2>/dev/null; then
        umount "$probe/merged" && rc=0
    fi
    rm -rf "$probe"
    return $rc
}
DRIVER=${CONTAINER_STORAGE_DRIVER:-}
if [ -z "$DRIVER" ]; then
    # A store that already exists keeps its driver (podman refuses to mix them).
    if [ -d "$GRAPHROOT/overlay-images" ] || [ -d "$GRAPHROOT/vfs-images" ]; then
        if [ -d "$GRAPHROOT/vfs-images" ] && [ ! -d "$GRAPHROOT/overlay-images" ]; then
            DRIVER=vfs
        elif overlay_works; then DRIVER=overlay; else DRIVER=fuse-overlayfs; fi
    elif overlay_works; then
        DRIVER=overlay
    elif [ -c /dev/fuse ]; then
        DRIVER=fuse-overlayfs
    else
        DRIVER=vfs
    fi
fi
if [ "$DRIVER" = fuse-overlayfs ] && ! command -v fuse-overlayfs >/dev/null 2>&1; then
    missing+=(fuse-overlayfs)
fi

if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || skip "podman/buildah missing and no apt-get to install them (${missing[*]})"
    say "installing ${missing[*]} (apt)"
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        </dev/null >"$CONTAINER_DIR/apt.log" 2>&1; then
        tail -n 20 "$CONTAINER_DIR/apt.log"
        skip "cannot install ${missing[*]} with apt (log: $CONTAINER_DIR/apt.log)"
    fi
fi
[ -n "$SUITE" ] || skip "no VERSION_CODENAME in /etc/os-release: mmdebstrap needs a Debian host"
INSTALL_SECONDS=$(since "$t0")

# ---------------------------------------------------------------------- 2. podman config
# crun fails on this kind of cgroup setup (cgroup v1, nested): runc with cgroupfs works.
# The default ulimits (nofile 1048576) are above this host's hard limits: cap them.
limit() { # limit <ulimit flag> <cap>
    local hard
    hard=$(ulimit -H "$1")
    if [ "$hard" = unlimited ] || [ "$hard" -gt "$2" ]; then echo "$2"; else echo "$hard"; fi
}
NOFILE=$(limit -n 20000)
NPROC=$(limit -u 32768)
export CONTAINERS_CONF="$CONTAINER_DIR/containers.conf"
export CONTAINERS_STORAGE_CONF="$CONTAINER_DIR/storage.conf"
cat >"$CONTAINERS_CONF.tmp" <<EOF
# Written by scripts/test-container (used through CONTAINERS_CONF).
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
{
    echo "# Written by scripts/test-container (used through CONTAINERS_STORAGE_CONF)."
    echo "[storage]"
    echo "driver = \"${DRIVER/fuse-overlayfs/overlay}\""
    echo "runroot = \"/run/containers/storage\""
    echo "graphroot = \"$GRAPHROOT\""
    if [ "$DRIVER" = fuse-overlayfs ]; then
        echo "[storage.options.overlay]"
        echo "mount_program = \"$(command -v fuse-overlayfs)\""
    fi
} >"$CONTAINERS_STORAGE_CONF.tmp"
mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
mv "$CONTAINERS_STORAGE_CONF.tmp" "$CONTAINERS_STORAGE_CONF"
if ! podman info >"$CONTAINER_DIR/podman-info.log" 2>&1 </dev/null; then
    tail -n 5 "$CONTAINER_DIR/podman-info.log"
    skip "podman does not work here (podman info failed; log: $CONTAINER_DIR/podman-info.log)"
fi
echo "podman $(podman version --format '{{.Client.Version}}'), buildah $(buildah --version | awk '{print $3}'), storage $DRIVER, runtime runc, ulimits nofile=$NOFILE nproc=$NPROC"

# ------------------------------------------------------------------------ 3. base image
BASE_TAG=${BASE_TAG:-localhost/downloader-base:$SUITE}
IMAGE_TAG=${IMAGE_TAG:-localhost/pacifica-downloader:test}
BASE_LABEL=org.pacifica.downloader.base-inputs
# This machine's apt sources (its mirror or proxy), and the apt settings that change how
# packages are fetched; its own CA certificates (a proxy's CA) become trusted in the image.
if [ -z "${BASE_APT_SOURCES:-}" ]; then
    BASE_APT_SOURCES=""
    if grep -qsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list; then BASE_APT_SOURCES=/etc/apt/sources.list; fi
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && BASE_APT_SOURCES="$BASE_APT_SOURCES $f"
    done
fi
[ -n "${BASE_APT_SOURCES// /}" ] || die "no apt sources found for the base image (set BASE_APT_SOURCES)"
mapfile -t APT_OPTS < <(apt-config dump | grep -E '^Acquire::(https?::Proxy|Check-Valid-Until|Check-Date) ' || true)
mapfile -t CA_FILES < <(find /usr/local/share/ca-certificates -type f -name '*.crt' 2>/dev/null | sort)
# shellcheck disable=SC2016,SC2054 # the hooks' $1 is mmdebstrap's; commas are package lists
MMDEBSTRAP_ARGS=(
    --variant=minbase
    --include=python3,python3-pip,ca-certificates
    # Documentation, man pages and translations are not needed in a service image.
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --customize-hook='mkdir -p "$1/usr/local/share/ca-certificates" && if [ -d /usr/local/share/ca-certificates ]; then cp -a /usr/local/share/ca-certificates/. "$1/usr/local/share/ca-certificates/"; fi'
    --customize-hook='chroot "$1" update-ca-certificates --fresh >/dev/null'
    # pip installs into the system python, as in the python:3.11-slim image.
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED'
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log'
)
for opt in "${APT_OPTS[@]}"; do MMDEBSTRAP_ARGS+=("--aptopt=${opt%;}"); done
IMPORT_CHANGES=('ENV LANG=C.UTF-8' 'CMD ["python3"]')
# shellcheck disable=SC2086 # BASE_APT_SOURCES is a list of paths
BASE_INPUTS=$(
    {
        printf 'recipe 1\n%s\n' "$SUITE" "${MMDEBSTRAP_ARGS[@]}" "${IMPORT_CHANGES[@]}"
        for f in $BASE_APT_SOURCES; do printf '== %s\n' "$f" && cat "$f"; done
        for f in "${CA_FILES[@]}"; do printf '== %s\n' "$f" && cat "$f"; done
    } | sha256sum | cut -c1-64
)
t0=$EPOCHREALTIME
if [ "$(podman image inspect --format "{{index .Labels \"$BASE_LABEL\"}}" "$BASE_TAG" 2>/dev/null)" = "$BASE_INPUTS" ]; then
    BASE_STATE="cached"
    say "base image $BASE_TAG: cached (inputs ${BASE_INPUTS:0:12})"
else
    BASE_STATE="built"
    say "base image $BASE_TAG: building with mmdebstrap ($SUITE, minbase + python3 python3-pip ca-certificates)"
    old_base=$(podman image inspect --format '{{.Id}}' "$BASE_TAG" 2>/dev/null || true)
    tarball="$CONTAINER_DIR/base-rootfs.tar"
    rm -f "$tarball"
    # shellcheck disable=SC2086
    if ! mmdebstrap "${MMDEBSTRAP_ARGS[@]}" "$SUITE" "$tarball" $BASE_APT_SOURCES \
        </dev/null >"$CONTAINER_DIR/mmdebstrap.log" 2>&1; then
        tail -n 30 "$CONTAINER_DIR/mmdebstrap.log"
        rm -f "$tarball"
        die "mmdebstrap failed (log: $CONTAINER_DIR/mmdebstrap.log)"
    fi
    changes=(--change "LABEL $BASE_LABEL=$BASE_INPUTS")
    for change in "${IMPORT_CHANGES[@]}"; do changes+=(--change "$change"); done
    podman import --quiet "${changes[@]}" --message "mmdebstrap $SUITE minbase + python3 (scripts/test-container)" \
        "$tarball" "$BASE_TAG" </dev/null >/dev/null
    rm -f "$tarball"
    new_base=$(podman image inspect --format '{{.Id}}' "$BASE_TAG")
    if [ -n "$old_base" ] && [ "$old_base" != "$new_base" ]; then
        podman rmi "$old_base" >/dev/null 2>&1 || true # still used by an older image: keep it
    fi
fi
BASE_SECONDS=$(since "$t0")
echo "base image $BASE_STATE in ${BASE_SECONDS} s"

# Can podman run a container at all here? (Not: can our image do its job; that is step 5.)
if ! podman run --rm --network none --entrypoint /bin/true "$BASE_TAG" >"$CONTAINER_DIR/probe.log" 2>&1 </dev/null; then
    tail -n 5 "$CONTAINER_DIR/probe.log"
    skip "podman cannot run containers here (log: $CONTAINER_DIR/probe.log)"
fi

# build_image TAG CONTEXT LOG [buildah bud arguments...]: build on the base image with
# buildah (chroot isolation, no pulls, docker format so a HEALTHCHECK is kept, cached
# layers so an unchanged recipe rebuilds in seconds); prints one line with time and size.
build_image() {
    local tag=$1 context=$2 log=$3 t0 cached total bytes
    shift 3
    t0=$EPOCHREALTIME
    if ! buildah bud --isolation chroot --pull=never --format docker --layers \
        --build-arg "BASE_IMAGE=$BASE_TAG" -t "$tag" "$@" "$context" </dev/null >"$log" 2>&1; then
        tail -n 40 "$log"
        die "buildah bud failed for $tag (log: $log)"
    fi
    BUILD_SECONDS=$(since "$t0")
    cached=$(grep -c '^--> Using cache' "$log" || true)
    total=$(grep -cE '^(\[[0-9]+/[0-9]+\] )?STEP [0-9]' "$log" || true)
    bytes=$(podman image inspect --format '{{.Size}}' "$tag")
    IMAGE_BYTES=$bytes
    echo "built $tag in ${BUILD_SECONDS} s (${cached}/${total} steps from cache); size $((bytes / 1000000)) MB"
}

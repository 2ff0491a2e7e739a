# shellcheck shell=bash
# Shared by build-image.sh and ensure-image.sh: logging, the recipe hash and
# the cache layout. Sourced, never executed.
#
# Cache layout:  ${LXDSPAWNER_CACHE:-/var/cache/lxdspawner}/images/<name>-<hash>/
#   meta.tar.xz       LXD/Incus image metadata (metadata.yaml + templates/)
#   rootfs.squashfs   the root filesystem
#   fingerprint       sha256(meta.tar.xz || rootfs.squashfs): the daemon's fingerprint
#   info              what went into the hash, sizes, build time
#   *.txt             manifests written by the recipe (packages, pip freeze)
# A directory of that name only ever exists complete: builds happen in a
# temporary directory next to it and are renamed into place at the end.

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE_CACHE="${LXDSPAWNER_CACHE:-/var/cache/lxdspawner}/images"
IMAGE_NAMES="jupyter-base lxdspawner-tiny"
# The busybox binary that lxdspawner-tiny is made of (package busybox-static).
BUSYBOX="${BUSYBOX:-/bin/busybox}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

# Child scripts (the recipe's) continue the parent's clock.
_LOG_T0=${LXDSPAWNER_LOG_T0:-${EPOCHREALTIME/./}}
export LXDSPAWNER_LOG_T0=$_LOG_T0
LOG_TAG=${LOG_TAG:-image}

# log MESSAGE...: "[tag +12.3s] message" on stderr (stdout is kept for results).
log() {
    local now=${EPOCHREALTIME/./} ds
    ds=$(( (now - _LOG_T0) / 100000 ))
    printf '[%s +%d.%ds] %s\n' "$LOG_TAG" "$((ds / 10))" "$((ds % 10))" "$*" >&2
}

die() {
    log "ERROR: $*"
    exit 1
}

check_image_name() {
    case " $IMAGE_NAMES " in
        *" $1 "*) ;;
        *) die "unknown image '$1' (known: $IMAGE_NAMES)" ;;
    esac
}

# jupyterhub_series: prints X.Y of the hub's JupyterHub (JUPYTERHUB_VERSION, or
# the version installed in ${VENV:-<repo>/.venv}).
jupyterhub_series() {
    local v=${JUPYTERHUB_VERSION:-} py
    if [ -z "$v" ]; then
        py="${VENV:-$IMAGES_DIR/../.venv}/bin/python"
        if [ ! -x "$py" ]; then
            die "JUPYTERHUB_VERSION is not set and $py does not exist: set JUPYTERHUB_VERSION to the hub's JupyterHub version (e.g. JUPYTERHUB_VERSION=6.1.1) or VENV to the hub's virtualenv"
        fi
        # importlib.metadata is much faster than importing jupyterhub.
        v=$("$py" -c 'import importlib.metadata as m; print(m.version("jupyterhub"))' 2>/dev/null) ||
            v=$("$py" -c 'import jupyterhub; print(jupyterhub.__version__)' 2>/dev/null) ||
            die "JUPYTERHUB_VERSION is not set and jupyterhub is not installed in $py: set JUPYTERHUB_VERSION (e.g. 6.1.1)"
    fi
    if [[ ! $v =~ ^([0-9]+)\.([0-9]+)([.].*)?$ ]]; then
        die "JUPYTERHUB_VERSION='$v' does not look like X.Y[.Z]"
    fi
    printf '%s.%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
}

# image_inputs NAME: everything the image depends on, one line each. Its sha256
# is the cache key, so anything that changes the result must appear here.
image_inputs() {
    local name=$1 series bb
    case "$name" in
        jupyter-base) series=$(jupyterhub_series) || exit 1 ;;
        lxdspawner-tiny)
            [ -f "$BUSYBOX" ] || die "$BUSYBOX not found: apt-get install busybox-static"
            bb=$(sha256sum <"$BUSYBOX") || exit 1
            ;;
    esac
    (
        cd "$IMAGES_DIR" || exit 1
        # The build machinery and every recipe file (README.md and
        # ensure-image.sh do not change what is built).
        find lib.sh build-image.sh common "$name" -type f \
            ! -name '*~' ! -name '.*.sw?' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    )
    case "$name" in
        jupyter-base)
            printf 'jupyterhub==%s.*\n' "$series"
            printf 'mirror=%s security=%s\n' "$DEBIAN_MIRROR" "$DEBIAN_SECURITY_MIRROR"
            ;;
        lxdspawner-tiny)
            printf 'busybox=%s\n' "${bb%% *}"
            ;;
    esac
    printf 'arch=%s\n' "$(uname -m)"
}

# image_hash NAME: 16 hex digits of sha256(image_inputs NAME).
image_hash() {
    local inputs
    inputs=$(image_inputs "$1") || exit 1
    printf '%s\n' "$inputs" | sha256sum | cut -c1-16
}

# image_cache_dir NAME: where the build of the current recipe lives (or will).
image_cache_dir() {
    local h
    h=$(image_hash "$1") || exit 1
    printf '%s/%s-%s\n' "$IMAGE_CACHE" "$1" "$h"
}

# safe_rm_tree DIR: unmount anything left mounted below DIR (an interrupted
# chroot build), then delete it without crossing into other filesystems.
safe_rm_tree() {
    local dir=$1 m
    [ -e "$dir" ] || return 0
    dir=$(realpath -- "$dir")
    # Deepest first.
    while read -r m; do
        if [ -n "$m" ]; then umount -l -- "$m" 2>/dev/null || true; fi
    done < <(findmnt -rn -o TARGET | awk -v d="$dir/" 'index($0, d) == 1' | LC_ALL=C sort -r)
    rm -rf --one-file-system -- "$dir"
}

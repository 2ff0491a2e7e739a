#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# ensure-image.sh NAME [DAEMON]: make alias NAME on the local daemon point at
# the image built from the current recipe.
#   NAME   = jupyter-base | lxdspawner-tiny
#   DAEMON = incus (default; `incus`, socket $INCUS_DIR/unix.socket, default
#            /var/lib/incus) | lxd (Debian's `lxc`, LXD_DIR default /var/lib/lxd)
# Builds the image if the cache lacks it (see build-image.sh), imports it
# unless the daemon has it, then creates or moves the alias; an image the
# alias used to point at is deleted when no alias is left on it. Idempotent;
# when there is nothing to do it only hashes the recipe and asks the daemon
# once.
# Environment: IMAGE_PROJECT (default "default"), plus build-image.sh's.
set -euo pipefail

name=${1:-}
daemon=${2:-incus}
if [ -z "$name" ]; then
    echo "usage: $0 NAME [incus|lxd]   (NAME: jupyter-base | lxdspawner-tiny)" >&2
    exit 2
fi
LOG_TAG="ensure $name@$daemon"
# In a checkout (lxdspawner/images/ here) the hub's virtualenv is the repository's .venv. Set
# here, not in lib.sh, whose contents are part of the images' cache key.
if [ -z "${VENV:-}${JUPYTERHUB_VERSION:-}" ] && [ -x "$(dirname "$0")/../../.venv/bin/python" ]; then
    VENV="$(cd "$(dirname "$0")/../.." && pwd)/.venv"
    export VENV
fi
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

# What the builds need, installed here (not in lib.sh or build-image.sh, whose contents are
# part of the images' cache key): a fresh machine has none of it.
build_tools=(mmdebstrap squashfs-tools xz-utils busybox-static)
missing_tools=()
for pkg in "${build_tools[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing_tools+=("$pkg")
done
if [ ${#missing_tools[@]} -gt 0 ]; then
    log "installing the image build tools: ${missing_tools[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing_tools[@]}" >&2 || {
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing_tools[@]}" >&2
    }
fi
check_image_name "$name"

case "$daemon" in
    incus)
        cli=incus
        where="${INCUS_SOCKET:-${INCUS_DIR:-/var/lib/incus}/unix.socket}"
        ;;
    lxd)
        cli=lxc
        export LXD_DIR="${LXD_DIR:-/var/lib/lxd}"
        where="$LXD_DIR/unix.socket"
        ;;
    *) die "unknown daemon '$daemon' (incus | lxd)" ;;
esac
command -v "$cli" >/dev/null || die "$cli not found: is $daemon installed? (scripts/setup-lxd.sh)"
project=${IMAGE_PROJECT:-default}

# A private, empty client configuration: the user's default remote, project or
# aliases must not redirect us; the client then talks to the local socket.
conf=$(mktemp -d "${TMPDIR:-/tmp}/lxdspawner-client.XXXXXX")
trap 'rm -rf "$conf"' EXIT
export INCUS_CONF="$conf" LXD_CONF="$conf"
c() { "$cli" --force-local --project "$project" "$@"; }
# q [OPTIONS] PATH: REST call (query takes no --project; it goes in the URL).
q() {
    local path=${*: -1}
    "$cli" --force-local query "${@:1:$#-1}" "$path?project=$project"
}

# json_target: the alias' target fingerprint from `query` output.
json_target() { sed -n 's/.*"target": *"\([0-9a-f]\{64\}\)".*/\1/p'; }

dir=$(image_cache_dir "$name")
if [ ! -f "$dir/fingerprint" ]; then
    log "not in the cache; building"
    dir=$("$IMAGES_DIR/build-image.sh" "$name" | tail -n 1)
fi
fp=$(cat "$dir/fingerprint")
hash=${dir##*-}

mkdir -p "$IMAGE_CACHE"
exec 8>"$IMAGE_CACHE/.import-$daemon-$name.lock"
flock 8

# What does the alias point at now?
current=""
if out=$(q "/1.0/images/aliases/$name" 2>&1); then
    current=$(printf '%s\n' "$out" | json_target)
elif ! grep -qi 'not found' <<<"$out"; then
    die "cannot ask $daemon at $where (is it running? scripts/setup-lxd.sh): $out"
fi

if [ "$current" = "$fp" ]; then
    log "nothing to do: $name -> ${fp:0:12} (recipe $hash)"
    exit 0
fi

if q "/1.0/images/$fp" >/dev/null 2>&1; then
    log "image ${fp:0:12} is already in $daemon"
else
    log "importing $dir ($(du -sh "$dir/rootfs.squashfs" | cut -f1) squashfs) into $daemon"
    t0=$EPOCHREALTIME
    out=$(c image import "$dir/meta.tar.xz" "$dir/rootfs.squashfs" 2>&1) || die "import failed: $out"
    got=$(printf '%s\n' "$out" | sed -n 's/.*fingerprint: *\([0-9a-f]\{64\}\).*/\1/p')
    [ "$got" = "$fp" ] || die "the daemon reports fingerprint '${got:-?}', expected $fp: $out"
    log "imported ${fp:0:12} in $(( (${EPOCHREALTIME/./} - ${t0/./}) / 1000 )) ms"
fi

description="lxdspawner $name (recipe $hash)"
if [ -z "$current" ]; then
    q -X POST -d "{\"name\": \"$name\", \"target\": \"$fp\", \"description\": \"$description\"}" \
        /1.0/images/aliases >/dev/null
    log "created alias $name -> ${fp:0:12}"
else
    # One PUT moves the alias atomically: a launch never finds it missing.
    q -X PUT -d "{\"target\": \"$fp\", \"description\": \"$description\"}" \
        "/1.0/images/aliases/$name" >/dev/null
    log "moved alias $name: ${current:0:12} -> ${fp:0:12}"
    old=$(q "/1.0/images/$current" 2>/dev/null | tr -d ' \t\n') || old=""
    if [ -n "$old" ] && { [[ $old == *'"aliases":[]'* ]] || [[ $old == *'"aliases":null'* ]]; }; then
        c image delete "$current" >/dev/null
        log "deleted old image ${current:0:12}"
    elif [ -n "$old" ]; then
        log "kept old image ${current:0:12}: other aliases point at it"
    fi
fi

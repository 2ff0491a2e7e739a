#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# build-image.sh NAME: build image NAME (jupyter-base | lxdspawner-tiny) into
# the cache unless the cache already holds the current recipe's build.
# Prints the cache directory on stdout; progress goes to stderr.
#
# Environment: LXDSPAWNER_CACHE (default /var/cache/lxdspawner),
#   JUPYTERHUB_VERSION or VENV (jupyter-base only: see lib.sh),
#   DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR, BUSYBOX,
#   FORCE=1 to rebuild even when cached.
#
# Each recipe directory holds build-rootfs.sh ROOTFS OUTDIR (creates the root
# filesystem ROOTFS; may write OUTDIR/properties.yaml, extra image properties,
# and manifests OUTDIR/*.txt), metadata.yaml.in and optionally overlay/.
set -euo pipefail

name=${1:-}
[ -n "$name" ] || { echo "usage: $0 NAME   (jupyter-base | lxdspawner-tiny)" >&2; exit 2; }
LOG_TAG="build $name"
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
check_image_name "$name"
[ "$(id -u)" = 0 ] || die "must run as root (the rootfs has files owned by several users)"

hash=$(image_hash "$name")
dest="$IMAGE_CACHE/$name-$hash"

if [ -f "$dest/fingerprint" ] && [ "${FORCE:-0}" != 1 ]; then
    log "cached: $dest"
    printf '%s\n' "$dest"
    exit 0
fi

for tool in mksquashfs xz tar flock findmnt; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install squashfs-tools xz-utils tar util-linux)"
done

mkdir -p "$IMAGE_CACHE"
# One build per image at a time; a second caller waits and then finds the cache.
exec 9>"$IMAGE_CACHE/.$name.lock"
if ! flock -n 9; then
    log "another build of $name is running; waiting for it"
    flock 9
fi
if [ -f "$dest/fingerprint" ] && [ "${FORCE:-0}" != 1 ]; then
    log "cached (built meanwhile): $dest"
    printf '%s\n' "$dest"
    exit 0
fi

work="$IMAGE_CACHE/.build-$name-$hash.$$"
cleanup() { safe_rm_tree "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
safe_rm_tree "$work"
mkdir -p "$work/out" "$work/meta/templates"
image_inputs "$name" >"$work/out/inputs"

log "building $name (recipe hash $hash) in $work"
t0=$EPOCHREALTIME
step() { log "step: $*"; }

step "root filesystem ($IMAGES_DIR/$name/build-rootfs.sh)"
"$IMAGES_DIR/$name/build-rootfs.sh" "$work/rootfs" "$work/out"

step "generic clean-up"
rootfs="$work/rootfs"
# The daemon writes /etc/hostname and /etc/hosts from the templates on create
# and copy; the host's must not leak into the image.
rm -f "$rootfs/etc/hostname"
# LXD/Incus mount their own /dev; leftovers from the chroot are noise.
if [ -d "$rootfs/dev" ]; then
    find "$rootfs/dev" -mindepth 1 -xdev -delete
fi

step "metadata"
arch=$(uname -m)
dpkg_arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
now=$(date +%s)
serial=$(date -u +%Y%m%d_%H%M)
{
    sed -e "s/@ARCH@/$arch/g" -e "s/@DPKG_ARCH@/$dpkg_arch/g" -e "s/@CREATION_DATE@/$now/g" \
        -e "s/@SERIAL@/$serial/g" -e "s/@RECIPE_HASH@/$hash/g" \
        "$IMAGES_DIR/$name/metadata.yaml.in"
    # metadata.yaml.in ends inside "properties:"; the recipe may add to it,
    # e.g. the JupyterHub version it installed.
    if [ -s "$work/out/properties.yaml" ]; then
        sed 's/^/  /' "$work/out/properties.yaml"
    fi
    cat <<'EOF'
templates:
  /etc/hostname:
    when: [create, copy]
    create_only: false
    template: hostname.tpl
    properties: {}
  /etc/hosts:
    when: [create, copy]
    create_only: false
    template: hosts.tpl
    properties: {}
EOF
} >"$work/meta/metadata.yaml"
rm -f "$work/out/properties.yaml"
cp "$IMAGES_DIR"/common/templates/*.tpl "$work/meta/templates/"
tar -C "$work/meta" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$now" \
    -cJf "$work/out/meta.tar.xz" metadata.yaml templates

step "squashfs (zstd)"
# zstd: fast to unpack on the daemon's side (the first instance per image and
# pool unpacks the whole image). Measured on jupyter-base (2 cores): level 3
# 5 s/166 MB, level 9 8 s/153 MB, level 15 75 s/151 MB.
# (mksquashfs 4.5 cannot store POSIX ACLs, e.g. systemd's on /var/log/journal;
# it drops them with a warning per file, which is filtered here.)
mksquashfs "$rootfs" "$work/out/rootfs.squashfs" -noappend -quiet -no-progress \
    -comp zstd -Xcompression-level "${SQUASHFS_ZSTD_LEVEL:-9}" -b 1M \
    -processors "$(nproc)" >/dev/null 2>"$work/mksquashfs.err" ||
    { cat "$work/mksquashfs.err" >&2; die "mksquashfs failed"; }
grep -v '^Unrecognised xattr prefix system.posix_acl_' "$work/mksquashfs.err" >&2 || true

step "fingerprint"
fingerprint=$(cat "$work/out/meta.tar.xz" "$work/out/rootfs.squashfs" | sha256sum | cut -c1-64)
printf '%s\n' "$fingerprint" >"$work/out/fingerprint"

unpacked=$(du -sm --apparent-size "$rootfs" | cut -f1)
safe_rm_tree "$rootfs"
elapsed=$(( (${EPOCHREALTIME/./} - ${t0/./}) / 1000000 ))
{
    printf 'name=%s\nhash=%s\nfingerprint=%s\n' "$name" "$hash" "$fingerprint"
    printf 'built=%s\nbuild_seconds=%s\nunpacked_mb=%s\n' "$(date -u +%FT%TZ)" "$elapsed" "$unpacked"
    printf 'meta_bytes=%s\nrootfs_bytes=%s\n' \
        "$(stat -c %s "$work/out/meta.tar.xz")" "$(stat -c %s "$work/out/rootfs.squashfs")"
    echo "inputs:"
    cat "$work/out/inputs"
} >"$work/out/info"
rm -f "$work/out/inputs"

rm -rf "$dest"  # an old FORCE=1 build
mv "$work/out" "$dest"
log "done in ${elapsed}s: $dest ($(du -sh "$dest/rootfs.squashfs" | cut -f1) squashfs, ${unpacked} MB unpacked, fingerprint ${fingerprint:0:12})"
printf '%s\n' "$dest"

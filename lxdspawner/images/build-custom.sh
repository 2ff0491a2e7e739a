#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# build-custom.sh BASE SPEC OUT: the root filesystem of a custom image (lxdspawner image build
# RECIPE.yaml), made on the host: the base image's rootfs.squashfs (BASE/rootfs.squashfs)
# unpacked, then in a chroot: apt-get install, pip install into /opt/jupyterhub, the files
# copied, the post-install script run, caches cleaned; written to OUT/rootfs.squashfs with
# the manifests OUT/packages.txt and OUT/requirements.txt.
#
# SPEC is prepared by lxdspawner/imagebuild.py from the checked recipe; every value reaches
# this script as a file, never as shell syntax:
#   packages            Debian packages, one a line (checked names)
#   requirements.txt    pip requirements (checked: no options)
#   files/N/{src,dest,mode}  the N-th file or directory to add (a copy), where it goes (an
#                       absolute path) and its octal mode (empty: the copy's own)
#   script              the post-install script (optional)
# Environment: LXDSPAWNER_PIP_ENV (VAR=value lines: the host's pip index settings),
#   LXDSPAWNER_CA_BUNDLE (CA certificates for pip and apt during the build only).
# Progress goes to stderr as "[custom +12.3s] step: ..." lines.
set -euo pipefail
umask 022

base=$1
spec=$2
out=$3
LOG_TAG="custom"
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || die "must run as root (the rootfs has files owned by several users)"
for tool in unsquashfs mksquashfs chroot findmnt; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install squashfs-tools)"
done

root="$out/rootfs"
cleanup() { safe_rm_tree "$root"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { log "step: $*"; }

step "unpack the base ($(du -h "$base/rootfs.squashfs" | cut -f1))"
unsquashfs -quiet -no-progress -dest "$root" "$base/rootfs.squashfs" >/dev/null

in_root() {
    chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

# What apt, dpkg and pip need in a chroot, for the build only: /proc, /dev, /sys, the host's
# resolver and CA bundle, and a policy-rc.d so that no package starts a service on the host.
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"
mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"
build_tmp="$root/tmp/.lxdspawner-build"
mkdir -p "$build_tmp"
cp "${LXDSPAWNER_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$build_tmp/ca.crt"
resolv_link=$(readlink "$root/etc/resolv.conf" || true)
rm -f "$root/etc/resolv.conf"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"

mapfile -t packages < <(grep -v '^$' "$spec/packages" || true)
if [ ${#packages[@]} -gt 0 ]; then
    step "apt-get install ${packages[*]}"
    in_root apt-get -o Acquire::Languages=none update -q >&2
    # No Recommends, as in jupyter-base: only what was asked for and what it needs.
    in_root apt-get install -y -q --no-install-recommends "${packages[@]}" >&2
fi

if grep -q . "$spec/requirements.txt"; then
    step "pip install into /opt/jupyterhub: $(grep -c . "$spec/requirements.txt") requirement(s)"
    cp "$spec/requirements.txt" "$build_tmp/requirements.txt"
    mapfile -t pip_env < <(printf '%s' "${LXDSPAWNER_PIP_ENV:-}")
    in_root PIP_CONFIG_FILE=/dev/null PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore PIP_CERT=/tmp/.lxdspawner-build/ca.crt \
        ${pip_env[@]+"${pip_env[@]}"} \
        /opt/jupyterhub/bin/pip install --quiet -r /tmp/.lxdspawner-build/requirements.txt >&2
fi

if [ -d "$spec/files" ]; then
    for entry in "$spec"/files/*/; do
        entry=${entry%/}
        dest=$(cat "$entry/dest")
        mode=$(cat "$entry/mode")
        step "file $dest"
        rm -rf "$build_tmp/file"
        cp -a "$entry/src" "$build_tmp/file"
        chown -R 0:0 "$build_tmp/file"
        [ -z "$mode" ] || chmod "$mode" "$build_tmp/file"
        in_root mkdir -p "$(dirname "$dest")"
        # A file replaces the file at dest; a directory is merged into dest. Nothing is
        # deleted. Copied inside the chroot, so that a symbolic link in the image
        # (/var/run -> /run) is followed there, never on the host.
        if [ -d "$build_tmp/file" ]; then
            in_root mkdir -p "$dest"
            in_root cp -a /tmp/.lxdspawner-build/file/. "$dest/"
            [ -z "$mode" ] || in_root chmod "$mode" "$dest"
        else
            in_root cp -a -T /tmp/.lxdspawner-build/file "$dest"
        fi
    done
fi

if [ -f "$spec/script" ]; then
    step "post-install script"
    cp "$spec/script" "$build_tmp/post-install"
    chmod 755 "$build_tmp/post-install"
    in_root /tmp/.lxdspawner-build/post-install >&2
fi

step "manifests and clean-up"
# shellcheck disable=SC2016 # dpkg-query's format, not shell
in_root dpkg-query -W -f '${Package} ${Version}\n' >"$out/packages.txt"
in_root /opt/jupyterhub/bin/pip --disable-pip-version-check freeze --all >"$out/requirements.txt"
in_root apt-get clean
rm -rf "$root/var/lib/apt/lists/"* "$root/root/.cache" "$build_tmp" "$root/usr/sbin/policy-rc.d"
rm -f "$root/etc/resolv.conf"
if [ -n "$resolv_link" ]; then ln -s "$resolv_link" "$root/etc/resolv.conf"; fi
find "$root/var/log" -type f -delete
: >"$root/etc/machine-id"
rm -f "$root/etc/hostname"
while read -r m; do
    [ -z "$m" ] || umount -l -- "$m"
done < <(findmnt -rn -o TARGET | awk -v d="$(realpath "$root")/" 'index($0, d) == 1' | LC_ALL=C sort -r)

step "squashfs (zstd)"
# Level 3, not jupyter-base's 9: a custom image is rebuilt whenever its recipe changes, and
# on 2 busy cores level 9 took 50 s of an 84 s build for 7 % less size.
mksquashfs "$root" "$out/rootfs.squashfs" -noappend -quiet -no-progress \
    -comp zstd -Xcompression-level "${SQUASHFS_ZSTD_LEVEL:-3}" -b 1M \
    -processors "$(nproc)" >/dev/null 2>"$out/mksquashfs.err" ||
    { cat "$out/mksquashfs.err" >&2; die "mksquashfs failed"; }
grep -v '^Unrecognised xattr prefix system.posix_acl_' "$out/mksquashfs.err" >&2 || true
rm -f "$out/mksquashfs.err"
echo "unpacked_mb=$(du -sm --apparent-size "$root" | cut -f1)" >"$out/sizes"

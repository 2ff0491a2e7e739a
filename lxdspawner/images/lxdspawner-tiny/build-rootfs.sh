#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# build-rootfs.sh ROOTFS OUTDIR: a busybox-only system for fast client tests.
# busybox init (/etc/inittab) sets up the system, keeps udhcpc running on eth0
# (so the instance shows an IPv4) and stops quickly on SIGPWR (incus stop).
# Called by ../build-image.sh.
set -euo pipefail

rootfs=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
LOG_TAG="build lxdspawner-tiny"
# shellcheck source=../lib.sh
. "$here/../lib.sh"

mkdir -p "$rootfs"
cd "$rootfs"
mkdir -p bin sbin usr/bin usr/sbin etc/init.d dev proc sys run tmp var/log root
ln -s ../run var/run
chmod 1777 tmp
chmod 0700 root

install -m 0755 "$BUSYBOX" bin/busybox
# The binary must run on its own: no loader, no libraries in this image.
chroot "$rootfs" /bin/busybox true || die "$BUSYBOX does not run in an empty root (not static?): use busybox-static"
n=0
while read -r applet; do
    [ -e "$applet" ] || [ -L "$applet" ] || { ln -s /bin/busybox "$applet"; n=$((n + 1)); }
done < <(chroot "$rootfs" /bin/busybox --list-full)
log "busybox $("$BUSYBOX" | head -1 | cut -d' ' -f2): $n applets"

tar -C "$here/overlay" --owner=0 --group=0 --numeric-owner -cf - . |
    tar -C "$rootfs" --no-same-permissions --no-overwrite-dir -xf -
chmod 0644 etc/inittab etc/passwd etc/group
chmod 0755 etc/init.d/rcS etc/init.d/rcK etc/init.d/udhcpc etc/udhcpc.script
: >etc/resolv.conf
printf 'busybox %s\n' "$("$BUSYBOX" | head -1 | cut -d' ' -f2)" >"$out/packages.txt"

#!/bin/bash
# install-image.sh: make alias lxdspawner-install-debian12 on the host's Incus point at a
# plain Debian 12 with systemd (nothing of ours in it), for tests/install: the production
# installer is tested in a fresh system container of it, whose systemd is PID 1 (this
# machine's is not). No image server is reachable from here, so it is built with mmdebstrap
# and cached by its recipe's hash under /var/cache/lxdspawner/images/, like the single-user
# images (lxdspawner/images/build-image.sh); the import is skipped when the daemon has it.
# Prints the alias on stdout; progress on stderr. Environment: DEBIAN_MIRROR,
# DEBIAN_SECURITY_MIRROR, LXDSPAWNER_CACHE, INCUS_DIR.
set -euo pipefail
alias=lxdspawner-install-debian12
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
cache="${LXDSPAWNER_CACHE:-/var/cache/lxdspawner}/images"
log() { printf '[install-image] %s\n' "$*" >&2; }
# What a fresh Debian 12 cloud or netinst system has that the installer may rely on (systemd,
# networking, the passwd tools of PAM); nothing the installer installs itself.
packages=(systemd systemd-sysv udev dbus systemd-resolved iproute2 ca-certificates
    libpam-systemd)
hash=$({ sha256sum <"$0"; printf '%s\n' "${packages[@]}" "$mirror" "$security" "$(uname -m)"; } |
    sha256sum | cut -c1-16)
dest="$cache/install-debian12-$hash"
mkdir -p "$cache"
exec 9>"$cache/.install-debian12.lock"
flock 9
if [ ! -f "$dest/fingerprint" ]; then
    work="$cache/.build-install-debian12.$$"
    rm -rf "$work"
    trap 'rm -rf --one-file-system "$work"' EXIT
    mkdir -p "$work/out" "$work/meta"
    log "building Debian 12 + systemd with mmdebstrap into $work"
    include=$(IFS=,; echo "${packages[*]}")
    mmdebstrap --variant=minbase --mode=root --format=directory --include="$include" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        bookworm "$work/rootfs" "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
        "deb $security bookworm-security main" >&2
    root=$work/rootfs
    # DHCP on eth0 by systemd-networkd, as a cloud image does; udev only for network links.
    mkdir -p "$root/etc/systemd/network" "$root/etc/systemd/system/systemd-udev-trigger.service.d"
    printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n\n[DHCPv4]\nClientIdentifier=mac\nUseHostname=no\n' \
        >"$root/etc/systemd/network/20-eth0.network"
    printf '[Service]\nExecStart=\nExecStart=-udevadm trigger --type=subsystems --action=add --subsystem-match=net\nExecStart=-udevadm trigger --type=devices --action=add --subsystem-match=net\n' \
        >"$root/etc/systemd/system/systemd-udev-trigger.service.d/container.conf"
    chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service >&2
    for unit in systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
        systemd-binfmt.service systemd-modules-load.service getty@.service serial-getty@.service; do
        ln -sfn /dev/null "$root/etc/systemd/system/$unit"
    done
    ln -sfn ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
    rm -f "$root/etc/hostname" "$root/etc/apt/apt.conf.d/99mmdebstrap"
    : >"$root/etc/machine-id"
    find "$root/dev" -mindepth 1 -xdev -delete
    now=$(date +%s)
    cat >"$work/meta/metadata.yaml" <<META
architecture: $(uname -m)
creation_date: $now
properties:
  os: Debian
  release: bookworm
  description: Debian 12 with systemd (lxdspawner test bench, $hash)
templates:
  /etc/hostname:
    when: [create, copy]
    template: hostname.tpl
META
    mkdir -p "$work/meta/templates"
    echo '{{ container.name }}' >"$work/meta/templates/hostname.tpl"
    tar -C "$work/meta" --owner=0 --group=0 -cJf "$work/out/meta.tar.xz" metadata.yaml templates
    mksquashfs "$root" "$work/out/rootfs.squashfs" -noappend -quiet -no-progress -comp zstd \
        >/dev/null 2>&1
    cat "$work/out/meta.tar.xz" "$work/out/rootfs.squashfs" | sha256sum | cut -c1-64 \
        >"$work/out/fingerprint"
    rm -rf "$dest"
    mv "$work/out" "$dest"
    log "built $dest"
fi
fp=$(cat "$dest/fingerprint")
current=$(incus query "/1.0/images/aliases/$alias" 2>/dev/null |
    sed -n 's/.*"target": *"\([0-9a-f]\{64\}\)".*/\1/p') || current=""
if [ "$current" != "$fp" ]; then
    if [ -n "$current" ]; then
        incus image alias delete "$alias" >&2
    fi
    if incus query "/1.0/images/$fp" >/dev/null 2>&1; then
        incus image alias create "$alias" "$fp" >&2
    else
        incus image import "$dest/meta.tar.xz" "$dest/rootfs.squashfs" --alias "$alias" >&2
    fi
    log "alias $alias -> ${fp:0:12}"
fi
echo "$alias"

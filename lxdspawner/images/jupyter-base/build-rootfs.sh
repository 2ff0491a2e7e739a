#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# build-rootfs.sh ROOTFS OUTDIR: Debian bookworm (mmdebstrap minbase) with
# systemd + networkd, and a virtualenv /opt/jupyterhub holding
# jupyterhub==$JUPYTERHUB_SERIES.* and jupyterlab. Called by ../build-image.sh.
set -euo pipefail

rootfs=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
LOG_TAG="build jupyter-base"
# shellcheck source=../lib.sh
. "$here/../lib.sh"

command -v mmdebstrap >/dev/null || die "mmdebstrap not found (apt-get install mmdebstrap)"
JUPYTERHUB_SERIES=$(jupyterhub_series)

# merged /usr is set up by mmdebstrap's hook (usr-is-merged), not by the
# usrmerge package, which would pull in perl.
# Only what is needed; no Recommends (they would pull timesyncd, libpam-systemd, ...).
# udev is required: without it systemd-networkd waits for it forever and never
# configures eth0. systemd-resolved: DNS from the DHCP lease (networkd alone
# does not write /etc/resolv.conf).
packages=(systemd systemd-sysv udev dbus systemd-resolved
    python3 python3-venv ca-certificates iproute2)

# pip inside the chroot: the host's index settings and CA bundle, nothing from
# the host that only exists on the host (file:// indexes, find-links dirs).
# Precedence as pip's: environment over config files.
declare -A pipset=()
host_pip=$(command -v pip3 || command -v pip || true)
if [ -n "$host_pip" ]; then
    while IFS= read -r line; do
        key=${line%%=*}
        val=${line#*=}
        val=${val#\'}
        val=${val%\'}
        src=${key%%.*}
        key=${key#*.}
        case "$key" in
            index-url | extra-index-url | trusted-host | default-timeout | timeout | retries | proxy | cert) ;;
            *) continue ;;
        esac
        [ "$key" = timeout ] && key=default-timeout
        if [ "$src" = ":env:" ] || [ -z "${pipset[$key]+x}" ]; then
            pipset[$key]=$val
        fi
    done < <(env -u PIP_CONFIG_FILE "$host_pip" config list 2>/dev/null || true)
fi
pip_env=""
for key in "${!pipset[@]}"; do
    val=${pipset[$key]}
    case "$key" in
        cert) continue ;;
        index-url | extra-index-url)
            # keep http(s) URLs only
            keep=""
            for u in $val; do
                case "$u" in http://* | https://*) keep="${keep:+$keep }$u" ;; esac
            done
            val=$keep
            ;;
    esac
    [ -n "$val" ] || continue
    var="PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")"
    pip_env+="$var=$val"$'\n'
done
ca_bundle=${PIP_CERT:-${pipset[cert]:-/etc/ssl/certs/ca-certificates.crt}}
[ -f "$ca_bundle" ] || die "CA bundle $ca_bundle not found"
log "pip in the chroot: ${pip_env//$'\n'/ }CA bundle from $ca_bundle"

export LXDSPAWNER_OUT="$out" LXDSPAWNER_PIP_ENV="$pip_env" LXDSPAWNER_CA_BUNDLE="$ca_bundle"
export JUPYTERHUB_SERIES LXDSPAWNER_RECIPE_DIR="$here"

log "mmdebstrap bookworm: ${packages[*]}"
include=$(IFS=,; echo "${packages[*]}")
# shellcheck disable=SC2016 # the hook is expanded by mmdebstrap's sh ($1: the chroot)
mmdebstrap --variant=minbase --mode=root --format=directory \
    --include="$include" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --customize-hook='"$LXDSPAWNER_RECIPE_DIR/customize.sh" "$1"' \
    bookworm "$rootfs" \
    "deb $DEBIAN_MIRROR bookworm main" \
    "deb $DEBIAN_MIRROR bookworm-updates main" \
    "deb $DEBIAN_SECURITY_MIRROR bookworm-security main"

# mmdebstrap copies the host's resolv.conf for the build and leaves it:
# point it at systemd-resolved's stub, as the package would on a real system.
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"
# Recommends are off for the build only; apt in the container behaves as usual.
rm -f "$rootfs/etc/apt/apt.conf.d/99mmdebstrap"

log "packages: $(wc -l <"$out/packages.txt"), python packages: $(wc -l <"$out/requirements.txt")"

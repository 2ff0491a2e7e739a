#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# customize.sh ROOTFS: mmdebstrap --customize-hook for jupyter-base (runs on
# the host; /dev, /proc and /sys are mounted in ROOTFS). Environment from
# build-rootfs.sh: JUPYTERHUB_SERIES, LXDSPAWNER_OUT, LXDSPAWNER_PIP_ENV,
# LXDSPAWNER_CA_BUNDLE, LXDSPAWNER_RECIPE_DIR.
set -euo pipefail
umask 022

root=$1
here=${LXDSPAWNER_RECIPE_DIR:?}
out=${LXDSPAWNER_OUT:?}
series=${JUPYTERHUB_SERIES:?}
LOG_TAG="build jupyter-base"
# shellcheck source=../lib.sh
. "$here/../lib.sh"

in_root() {
    chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

log "customize: overlay files"
# Owned by root, mode from the umask (0644/0755), whatever the checkout's.
tar -C "$here/overlay" --owner=0 --group=0 --numeric-owner -cf - . |
    tar -C "$root" --no-same-permissions --no-overwrite-dir -xf -

log "customize: user jupyter (1000:1000)"
in_root groupadd --gid 1000 jupyter
in_root useradd --uid 1000 --gid 1000 --create-home --home-dir /home/jupyter \
    --shell /bin/bash --comment "Jupyter user" jupyter

log "customize: virtualenv /opt/jupyterhub with jupyterhub==$series.* and jupyterlab"
# Build-time network settings: the host's resolver and CA bundle, removed below.
build_tmp="$root/tmp/.lxdspawner-build"
mkdir -p "$build_tmp"
cp "$LXDSPAWNER_CA_BUNDLE" "$build_tmp/ca.crt"
resolv_saved=""
if [ -L "$root/etc/resolv.conf" ] || [ ! -s "$root/etc/resolv.conf" ]; then
    resolv_saved=$(readlink "$root/etc/resolv.conf" || true)
    rm -f "$root/etc/resolv.conf"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
fi
mapfile -t pip_env < <(printf '%s' "${LXDSPAWNER_PIP_ENV:-}")
pip() {
    in_root PIP_CONFIG_FILE=/dev/null PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore PIP_CERT=/tmp/.lxdspawner-build/ca.crt \
        ${pip_env[@]+"${pip_env[@]}"} /opt/jupyterhub/bin/pip "$@"
}
in_root python3 -m venv /opt/jupyterhub
t=$EPOCHREALTIME
pip install --quiet "jupyterhub==$series.*" jupyterlab
log "customize: pip install took $(( (${EPOCHREALTIME/./} - ${t/./}) / 1000000 ))s"
in_root /opt/jupyterhub/bin/python -m compileall -q -j 0 /opt/jupyterhub >/dev/null
pip freeze --all >"$out/requirements.txt"
{
    printf 'jupyterhub: "%s"\n' "$(sed -n 's/^jupyterhub==//p' "$out/requirements.txt")"
    printf 'jupyterlab: "%s"\n' "$(sed -n 's/^jupyterlab==//p' "$out/requirements.txt")"
} >"$out/properties.yaml"
log "customize: $(wc -l <"$out/requirements.txt") python packages, $(grep -E '^(jupyterhub|jupyterlab)==' "$out/requirements.txt" | tr '\n' ' ')"
rm -rf "$build_tmp" "$root/root/.cache"
rm -f "$root/etc/resolv.conf"
if [ -n "$resolv_saved" ]; then
    ln -s "$resolv_saved" "$root/etc/resolv.conf"
fi

log "customize: systemd units"
in_root systemctl enable systemd-networkd.service systemd-resolved.service
# Not needed in a container, failing there, or slow at boot; measured with
# systemd-analyze blame/critical-chain and the journal of a booted instance.
# Masked, not just disabled, so that no preset or dependency brings them back.
mask=(
    systemd-networkd-wait-online.service # nothing may wait for "online"
    systemd-network-generator.service    # network config from the kernel command line
    apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service
    dpkg-db-backup.timer dpkg-db-backup.service
    e2scrub_all.timer e2scrub_all.service e2scrub_reap.service
    fstrim.timer fstrim.service
    systemd-timesyncd.service    # the host keeps the time (not installed; in case)
    getty@.service serial-getty@.service # only console-getty (incus console) stays
    systemd-binfmt.service       # fails: binfmt_misc is the host's
    systemd-modules-load.service modprobe@.service # no kernel modules in a container
    systemd-logind.service       # no pam_systemd, so no sessions to manage
)
for unit in "${mask[@]}"; do
    ln -sfn /dev/null "$root/etc/systemd/system/$unit"
done

log "customize: clean-up"
# shellcheck disable=SC2016 # dpkg-query's format, not shell
in_root dpkg-query -W -f '${Package} ${Version}\n' >"$out/packages.txt"
# An empty machine-id: systemd makes a new one on the container's first boot.
: >"$root/etc/machine-id"
if [ -f "$root/var/lib/dbus/machine-id" ] && [ ! -L "$root/var/lib/dbus/machine-id" ]; then
    rm -f "$root/var/lib/dbus/machine-id"
fi
find "$root/var/log" -type f -delete

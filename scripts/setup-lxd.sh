#!/usr/bin/env bash
# Install, start and initialise the container daemon lxdspawner runs on.
#
#   scripts/setup-lxd.sh            # Incus (default)
#   scripts/setup-lxd.sh lxd        # Debian's LXD 5.0, side by side with Incus
#   LXDSPAWNER_DAEMON=lxd scripts/setup-lxd.sh
#
# Idempotent: every step checks first and only adds what is missing, under
# names of our own, so a daemon someone else configured is left as it is.
#
# Each daemon gets a btrfs pool "lxdspawner" and a bridge of its own; their sockets, bridges
# and subnets are in scripts/topology.env (Incus: lxdspbr0, LXD: lxdspbr1).
#
# The bridges have NAT and IPv6 off: containers reach the hub on the bridge's
# own address and nothing beyond this machine.
set -euo pipefail
# shellcheck source=topology.env
source "$(dirname "${BASH_SOURCE[0]}")/topology.env"

daemon="${1:-${LXDSPAWNER_DAEMON:-incus}}"
pool_size="${LXDSPAWNER_POOL_SIZE:-40GiB}"
log() { printf 'setup-lxd[%s]: %s\n' "$daemon" "$*"; }

case "$daemon" in
  incus)
    state_dir=$LXDSP_INCUS_DIR
    socket=$LXDSP_INCUS_SOCKET
    cli=(incus)
    daemon_bin=/usr/libexec/incus/incusd
    bridge=$LXDSP_INCUS_BRIDGE
    subnet=$LXDSP_INCUS_BRIDGE_ADDRESS
    packages=(incus-base incus-client)
    apt_suite=bookworm-backports
    ;;
  lxd)
    state_dir=$LXDSP_LXD_DIR
    socket=$LXDSP_LXD_SOCKET
    cli=(env LXD_DIR="$state_dir" lxc)
    daemon_bin=/usr/bin/lxd
    bridge=$LXDSP_LXD_BRIDGE
    subnet=$LXDSP_LXD_BRIDGE_ADDRESS
    packages=(lxd lxd-client)
    apt_suite=
    ;;
  *)
    echo "setup-lxd: unknown daemon '$daemon' (choose incus or lxd)" >&2
    exit 2
    ;;
esac
daemon_log="/var/log/lxdspawner-$daemon.log"
pool=lxdspawner

ensure_packages() {
  local missing=() pkg
  for pkg in "${packages[@]}" btrfs-progs iptables dnsmasq-base uidmap; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return
  if [ -n "$apt_suite" ] && ! grep -rqs "$apt_suite" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "enabling Debian $apt_suite in apt"
    cat >/etc/apt/sources.list.d/lxdspawner-backports.sources <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $apt_suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -q
  fi
  log "installing ${missing[*]}"
  local suite_args=()
  [ -n "$apt_suite" ] && suite_args=(-t "$apt_suite")
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${suite_args[@]}" "${missing[@]}"; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${suite_args[@]}" "${missing[@]}"
  fi
}

# Installing Debian's lxd appends a second range for root to /etc/subuid and /etc/subgid.
# Incus (and LXD) then build an id map from both, which the kernel refuses ("newuidmap:
# write to uid_map failed"): no unprivileged container starts. Keep root's largest range.
ensure_single_root_idmap() {
  local file count
  for file in /etc/subuid /etc/subgid; do
    [ -f "$file" ] || continue
    count=$(grep -c '^root:' "$file" || true)
    if [ "$count" -eq 0 ]; then
      log "adding root:1000000:1000000000 to $file"
      echo "root:1000000:1000000000" >>"$file"
    elif [ "$count" -gt 1 ]; then
      local keep
      keep=$(grep '^root:' "$file" | sort -t: -k3,3n | tail -n 1)
      log "$file has $count ranges for root; keeping $keep"
      { grep -v '^root:' "$file" || true; echo "$keep"; } >"$file.lxdspawner.tmp"
      mv "$file.lxdspawner.tmp" "$file"
    fi
  done
}

api_answers() {
  [ -S "$socket" ] && timeout 5 "${cli[@]}" query /1.0 >/dev/null 2>&1
}

ensure_running() {
  if api_answers; then
    log "daemon already answers on $socket"
    return
  fi
  if [ -d /run/systemd/system ]; then
    log "starting the daemon with systemd"
    case "$daemon" in
      incus) systemctl start incus.socket incus.service ;;
      lxd) systemctl start lxd.socket lxd.service ;;
    esac
  else
    # No systemd here (containers, CI): run the daemon detached, logging to a known file.
    log "starting $daemon_bin detached (log: $daemon_log)"
    # Incus needs its admin group for the socket's ownership; LXD uses root only.
    getent group incus-admin >/dev/null || groupadd --system incus-admin
    modprobe btrfs 2>/dev/null || true
    local args=(--logfile "$daemon_log")
    [ "$daemon" = incus ] && args+=(--group incus-admin)
    [ "$daemon" = lxd ] && export LXD_DIR="$state_dir"
    ulimit -n 1048576 2>/dev/null || true
    setsid nohup env PATH="/usr/libexec/incus:$PATH" "$daemon_bin" "${args[@]}" \
      </dev/null >>"$daemon_log" 2>&1 &
  fi
  local i
  for i in $(seq 1 120); do
    if api_answers; then
      log "daemon ready after ${i} checks"
      return
    fi
    sleep 0.5
  done
  echo "setup-lxd: $daemon did not answer on $socket within 60 s; see $daemon_log" >&2
  tail -n 30 "$daemon_log" >&2 || true
  exit 1
}

ensure_pool() {
  if "${cli[@]}" storage show "$pool" >/dev/null 2>&1; then
    log "storage pool '$pool' exists"
    return
  fi
  log "creating btrfs storage pool '$pool' on a sparse $pool_size loop file"
  "${cli[@]}" storage create "$pool" btrfs size="$pool_size"
}

# Root disk sizes (LxdSpawner.disk_limit) are btrfs quota groups. The daemon turns quotas on
# when it first sets a size, on a file system that already holds images: the accounting is
# then marked inconsistent and btrfs enforces no limit until a rescan (measured: a container
# with a 200 MiB root wrote 400 MiB on Incus). So quotas are on from the start, rescanned.
ensure_quota() {
  local mount="$state_dir/storage-pools/$pool"
  if ! mountpoint -q "$mount"; then
    log "pool '$pool' is not mounted at $mount: quotas left as they are"
    return
  fi
  btrfs quota enable "$mount"
  btrfs quota rescan -w "$mount" >/dev/null
  log "btrfs quotas on and consistent on pool '$pool'"
}

# The bridge is the hub's alone: marked so, lxdspawner puts its network ACL on the whole of it
# (network_isolation, see SECURITY.md).
ensure_network() {
  if "${cli[@]}" network show "$bridge" >/dev/null 2>&1; then
    log "bridge '$bridge' exists"
  else
    log "creating bridge '$bridge' ($subnet, NAT off, IPv6 off)"
    "${cli[@]}" network create "$bridge" \
      ipv4.address="$subnet" ipv4.nat=false ipv4.dhcp=true \
      ipv6.address=none
  fi
  if [[ $("${cli[@]}" network get "$bridge" user.jupyterhub.managed-by) != lxdspawner ]]; then
    log "dedicating bridge '$bridge' to lxdspawner (user.jupyterhub.managed-by)"
    "${cli[@]}" network set "$bridge" user.jupyterhub.managed-by=lxdspawner
  fi
}

ensure_default_profile() {
  local profile
  profile=$("${cli[@]}" profile show default)
  if ! grep -qE '^  eth0:' <<<"$profile"; then
    log "adding eth0 on '$bridge' to the default profile"
    "${cli[@]}" profile device add default eth0 nic network="$bridge" name=eth0
  fi
  if ! grep -qE '^  root:' <<<"$profile"; then
    log "adding a root disk on pool '$pool' to the default profile"
    "${cli[@]}" profile device add default root disk pool="$pool" path=/
  fi
}

ensure_packages
ensure_single_root_idmap
ensure_running
ensure_pool
ensure_quota
ensure_network
ensure_default_profile
log "ready: socket $socket, pool $pool, bridge $bridge ($subnet)"

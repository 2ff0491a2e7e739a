#!/usr/bin/env bash
# A real Incus cluster of three members on this one machine, for the cluster tests and for
# developers (see docs/cluster.md):
#
#   scripts/cluster.sh up              build it, or check it and return (idempotent); prints
#                                      what a client needs as KEY=value lines on stdout
#   scripts/cluster.sh down            stop and delete everything it made; nothing keeps running
#   scripts/cluster.sh status          one line per piece; exit 0 only when all is healthy
#   scripts/cluster.sh stop-member N [--kill]
#                                      stop member N's daemon (SIGTERM, or SIGKILL: a crash);
#                                      its containers keep running
#   scripts/cluster.sh start-member N  start it again; returns once the cluster sees it Online
#   scripts/cluster.sh env N           `eval "$(scripts/cluster.sh env 2)"; incus cluster list`
#
# It is built the way LXD's and Incus' own test suites build clusters: each member is its own
# incusd with its own state directory (INCUS_DIR), in its own network namespace, reached over
# a veth pair plugged into a bridge on the host:
#
#   host (hub)      lxdspclu0  10.117.50.1/24      dnsmasq: DHCP 10.117.50.100-250 (no DNS,
#     |                                             no router: nothing leaves the segment)
#     +-- veth lxdspm1h <-> eth0 in netns lxdsp-m1  10.117.50.11  member1  INCUS_DIR=.../member1
#     +-- veth lxdspm2h <-> eth0 in netns lxdsp-m2  10.117.50.12  member2  INCUS_DIR=.../member2
#     +-- veth lxdspm3h <-> eth0 in netns lxdsp-m3  10.117.50.13  member3  INCUS_DIR=.../member3
#
# The names and addresses are in scripts/topology.env (LXDSP_CLUSTER_*).
#
# Instances get a macvlan NIC on their member's eth0 (the default profile's eth0), so every
# container sits on the host's bridge segment with an address from the host's dnsmasq: the
# hub reaches containers on every member directly, and they reach the hub on 10.117.50.1.
# Storage: a btrfs pool "lxdspawner" on a sparse loop file per member
# ($INCUS_DIR/disks/lxdspawner.img). HTTPS API for the hub: https://10.117.50.11:8443 with
# the client certificate written to /var/lib/lxdspawner-cluster/client.{crt,key} (trusted)
# and the cluster's certificate in server.crt (to pin).
#
# Several daemons on one host: what collides and what we do about it.
# - Paths: with INCUS_DIR set, incusd keeps its run directory ($INCUS_DIR/run instead of
#   /run/incus), logs and cache under it as well, so members and the standalone Incus at
#   /var/lib/incus never share a file.
# - /sys/class/net shows the interfaces of the network namespace that mounted sysfs, and
#   `ip netns exec` remounts /sys without the cgroup hierarchies under it. So each member
#   gets a persistent mount namespace of its own (bound to /run/lxdspawner-cluster/ns/mN.mnt)
#   with a fresh sysfs and the host's cgroup mounts moved under it, and the daemon is
#   started there (and again there by start-member, so the pool it mounted is still the one
#   its running containers use). Mounts of the other daemons (/var/lib/incus, /var/lib/lxd)
#   are detached inside it, so the cluster never pins their pools.
# - cgroups: liblxc names container cgroups lxc.payload.<instance>; instance names are
#   unique within the cluster, and a name also used by the standalone daemon gets a "-1"
#   suffix from liblxc. Tests use names of their own anyway.
# - AppArmor is not enabled on these kernels, lxcfs is not used: nothing shared there.
# - Limits: many systemd containers exhaust the per-user inotify instances (128 by default,
#   and every container's root is the same host uid); `up` raises fs.inotify.* and
#   kernel.keys.* to LXD's production recommendations when they are lower.
# Everything is under names of our own (lxdsp-m*, lxdspm*h, lxdspclu0, nft table
# lxdspawner-cluster); the standalone Incus and LXD and their bridges are left alone.
#
# Bash does the host's plumbing; what is asked of the cluster's API (members' status,
# trust, copying the images to every member) is done in Python by testbench/cluster.py,
# with lxdspawner's own client, on the venv's Python ($PYTHON, default $VENV/bin/python).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=topology.env
source "$REPO/scripts/topology.env"
VENV=${VENV:-$REPO/.venv}
PYTHON=${PYTHON:-$VENV/bin/python}
MEMBERS=${LXDSP_CLUSTER_MEMBERS:-3}
STATE=$LXDSP_CLUSTER_STATE
RUN=$LXDSP_CLUSTER_RUN
NSDIR=$RUN/ns
BRIDGE=$LXDSP_CLUSTER_BRIDGE
NET=$LXDSP_CLUSTER_NET
HOST_IP=$NET.1
PORT=$LXDSP_CLUSTER_PORT
POOL=lxdspawner
POOL_SIZE=${LXDSP_CLUSTER_POOL_SIZE:-10GiB}
OFFLINE_THRESHOLD=${LXDSP_CLUSTER_OFFLINE_THRESHOLD:-15}
IMAGES=${LXDSP_CLUSTER_IMAGES:-jupyter-base lxdspawner-tiny}
INCUSD=/usr/libexec/incus/incusd
NFT_TABLE=lxdspawner-cluster

T0=${EPOCHREALTIME/./}
export LXDSP_CLUSTER_T0=$T0 # testbench/cluster.py stamps its messages like log() below
log() {
    local ds=$(((${EPOCHREALTIME/./} - T0) / 100000))
    printf '[cluster +%d.%ds] %s\n' $((ds / 10)) $((ds % 10)) "$*" >&2
}
die() {
    log "ERROR: $*"
    exit 1
}

mdir() { echo "$STATE/member$1"; }
mns() { echo "lxdsp-m$1"; }
mveth() { echo "lxdspm${1}h"; }
maddr() { echo "$NET.$((10 + $1))"; }
mname() { echo "member$1"; }
members() { seq 1 "$MEMBERS"; }

# c N ARGS...: the incus CLI on member N's unix socket, with a private, empty client
# configuration (the user's remotes and defaults must not redirect it).
c() {
    local i=$1
    shift
    env -u INCUS_SOCKET -u INCUS_REMOTE INCUS_DIR="$(mdir "$i")" INCUS_CONF="$STATE/cli" \
        incus --force-local "$@"
}

# ct SECONDS N ARGS...: c with a time limit.
ct() {
    local t=$1 i=$2
    shift 2
    timeout "$t" env -u INCUS_SOCKET -u INCUS_REMOTE INCUS_DIR="$(mdir "$i")" \
        INCUS_CONF="$STATE/cli" incus --force-local "$@"
}

api_ok() { [ -S "$(mdir "$1")/unix.socket" ] && ct 5 "$1" query /1.0 >/dev/null 2>&1; }

# api N COMMAND ARGS...: testbench/cluster.py on member N's unix socket (see its docstring).
api() {
    local i=$1
    shift
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m testbench.cluster \
        "$(mdir "$i")/unix.socket" "$@"
}

check_python() {
    [ -x "$PYTHON" ] || die "no Python at $PYTHON: run 'make venv' (or set VENV or PYTHON)"
}

# daemon_pid N: the pid of member N's incusd, or nothing. Checked against /proc, so a pid
# file left over from a previous boot never names someone else's process.
daemon_pid() {
    local f pid
    f="$(mdir "$1")/incusd.pid"
    [ -f "$f" ] || return 0
    pid=$(<"$f")
    [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] || return 0
    [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$INCUSD" ] || return 0
    tr '\0' '\n' <"/proc/$pid/environ" | grep -qx "INCUS_DIR=$(mdir "$1")" || return 0
    echo "$pid"
}

dnsmasq_pid() {
    local pid
    [ -f "$STATE/dnsmasq.pid" ] || return 0
    pid=$(<"$STATE/dnsmasq.pid")
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dnsmasq ] || return 0
    grep -qa -- "$STATE/dnsmasq.leases" "/proc/$pid/cmdline" 2>/dev/null || return 0
    echo "$pid"
}

ns_mounted() { [ -e "$NSDIR/m$1.mnt" ] && findmnt -rn -o FSTYPE "$NSDIR/m$1.mnt" 2>/dev/null | grep -q nsfs; }

clustered() { api "$1" clustered; }

# member_statuses: "name status" per member, as member 1 sees them.
member_statuses() { api 1 members 2>/dev/null; }

# -- host side -------------------------------------------------------------------------------

check_tools() {
    local t missing=()
    for t in incus ip nsenter unshare dnsmasq openssl nft python3 btrfs; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    [ -x "$INCUSD" ] || missing+=("$INCUSD")
    if [ ${#missing[@]} -gt 0 ]; then
        log "missing ${missing[*]}: installing Incus and its tools with scripts/setup-lxd.sh"
        "$REPO/scripts/setup-lxd.sh" incus
        command -v nft >/dev/null && command -v openssl >/dev/null ||
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables openssl
    fi
    getent group incus-admin >/dev/null || groupadd --system incus-admin
    modprobe btrfs 2>/dev/null || true
    modprobe macvlan 2>/dev/null || true
}

# sysctl_at_least KEY VALUE: raise a host limit, never lower it.
sysctl_at_least() {
    local cur
    cur=$(sysctl -n "$1" 2>/dev/null) || return 0
    if [ "$cur" -lt "$2" ]; then
        log "raising $1 from $cur to $2"
        sysctl -qw "$1=$2" || true
    fi
}

ensure_limits() {
    sysctl_at_least fs.inotify.max_user_instances 1024
    sysctl_at_least fs.inotify.max_user_watches 1048576
    sysctl_at_least fs.inotify.max_queued_events 1048576
    sysctl_at_least kernel.keys.maxkeys 2000
    sysctl_at_least kernel.keys.maxbytes 2000000
}

ensure_bridge() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        log "creating bridge $BRIDGE ($HOST_IP/24)"
        ip link add "$BRIDGE" type bridge
        # IPv6 off: nothing on this segment needs it, and it keeps the segment quiet.
        sysctl -qw "net.ipv6.conf.$BRIDGE.disable_ipv6=1" 2>/dev/null || true
    fi
    ip -4 addr show dev "$BRIDGE" | grep -q "inet $HOST_IP/24" || ip addr add "$HOST_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    # Nothing is routed into or out of the segment (the host forwards IPv4 for other
    # bridges): members and containers reach the host and each other, nothing else. Bridged
    # traffic between the segment's ports has in and out interface $BRIDGE and passes.
    if ! nft list table inet "$NFT_TABLE" >/dev/null 2>&1; then
        nft -f - <<EOF
table inet $NFT_TABLE {
    chain forward {
        type filter hook forward priority filter; policy accept;
        iifname "$BRIDGE" oifname != "$BRIDGE" drop
        oifname "$BRIDGE" iifname != "$BRIDGE" drop
    }
}
EOF
    fi
}

ensure_dnsmasq() {
    [ -n "$(dnsmasq_pid)" ] && return 0
    log "starting dnsmasq on $BRIDGE (DHCP $NET.100-250)"
    mkdir -p "$STATE"
    touch "$STATE/dnsmasq.leases"
    # port=0: DHCP only, no DNS. Empty router and DNS options: containers get no default
    # route. Leases of 2 minutes (dnsmasq's minimum), because every container has a new
    # MAC address and deleted containers never release theirs: short leases keep the range
    # from running out over a long test session.
    dnsmasq \
        --conf-file=/dev/null --port=0 --user=root \
        --bind-interfaces --interface="$BRIDGE" --except-interface=lo \
        --listen-address="$HOST_IP" \
        --dhcp-range="$NET.100,$NET.250,255.255.255.0,2m" \
        --dhcp-option=option:router --dhcp-option=option:dns-server \
        --dhcp-authoritative --dhcp-rapid-commit --no-ping \
        --dhcp-leasefile="$STATE/dnsmasq.leases" \
        --pid-file="$STATE/dnsmasq.pid" \
        --log-facility="$STATE/dnsmasq.log"
    local i
    for _ in $(seq 1 50); do
        [ -n "$(dnsmasq_pid)" ] && return 0
        sleep 0.1
    done
    die "dnsmasq did not start; see $STATE/dnsmasq.log"
}

# -- members ---------------------------------------------------------------------------------

ensure_netns() {
    local i=$1 ns veth addr
    ns=$(mns "$i") veth=$(mveth "$i") addr=$(maddr "$i")
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    if ! ip link show "$veth" >/dev/null 2>&1; then
        ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" -4 addr show dev eth0 | grep -q "inet $addr/24" ||
        ip -n "$ns" addr add "$addr/24" dev eth0
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
}

ensure_mountns() {
    local i=$1
    ns_mounted "$i" && return 0
    mkdir -p "$NSDIR"
    # A persistent mount namespace has to be bound on a mount with private propagation.
    if ! mountpoint -q "$NSDIR"; then
        mount --bind "$NSDIR" "$NSDIR"
        mount --make-private "$NSDIR"
    fi
    touch "$NSDIR/m$i.mnt"
    nsenter --net="/run/netns/$(mns "$i")" \
        unshare --mount="$NSDIR/m$i.mnt" --propagation slave /bin/sh -eu <<'EOF'
# sysfs describing this network namespace, with the host's cgroup hierarchies under it.
d=$(mktemp -d /tmp/lxdsp-sys.XXXXXX)
mount --move /sys "$d"
mount -t sysfs sysfs /sys
mount --move "$d/fs/cgroup" /sys/fs/cgroup
umount -l "$d"
rmdir "$d"
# Detach what belongs to others: the other daemons' pools and mounts, and the namespace
# files (a copy here would keep another member's namespaces alive after `down`).
findmnt -rn -o TARGET | grep -E '^(/var/lib/incus|/var/lib/lxd|/run/lxdspawner-cluster|/run/netns)(/|$)' |
    sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
EOF
}

start_daemon() {
    local i=$1 dir pid
    dir=$(mdir "$i")
    pid=$(daemon_pid "$i")
    if [ -n "$pid" ]; then
        # Running already (perhaps still starting): never start a second one on its state.
        for _ in $(seq 1 150); do
            api_ok "$i" && ct 90 "$i" admin waitready --timeout 60 && return 0
            [ -d "/proc/$pid" ] || break
            sleep 0.2
        done
        [ -d "/proc/$pid" ] && die "member $i's incusd (pid $pid) runs but does not answer; see $dir/incusd.log"
    fi
    mkdir -p "$dir"
    chmod 0711 "$dir"
    # Detached (no systemd here): a session of its own, logging to its state directory.
    # nsenter and setsid exec, not fork, so $! is the daemon's pid.
    (
        ulimit -n 1048576 2>/dev/null || true
        exec nsenter --net="/run/netns/$(mns "$i")" --mount="$NSDIR/m$i.mnt" -- \
            setsid env -i PATH="/usr/libexec/incus:/usr/sbin:/usr/bin:/sbin:/bin" \
            HOME=/root INCUS_DIR="$dir" \
            "$INCUSD" --group incus-admin --logfile "$dir/incusd.log" \
            </dev/null >>"$dir/incusd.out" 2>&1
    ) &
    pid=$!
    echo "$pid" >"$dir/incusd.pid"
    for _ in $(seq 1 150); do
        # Answering is not enough: until its start-up tasks are done (restarting its
        # containers, joining the cluster's database) it answers "Server isn't ready yet".
        api_ok "$i" && ct 90 "$i" admin waitready --timeout 60 && return 0
        # (until its exec, the process is still nsenter/setsid/env: only its end counts)
        if [ ! -d "/proc/$pid" ]; then
            tail -n 20 "$dir/incusd.log" "$dir/incusd.out" >&2 2>/dev/null || true
            die "member $i's incusd exited"
        fi
        sleep 0.2
    done
    tail -n 20 "$dir/incusd.log" >&2 || true
    die "member $i's incusd did not answer within 30 s; see $dir/incusd.log"
}

bootstrap() {
    clustered 1 && return 0
    log "bootstrapping the cluster on $(mname 1) ($(maddr 1))"
    c 1 admin init --preseed <<EOF
config:
  core.https_address: $(maddr 1):$PORT
  cluster.https_address: $(maddr 1):$PORT
  images.auto_update_interval: "0"
storage_pools:
- name: $POOL
  driver: btrfs
  config:
    size: $POOL_SIZE
profiles:
- name: default
  devices:
    root:
      type: disk
      path: /
      pool: $POOL
    eth0:
      type: nic
      name: eth0
      nictype: macvlan
      parent: eth0
cluster:
  server_name: $(mname 1)
  enabled: true
EOF
}

ensure_cluster_config() {
    # A stopped member is reported Offline after this many seconds without a heartbeat
    # (the default is 20; Incus refuses 10 or less). Close to that minimum, a loaded machine
    # reports live members Offline now and then: seen in CI with 11, as an image "not
    # available on any online member".
    [ "$(c 1 config get cluster.offline_threshold)" = "$OFFLINE_THRESHOLD" ] ||
        c 1 config set cluster.offline_threshold "$OFFLINE_THRESHOLD"
}

join() {
    local i=$1 token
    clustered "$i" && return 0
    log "joining $(mname "$i") ($(maddr "$i"))"
    c 1 cluster revoke-token "$(mname "$i")" >/dev/null 2>&1 || true
    token=$(c 1 cluster add --quiet "$(mname "$i")")
    c "$i" admin init --preseed <<EOF
cluster:
  enabled: true
  server_name: $(mname "$i")
  server_address: $(maddr "$i"):$PORT
  cluster_token: $token
  member_config:
  - entity: storage-pool
    name: $POOL
    key: source
    value: ""
  - entity: storage-pool
    name: $POOL
    key: size
    value: $POOL_SIZE
EOF
}

ensure_certs() {
    if [ ! -s "$STATE/client.crt" ] || [ ! -s "$STATE/client.key" ]; then
        log "generating the hub's client certificate"
        (umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:secp384r1 \
            -nodes -days 3650 -subj "/CN=lxdspawner-hub" \
            -keyout "$STATE/client.key" -out "$STATE/client.crt" 2>/dev/null)
        chmod 0644 "$STATE/client.crt"
    fi
    api 1 trust "$STATE/client.crt" lxdspawner-hub || die "trusting the hub's certificate failed"
    # Every member answers HTTPS with the cluster's certificate: pin that one.
    cmp -s "$(mdir 1)/cluster.crt" "$STATE/server.crt" || cp "$(mdir 1)/cluster.crt" "$STATE/server.crt"
}

# ensure_images: the images from the cache (built if missing), imported through member 1,
# then created once on every member, so each member has the image and its unpacked volume
# in its pool (a prepull: the first spawn on a member is a clone, not a 7-second unpack).
ensure_images() {
    local name pids=() i
    for name in $IMAGES; do
        VENV="$VENV" INCUS_DIR="$(mdir 1)" "$REPO/lxdspawner/images/ensure-image.sh" "$name" incus &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || die "image import failed"; done
    # shellcheck disable=SC2086 # IMAGES is a list of names
    api 1 images "$STATE" $IMAGES || die "copying the images to every member failed"
}

wait_all() {
    local p rc=0
    for p in "$@"; do wait "$p" || rc=1; done
    return $rc
}

# wait_online SECONDS N...: until the cluster reports members N... Online.
wait_online() {
    local timeout=$1 i names=()
    shift
    for i in "$@"; do names+=("$(mname "$i")"); done
    api 1 wait-online "$timeout" "${names[@]}" || die "not every member is Online"
}

# wait_forwarding N: right after member N restarts, requests member1 forwards to it may still
# get "Server isn't ready yet" for a moment: wait until one goes through (at most 30 s).
wait_forwarding() { api 1 wait-forwarding 30 "$(mname "$1")"; }

healthy() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || return 1
    [ -n "$(dnsmasq_pid)" ] || return 1
    local i
    for i in $(members); do
        [ -n "$(daemon_pid "$i")" ] && api_ok "$i" || return 1
    done
    [ -s "$STATE/client.crt" ] && [ -s "$STATE/server.crt" ] || return 1
    [ "$(member_statuses | awk '$2 == "Online"' | wc -l)" -eq "$MEMBERS" ] || return 1
}

cmd_up() {
    # Stdout carries the facts alone, for the tests to read; everything else, the commands'
    # own output included, goes to stderr.
    ensure_up >&2
    print_facts
}

ensure_up() {
    if healthy; then
        ensure_images
        log "cluster already up"
        return 0
    fi
    check_tools
    ensure_limits
    mkdir -p "$STATE/cli"
    chmod 0755 "$STATE"
    # An existing (empty) client configuration: the CLI then skips its first-run banner.
    [ -f "$STATE/cli/config.yml" ] || echo "default-remote: local" >"$STATE/cli/config.yml"
    ensure_bridge
    ensure_dnsmasq
    local i pids=()
    for i in $(members); do
        ensure_netns "$i"
        ensure_mountns "$i"
    done
    for i in $(members); do
        start_daemon "$i" &
        pids+=($!)
    done
    wait_all "${pids[@]}" || die "a member's daemon did not start"
    log "daemons answer"
    bootstrap
    ensure_cluster_config
    for i in $(members); do
        [ "$i" -eq 1 ] || join "$i"
    done
    # shellcheck disable=SC2046 # one argument per member
    wait_online 60 $(members)
    log "cluster of $MEMBERS members is Online"
    ensure_certs
    ensure_images
    log "up"
}

# print_facts: what a client of the cluster (the tests' fixtures, a developer's hub) needs,
# as KEY=value lines (testbench.topology.parse_env reads them; so does bash's eval).
print_facts() {
    local i names=() urls=()
    for i in $(members); do
        names+=("$(mname "$i")")
        urls+=("https://$(maddr "$i"):$PORT")
    done
    local IFS=,
    cat <<EOF
# the cluster's API, for the hub (the client certificate is trusted; pin server_cert)
LXDSP_CLUSTER_ENDPOINT=https://$(maddr 1):$PORT
LXDSP_CLUSTER_CLIENT_CERT=$STATE/client.crt
LXDSP_CLUSTER_CLIENT_KEY=$STATE/client.key
LXDSP_CLUSTER_SERVER_CERT=$STATE/server.crt
# the members, and the address each answers on
LXDSP_CLUSTER_MEMBERS=${names[*]}
LXDSP_CLUSTER_MEMBER_URLS=${urls[*]}
# the hub's address for containers, and theirs (DHCP from $NET.100 to $NET.250)
LXDSP_CLUSTER_HUB_IP=$HOST_IP
LXDSP_CLUSTER_SUBNET=$NET.0/24
# the incus CLI on member1: INCUS_DIR=... INCUS_CONF=... incus ...
LXDSP_CLUSTER_INCUS_DIR=$(mdir 1)
LXDSP_CLUSTER_INCUS_CONF=$STATE/cli
EOF
}

# -- down ------------------------------------------------------------------------------------

# ns_pids N: every process in member N's mount namespace (its daemon, forkfile/forkexec
# helpers, lxc monitors) and all their descendants (the containers' processes).
ns_pids() {
    local i=$1 ino p
    ns_mounted "$i" || return 0
    ino=$(stat -L -c %i "$NSDIR/m$i.mnt")
    python3 - "$ino" <<'EOF'
import os, sys
ino = int(sys.argv[1])
parent, inns = {}, set()
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        with open(f"/proc/{p}/stat") as f:
            parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
        if os.stat(f"/proc/{p}/ns/mnt").st_ino == ino:
            inns.add(int(p))
    except OSError:
        pass
found = set(inns)
changed = True
while changed:
    changed = False
    for p, pp in parent.items():
        if pp in found and p not in found:
            found.add(p)
            changed = True
print(" ".join(str(p) for p in sorted(found)))
EOF
}

cmd_down() {
    local i pid names="" pids=() started=()
    if [ -d "$STATE" ]; then
        # Start any stopped member so that its instances are deleted through the API
        # (their cgroups and network devices go with them).
        for i in $(members); do
            if ns_mounted "$i" && [ -z "$(daemon_pid "$i")" ] && [ -d "$(mdir "$i")/database" ]; then
                log "starting $(mname "$i") to delete its instances"
                if start_daemon "$i"; then started+=("$i"); fi
            fi
        done
        if api_ok 1 && clustered 1; then
            for i in "${started[@]}"; do wait_forwarding "$i" || true; done
            names=$(ct 30 1 list --all-projects --format csv -c n,e 2>/dev/null || true)
            for _ in 1 2 3; do
                pids=()
                while IFS=, read -r name project; do
                    [ -n "$name" ] || continue
                    ct 60 1 delete --force --project "$project" "$name" >/dev/null 2>&1 &
                    pids+=($!)
                done <<<"$(ct 30 1 list --all-projects --format csv -c n,e 2>/dev/null || true)"
                [ ${#pids[@]} -eq 0 ] && break
                log "deleting ${#pids[@]} instance(s)"
                wait_all "${pids[@]}" && break
                sleep 2
            done
            [ -z "$(ct 30 1 list --all-projects --format csv -c n 2>/dev/null)" ] ||
                log "some instances could not be deleted; killing their processes"
        fi
        # The whole cluster goes: no member needs a graceful handover, so 5 s of grace,
        # then SIGKILL (the kernel unmounts the pools when the namespaces go, below).
        pids=()
        for i in $(members); do
            pid=$(daemon_pid "$i")
            if [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; then pids+=("$pid"); fi
        done
        [ ${#pids[@]} -eq 0 ] || log "stopping ${#pids[@]} daemon(s)"
        for _ in $(seq 1 25); do
            local alive=()
            for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && alive+=("$pid"); done
            [ ${#alive[@]} -eq 0 ] && break
            sleep 0.2
        done
        [ ${#alive[@]} -eq 0 ] || kill -KILL "${alive[@]}" 2>/dev/null || true
    fi
    for i in $(members); do
        read -r -a pids <<<"$(ns_pids "$i")"
        if [ ${#pids[@]} -gt 0 ]; then
            log "killing ${#pids[@]} leftover process(es) of $(mname "$i"): ${pids[*]}"
            kill -KILL "${pids[@]}" 2>/dev/null || true
        fi
    done
    sleep 0.2
    # Instances killed rather than deleted leave empty cgroups named after them; remove those
    # (rmdir only ever removes an empty cgroup).
    local name
    while IFS=, read -r name _; do
        [ -n "$name" ] || continue
        find /sys/fs/cgroup -mindepth 2 -maxdepth 2 -type d \
            \( -name "lxc.payload.$name" -o -name "lxc.monitor.$name" \) -print 2>/dev/null |
            while read -r d; do find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true; done
    done <<<"$names"
    for i in $(members); do
        if [ -e "$NSDIR/m$i.mnt" ]; then
            umount "$NSDIR/m$i.mnt" 2>/dev/null || umount -l "$NSDIR/m$i.mnt" 2>/dev/null || true
            rm -f "$NSDIR/m$i.mnt"
        fi
        ip link del "$(mveth "$i")" 2>/dev/null || true
        [ -e "/run/netns/$(mns "$i")" ] && ip netns del "$(mns "$i")"
    done
    if mountpoint -q "$NSDIR" 2>/dev/null; then umount "$NSDIR"; fi
    rm -rf "$RUN"
    pid=$(dnsmasq_pid)
    if [ -n "$pid" ]; then
        kill -TERM "$pid"
        for _ in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    fi
    ip link del "$BRIDGE" 2>/dev/null || true
    nft delete table inet "$NFT_TABLE" 2>/dev/null || true
    # The pools' loop devices detach themselves when the last mount goes (autoclear);
    # the mounts lived in the members' namespaces, now gone. Wait for that, then check.
    local loops
    for _ in $(seq 1 50); do
        loops=$(losetup -nO NAME,BACK-FILE 2>/dev/null | awk -v s="$STATE/" 'index($2, s) == 1 {print $1}')
        [ -z "$loops" ] && break
        sleep 0.1
    done
    for l in $loops; do losetup -d "$l" 2>/dev/null || true; done
    if findmnt -rn -o TARGET | grep -q "^$STATE/"; then
        die "something is still mounted under $STATE: $(findmnt -rn -o TARGET | grep "^$STATE/" | tr '\n' ' ')"
    fi
    rm -rf --one-file-system "$STATE"
    log "down: nothing left"
}

# -- status and single members --------------------------------------------------------------

cmd_status() {
    local ok=0 i pid
    if ip link show "$BRIDGE" >/dev/null 2>&1; then echo "bridge   $BRIDGE $HOST_IP/24 up"; else echo "bridge   $BRIDGE missing"; ok=1; fi
    pid=$(dnsmasq_pid)
    if [ -n "$pid" ]; then echo "dnsmasq  pid $pid"; else echo "dnsmasq  not running"; ok=1; fi
    for i in $(members); do
        pid=$(daemon_pid "$i")
        local state
        if [ -z "$pid" ]; then
            state="daemon stopped"
            ok=1
        elif api_ok "$i"; then
            state="pid $pid, API answers"
        else
            state="pid $pid, API silent"
            ok=1
        fi
        printf '%s  netns %s %s  %s:%s  %s\n' "$(mname "$i")" "$(mns "$i")" \
            "$([ -e "/run/netns/$(mns "$i")" ] && echo present || echo missing)" "$(maddr "$i")" "$PORT" "$state"
    done
    if api_ok 1; then
        echo "members as $(mname 1) sees them:"
        member_statuses | sed 's/^/  /'
        [ "$(member_statuses | awk '$2 == "Online"' | wc -l)" -eq "$MEMBERS" ] || ok=1
    fi
    [ -s "$STATE/client.crt" ] && print_facts
    return $ok
}

check_member_arg() {
    if ! [[ ${1:-} =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt "$MEMBERS" ]; then
        die "usage: $0 ${2} N   (N = 1..$MEMBERS)"
    fi
}

cmd_stop_member() {
    local i=$1 how=${2:-} pid
    pid=$(daemon_pid "$i")
    if [ -z "$pid" ]; then
        log "$(mname "$i")'s daemon is not running"
        return 0
    fi
    if [ "$how" = --kill ]; then
        # A crash: no goodbye to the cluster, which notices only when heartbeats stop
        # (cluster.offline_threshold).
        kill -KILL "$pid"
        for _ in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
        log "$(mname "$i")'s daemon killed (pid $pid); its containers keep running"
        return 0
    fi
    # SIGTERM stops the daemon and leaves its instances running (SIGPWR would stop them);
    # it tells the other members it is going, so they mark it offline within seconds.
    kill -TERM "$pid"
    for _ in $(seq 1 150); do
        [ -d "/proc/$pid" ] || break
        sleep 0.2
    done
    if [ -d "/proc/$pid" ]; then
        log "$(mname "$i")'s daemon ignored SIGTERM for 30 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    log "$(mname "$i")'s daemon stopped (pid $pid); its containers keep running"
}

cmd_start_member() {
    local i=$1
    ns_mounted "$i" || die "$(mname "$i") has no namespace: run '$0 up' first"
    start_daemon "$i"
    wait_online 90 "$i"
    wait_forwarding "$i"
    log "$(mname "$i") is Online"
}

cmd_env() {
    local i=$1
    printf 'export INCUS_DIR=%q INCUS_CONF=%q\nunset INCUS_SOCKET\n' "$(mdir "$i")" "$STATE/cli"
    printf '# the member network namespace: ip netns exec %s ...\n' "$(mns "$i")"
}

[ "$(id -u)" -eq 0 ] || die "run as root"
case "${1:-}" in
    up) check_python; cmd_up ;;
    down) check_python; cmd_down ;;
    status) check_python; cmd_status ;;
    stop-member) check_member_arg "${2:-}" stop-member; cmd_stop_member "$2" "${3:-}" ;;
    start-member) check_member_arg "${2:-}" start-member; check_python; cmd_start_member "$2" ;;
    env) check_member_arg "${2:-}" env; cmd_env "$2" ;;
    *)
        echo "usage: $0 up|down|status|stop-member N [--kill]|start-member N|env N" >&2
        exit 2
        ;;
esac

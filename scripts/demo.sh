#!/usr/bin/env bash
# Run the demo hub in the foreground: `make demo` calls this after it has made the venv, set
# up the container daemon (scripts/setup-lxd.sh) and the image (lxdspawner/images/ensure-image.sh).
#
#   scripts/demo.sh          # http://127.0.0.1:8000, any username + the demo password
#
# State (database, cookie secret, passwords) lives in .cache/demo, so the passwords stay the
# same from run to run; delete the directory to start afresh. Ctrl-C stops the hub, the
# proxy and every server the demo started. Settings: scripts/demo_config.py.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
state_dir="${LXDSPAWNER_DEMO_DIR:-$repo/.cache/demo}"
url="${LXDSPAWNER_DEMO_URL:-http://127.0.0.1:8000}"
export LXDSPAWNER_DEMO_DIR="$state_dir" LXDSPAWNER_DEMO_URL="$url"
log() { printf 'demo: %s\n' "$*"; }

"$repo/scripts/ensure-tools.sh" chp

if [ ! -x "$python" ]; then
  log "no Python at $python: run 'make venv' (or set PYTHON)" >&2
  exit 1
fi

# The hub's API listens on the daemon's bridge (scripts/topology.env) so containers reach it.
# shellcheck source=topology.env
source "$repo/scripts/topology.env"
case "${LXDSPAWNER_DAEMON:-incus}" in
  lxd) bridge_address=$LXDSP_LXD_BRIDGE_ADDRESS ;;
  *) bridge_address=$LXDSP_INCUS_BRIDGE_ADDRESS ;;
esac
export LXDSPAWNER_DEMO_HUB_IP="${LXDSPAWNER_DEMO_HUB_IP:-${bridge_address%/*}}"
hub_ip=$LXDSPAWNER_DEMO_HUB_IP
if ! ip -4 -o addr show 2>/dev/null | grep -q " $hub_ip/"; then
  log "no interface has the address $hub_ip: run scripts/setup-lxd.sh first" >&2
  exit 1
fi

mkdir -p "$state_dir"
chmod 700 "$state_dir"
new_secret() { # file, length
  if [ ! -s "$1" ]; then
    (umask 077 && "$python" -c "import secrets, sys; print(secrets.token_urlsafe(int(sys.argv[1]))[:int(sys.argv[1])])" "$2" >"$1")
    log "generated $(basename "$1") in $state_dir"
  fi
}
new_secret "$state_dir/password" 16
new_secret "$state_dir/admin-password" 40 # SharedPasswordAuthenticator wants >= 32

cat <<EOF

  lxdspawner demo
  ---------------
  Open        $url
  Log in as   any username (one server per user; named servers allowed)
  Password    $(cat "$state_dir/password")
  Admin       user 'admin', password $(cat "$state_dir/admin-password")
              (the admin panel is at $url/hub/admin)
  Servers     container image 'jupyter-base', 1 GB, 1 CPU, culled after 1 h idle
  Hub API     http://$hub_ip:8081 (for the containers)
  State       $state_dir
  Stop        Ctrl-C (stops the hub and every server it started)

EOF

cd "$state_dir"
exec "$python" -m jupyterhub -f "$repo/scripts/demo_config.py"

#!/usr/bin/env bash
# Install the tools the end-to-end tests and the demo need, besides the venv:
#
#   configurable-http-proxy   from npm, into the repo-local .cache/node
#   chromium                  Debian's package (/usr/bin/chromium), driven by Playwright's
#                             Python package through executable_path: no `playwright
#                             install`, because browser downloads are not possible here.
#
# Idempotent and fast when everything is there: it checks first and says what it did.
#
#   scripts/ensure-tools.sh              # both
#   scripts/ensure-tools.sh chp          # only configurable-http-proxy
#   scripts/ensure-tools.sh chromium     # only chromium
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
node_prefix="$repo/.cache/node"
chp="$node_prefix/node_modules/.bin/configurable-http-proxy"
log() { printf 'ensure-tools: %s\n' "$*"; }

ensure_chp() {
  if [ -x "$chp" ]; then
    log "configurable-http-proxy present ($chp)"
    return
  fi
  if ! command -v npm >/dev/null; then
    log "npm missing: installing Debian's nodejs and npm"
    apt_install nodejs npm
  fi
  log "installing configurable-http-proxy from npm into $node_prefix"
  mkdir -p "$node_prefix"
  # CHP declares an engine newer than Debian's Node; it works with Node 20 (a warning only).
  npm install --prefix "$node_prefix" --no-audit --no-fund --loglevel=error \
    configurable-http-proxy >&2
  [ -x "$chp" ] || { log "npm finished but $chp is missing" >&2; exit 1; }
  log "installed configurable-http-proxy $("$chp" --version 2>/dev/null || echo '?')"
}

apt_install() {
  # Try without refreshing the package lists first: apt-get update is the slow part.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2; then
    log "apt-get install failed; running apt-get update and trying again"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
  fi
}

ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then
    log "chromium present ($(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium))"
    return
  fi
  log "installing Debian's chromium"
  # fonts-liberation: readable text in screenshots (otherwise everything may be boxes).
  apt_install chromium fonts-liberation
  log "installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
}

what="${1:-all}"
case "$what" in
  all) ensure_chp; ensure_chromium ;;
  chp) ensure_chp ;;
  chromium) ensure_chromium ;;
  *) echo "usage: $0 [all|chp|chromium]" >&2; exit 2 ;;
esac

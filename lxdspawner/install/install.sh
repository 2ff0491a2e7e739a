#!/bin/bash
# install.sh: lxdspawner's production install on a Debian 12 host with systemd, run as root
# by `lxdspawner install [OPTIONS]` (or, on a host without internet access, as
# `bash BUNDLE/install.sh --from-bundle BUNDLE`). README: "Production".
#
# It sets up, each step checking first and saying what it changed (a second run changes
# nothing and says so):
#   - the container daemon: Incus from bookworm-backports, initialised once from
#     /etc/lxdspawner/incus-preseed.yaml (or --daemon-socket: a daemon that is already there);
#   - the single-user image jupyter-base (skipped when the daemon has the alias);
#   - the hub's virtualenv (--venv, default /opt/jupyterhub: the one lxdspawner runs from)
#     with jupyterhub-idle-culler and psycopg2-binary;
#   - configurable-http-proxy (Debian's nodejs, CHP from npm into VENV/proxy) as its own unit
#     jupyterhub-proxy.service, its token in /etc/jupyterhub/proxy.env (0600);
#   - PostgreSQL from Debian: role and database "jupyterhub", the password generated once
#     into /etc/jupyterhub/environment (0600);
#   - the hub's configuration /etc/jupyterhub/jupyterhub_config.py (never overwritten: a new
#     version goes beside it as .new) and jupyterhub.service (the idle culler is a hub
#     service; both units log to the journal);
#   - Caddy from Debian in front: HTTPS with an ACME certificate for --domain, else its own
#     CA (tls internal) on this machine's address; HTTP redirected to HTTPS.
#
# Options:
#   --domain NAME         public DNS name: Caddy gets a certificate for it from Let's Encrypt
#   --acme-ca URL         with --domain: the ACME directory to get it from instead (a campus
#                         CA, e.g. step-ca: https://ca.example.org/acme/acme/directory)
#   --acme-ca-root FILE   with --acme-ca: that CA's root certificate (PEM), when this machine
#                         does not trust it already (copied to /etc/caddy/acme-ca-root.pem)
#   --address IP          the address HTTPS is served on without --domain (default: this
#                         machine's address on its default route)
#   --hub-address IP      where containers reach the hub's API (default: the bridge's
#                         address; with --daemon-socket, --address)
#   --daemon-socket PATH  use the Incus/LXD daemon answering on PATH; install no daemon
#   --hub-id ID           c.LxdSpawner.hub_id (default: jupyterhub-<hostname>)
#   --skip-image          do not build or import the single-user image
#   --upgrade             upgrade the Python packages (and CHP), then restart the hub only
#   --from-bundle DIR     install from an offline bundle (no network needed)
#   --bundle DIR          on a connected machine: write (or bring up to date) an offline
#                         bundle in DIR, and install nothing
#   --venv DIR            the hub's virtualenv (default /opt/jupyterhub)
set -euo pipefail
umask 022
here=$(cd "$(dirname "$0")" && pwd)

VENV=/opt/jupyterhub
domain="" acme_ca="" acme_ca_root="" address="" hub_address="" daemon_socket="" hub_id="" skip_image=0 upgrade=0
isolation=internet
from_bundle="" bundle=""
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --domain) domain=${2:?--domain needs a value}; shift ;;
        --acme-ca) acme_ca=${2:?--acme-ca needs a URL}; shift ;;
        --acme-ca-root) acme_ca_root=${2:?--acme-ca-root needs a file}; shift ;;
        --address) address=${2:?--address needs a value}; shift ;;
        --hub-address) hub_address=${2:?--hub-address needs a value}; shift ;;
        --daemon-socket) daemon_socket=${2:?--daemon-socket needs a value}; shift ;;
        --hub-id) hub_id=${2:?--hub-id needs a value}; shift ;;
        --skip-image) skip_image=1 ;;
        --upgrade) upgrade=1 ;;
        --from-bundle) from_bundle=${2:?--from-bundle needs a directory}; shift ;;
        --bundle) bundle=${2:?--bundle needs a directory}; shift ;;
        --venv) VENV=${2:?--venv needs a directory}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "lxdspawner install: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

changes=0
say() { printf 'lxdspawner install: %s\n' "$*"; }
ok() { say "ok: $*"; }
changed() { changes=$((changes + 1)); say "changed: $*"; }
die() { say "ERROR: $*" >&2; exit 1; }
# Values that go into files and URLs: plain host names and addresses only.
check_value() {
    [[ $2 =~ ^[A-Za-z0-9][A-Za-z0-9.:-]*$ ]] || die "$1 '$2': letters, digits, '.', ':' and '-' only"
}
[ -n "$domain" ] && check_value --domain "$domain"
[ -n "$address" ] && check_value --address "$address"
# The ACME directory goes into the Caddyfile: an https URL of plain characters only.
if [ -n "$acme_ca" ]; then
    [ -n "$domain" ] || die "--acme-ca needs --domain (without it, Caddy's own CA signs)"
    [[ $acme_ca =~ ^https://[A-Za-z0-9][A-Za-z0-9.:-]*(/[A-Za-z0-9._~/-]*)?$ ]] ||
        die "--acme-ca '$acme_ca': an https:// URL of letters, digits and . : - _ ~ / only"
fi
if [ -n "$acme_ca_root" ]; then
    [ -n "$acme_ca" ] || die "--acme-ca-root needs --acme-ca"
    [ -f "$acme_ca_root" ] && grep -q -- '-----BEGIN CERTIFICATE-----' "$acme_ca_root" ||
        die "--acme-ca-root '$acme_ca_root': not a PEM certificate file"
fi
[ -n "$hub_address" ] && check_value --hub-address "$hub_address"
[ -n "$hub_id" ] && check_value --hub-id "$hub_id"
[ "$(id -u)" = 0 ] || die "run as root (sudo lxdspawner install ...)"
[ -n "$from_bundle" ] && from_bundle=$(cd "$from_bundle" && pwd)

export DEBIAN_FRONTEND=noninteractive
STATE=/var/lib/lxdspawner/install
ETC=/etc/jupyterhub

# The Debian packages the install uses (their dependencies come along).
DEBS=(python3 python3-venv nodejs postgresql caddy ca-certificates)
# dnsmasq-base is only a Recommends of incus-base, but a bridge (the preseed's) needs it.
DAEMON_DEBS=(incus-base incus-client btrfs-progs dnsmasq-base)
CHP_SPEC="configurable-http-proxy@^4"
PIP_WANTED=(jupyterhub-lxdspawner jupyterhub-idle-culler psycopg2-binary)

random_hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

# -- the offline bundle (--bundle DIR, on a connected machine) ---------------------------------

# Each part of the bundle records what it was made from (DIR/PART.inputs): a part whose
# inputs are unchanged is kept, so a repeated --bundle is quick.
bundle_part_current() { [ -f "$bundle/$1.inputs" ] && [ "$(cat "$bundle/$1.inputs")" = "$2" ]; }

bundle_debs() {
    local inputs tmp
    # What apt would install on an empty system: the recursive dependencies, with versions.
    apt_empty=(-o Dir::State::status=/dev/null -o Debug::NoLocking=1 -o APT::Install-Recommends=false)
    inputs=$(apt-get -s "${apt_empty[@]}" install "${DEBS[@]}" | grep '^Inst ' | sort)
    inputs+=$'\n'$(apt-get -s "${apt_empty[@]}" -t bookworm-backports install \
        "${DAEMON_DEBS[@]}" 2>/dev/null | grep '^Inst ' | sort || true)
    if bundle_part_current debs "$inputs"; then
        ok "bundle: Debian packages up to date ($(find "$bundle/debs" -name '*.deb' | wc -l) files)"
        return
    fi
    tmp="$bundle/.debs.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp/partial"
    apt-get -q -y "${apt_empty[@]}" -o Dir::Cache::archives="$tmp" --download-only \
        install "${DEBS[@]}" >&2
    # The daemon's packages from bookworm-backports (skipped when the host's apt has no
    # backports: such a bundle installs with --daemon-socket only).
    apt-get -q -y "${apt_empty[@]}" -o Dir::Cache::archives="$tmp" --download-only \
        -t bookworm-backports install "${DAEMON_DEBS[@]}" >&2 ||
        say "bundle: no ${DAEMON_DEBS[*]} (enable bookworm-backports in apt to include them)"
    rm -rf "$tmp/partial" "$tmp/lock"
    (cd "$tmp" && dpkg-scanpackages -m . /dev/null >Packages 2>/dev/null)
    rm -rf "$bundle/debs"
    mv "$tmp" "$bundle/debs"
    printf '%s\n' "$inputs" >"$bundle/debs.inputs"
    changed "bundle: $(find "$bundle/debs" -name '*.deb' | wc -l) Debian packages ($(du -sh "$bundle/debs" | cut -f1))"
}

bundle_wheels() {
    local src inputs tmp constraints
    # lxdspawner itself: built from the source tree it runs from (a checkout), else the
    # release of its version from PyPI.
    src=$("$VENV/bin/python" -c 'import lxdspawner, pathlib; print(pathlib.Path(lxdspawner.__file__).parent.parent)')
    constraints=$("$VENV/bin/pip" freeze --exclude-editable 2>/dev/null | grep -v ' @ ' |
        grep -vi '^jupyterhub-lxdspawner==' || true)
    if [ -f "$src/pyproject.toml" ]; then
        inputs=$(cd "$src" && find pyproject.toml README.md LICENSE MANIFEST.in CHANGELOG.md \
            lxdspawner -type f ! -name '*.pyc' -print0 2>/dev/null | LC_ALL=C sort -z |
            xargs -0 sha256sum)
    else
        inputs="jupyterhub-lxdspawner==$("$VENV/bin/python" -c 'import lxdspawner; print(lxdspawner.__version__)')"
    fi
    inputs+=$'\n'"${PIP_WANTED[*]}"$'\n'"$constraints"
    if bundle_part_current wheels "$inputs"; then
        ok "bundle: Python wheels up to date ($(find "$bundle/wheels" -name '*.whl' | wc -l) files)"
        return
    fi
    tmp="$bundle/.wheels.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp/src"
    printf '%s\n' "$constraints" >"$tmp/constraints.txt"
    local what=()
    if [ -f "$src/pyproject.toml" ]; then
        # A copy: building writes build/ and *.egg-info beside the sources.
        (cd "$src" && cp -r pyproject.toml README.md LICENSE MANIFEST.in CHANGELOG.md lxdspawner "$tmp/src/")
        find "$tmp/src" -name '__pycache__' -prune -exec rm -rf {} +
        what=("$tmp/src")
    else
        what=("jupyterhub-lxdspawner==${inputs#*==}")
    fi
    # Wheels, not sdists: the offline host may have no compiler or build backend.
    "$VENV/bin/pip" wheel -q --disable-pip-version-check -w "$tmp/wheels" \
        -c "$tmp/constraints.txt" "${what[@]}" "${PIP_WANTED[@]:1}" >&2
    rm -rf "$bundle/wheels"
    mv "$tmp/wheels" "$bundle/wheels"
    rm -rf "$tmp"
    printf '%s\n' "$inputs" >"$bundle/wheels.inputs"
    changed "bundle: $(find "$bundle/wheels" -name '*.whl' | wc -l) Python wheels"
}

bundle_chp() {
    local tmp
    if bundle_part_current chp "$CHP_SPEC"; then
        ok "bundle: configurable-http-proxy up to date"
        return
    fi
    command -v npm >/dev/null || die "npm is needed to bundle configurable-http-proxy: apt-get install npm"
    tmp=$(mktemp -d)
    npm install --prefix "$tmp" --no-audit --no-fund --loglevel=error "$CHP_SPEC" >&2
    tar -C "$tmp" --owner=0 --group=0 -czf "$bundle/chp.tar.gz" node_modules
    rm -rf "$tmp"
    printf '%s\n' "$CHP_SPEC" >"$bundle/chp.inputs"
    changed "bundle: configurable-http-proxy ($(du -sh "$bundle/chp.tar.gz" | cut -f1))"
}

bundle_image() {
    local dir
    if [ "$skip_image" = 1 ]; then
        ok "bundle: image skipped (--skip-image)"
        return
    fi
    dir=$(VENV=$VENV "$("$VENV/bin/python" -c 'from lxdspawner.recipes import images_dir; print(images_dir())')/build-image.sh" jupyter-base | tail -n 1)
    if [ -f "$bundle/image/fingerprint" ] && cmp -s "$dir/fingerprint" "$bundle/image/fingerprint"; then
        ok "bundle: image jupyter-base up to date"
        return
    fi
    rm -rf "$bundle/image"
    mkdir -p "$bundle/image"
    cp -l "$dir"/meta.tar.xz "$dir"/rootfs.squashfs "$dir"/fingerprint "$bundle/image/" 2>/dev/null ||
        cp "$dir"/meta.tar.xz "$dir"/rootfs.squashfs "$dir"/fingerprint "$bundle/image/"
    changed "bundle: image jupyter-base ($(du -sh "$bundle/image" | cut -f1))"
}

make_bundle() {
    mkdir -p "$bundle"
    bundle=$(cd "$bundle" && pwd)
    [ -x "$VENV/bin/python" ] || die "--venv $VENV: no virtualenv there (the one lxdspawner runs from)"
    if ! cmp -s "$here/install.sh" "$bundle/install.sh"; then
        install -m 0755 "$here/install.sh" "$bundle/install.sh"
        changed "bundle: install.sh"
    fi
    bundle_debs
    bundle_wheels
    bundle_chp
    bundle_image
    chmod -R a+rX "$bundle"
    if [ "$changes" = 0 ]; then
        say "bundle $bundle is up to date: nothing changed"
    else
        say "bundle $bundle written ($(du -sh "$bundle" | cut -f1)); on the offline host, as root:"
        say "  bash $bundle/install.sh --from-bundle $bundle"
    fi
}

if [ -n "$bundle" ]; then
    make_bundle
    exit 0
fi

# -- the host --------------------------------------------------------------------------------

[ -d /run/systemd/system ] || die "systemd is not running here (PID 1): the install needs it"
if ! grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
    say "warning: made for Debian 12 (bookworm); this is $(. /etc/os-release && echo "$PRETTY_NAME")"
fi

# apt, from the network or only from the bundle's packages (its own lists, the system's
# sources untouched).
apt_opts=()
if [ -n "$from_bundle" ]; then
    [ -f "$from_bundle/debs/Packages" ] || die "--from-bundle $from_bundle: no debs/Packages (make it with --bundle)"
    bundle_apt=$(mktemp -d)
    trap 'rm -rf "$bundle_apt"' EXIT
    mkdir -p "$bundle_apt/lists/partial"
    echo "deb [trusted=yes] file:$from_bundle/debs ./" >"$bundle_apt/sources.list"
    apt_opts=(-o Dir::Etc::SourceList="$bundle_apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o Dir::State::Lists="$bundle_apt/lists" -o APT::Get::List-Cleanup=false
        -o APT::Sandbox::User=root)
    apt-get -q "${apt_opts[@]}" update >/dev/null
fi

missing_debs() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || echo "$pkg"
    done
}

apt_install() {
    local missing
    mapfile -t missing < <(missing_debs "$@")
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -n "$from_bundle" ]; then
        apt-get -q -y "${apt_opts[@]}" install --no-install-recommends "${missing[@]}" >&2
    elif ! apt-get -q -y install --no-install-recommends "${missing[@]}" >&2; then
        apt-get -q update >&2
        apt-get -q -y install --no-install-recommends "${missing[@]}" >&2
    fi
    changed "installed Debian packages: ${missing[*]}"
}

step_debs() {
    local before=$changes
    apt_install "${DEBS[@]}"
    [ "$changes" = "$before" ] && ok "Debian packages: ${DEBS[*]}"
    return 0
}

# -- the daemon --------------------------------------------------------------------------------

step_daemon() {
    if [ -n "$daemon_socket" ]; then
        "$VENV/bin/python" -m lxdspawner.installer answers "$daemon_socket" >/dev/null ||
            die "--daemon-socket $daemon_socket: no Incus/LXD daemon answers there"
        ok "daemon: $("$VENV/bin/python" -m lxdspawner.installer answers "$daemon_socket") on $daemon_socket (--daemon-socket)"
        isolation=ports
        return
    fi
    daemon_socket=/var/lib/incus/unix.socket
    if [ -z "$from_bundle" ] && [ -n "$(missing_debs "${DAEMON_DEBS[@]}")" ] &&
        ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        apt-get -q update >&2
        changed "enabled bookworm-backports in apt (Incus)"
    fi
    local missing
    mapfile -t missing < <(missing_debs "${DAEMON_DEBS[@]}")
    if [ ${#missing[@]} -gt 0 ]; then
        if [ -n "$from_bundle" ]; then
            apt-get -q -y "${apt_opts[@]}" install --no-install-recommends "${missing[@]}" >&2
        else
            apt-get -q -y -t bookworm-backports install --no-install-recommends "${missing[@]}" >&2
        fi
        changed "installed Incus: ${missing[*]}"
    else
        ok "Incus installed"
    fi
    if ! systemctl is-active -q incus.socket incus.service 2>/dev/null; then
        systemctl enable --now incus.socket incus.service
        changed "started Incus"
    fi
    install_new_file "$pkgdir/incus-preseed.yaml" /etc/lxdspawner/incus-preseed.yaml 0644
    # Initialised when the default profile has a root disk, as the preseed's last part gives
    # it: an init that failed halfway (a pool made, the bridge not) is applied again (the
    # preseed updates what exists), never taken for done.
    if [ -n "$(incus profile device get default root pool 2>/dev/null)" ]; then
        ok "Incus is initialised (storage pools: $(incus storage list -f csv -c n | tr '\n' ' '))"
    else
        incus admin init --preseed </etc/lxdspawner/incus-preseed.yaml
        changed "initialised Incus from /etc/lxdspawner/incus-preseed.yaml"
    fi
}

# -- the image ---------------------------------------------------------------------------------

step_image() {
    if "$VENV/bin/python" -m lxdspawner.installer has-image "$daemon_socket" jupyter-base; then
        ok "image jupyter-base is on the daemon"
        return
    fi
    if [ "$skip_image" = 1 ]; then
        say "warning: the daemon has no image jupyter-base and --skip-image was given: servers cannot start until it has (lxdspawner image build, or $("$VENV/bin/python" -c 'from lxdspawner.recipes import ensure_image_command as e; print(e())'))"
        return
    fi
    [ "$daemon_socket" = /var/lib/incus/unix.socket ] ||
        die "the daemon at $daemon_socket has no image jupyter-base: make it there ($("$VENV/bin/python" -c 'from lxdspawner.recipes import ensure_image_command as e; print(e())')), or give --skip-image"
    if [ -n "$from_bundle" ]; then
        [ -f "$from_bundle/image/rootfs.squashfs" ] || die "the bundle has no image (it was made with --skip-image)"
        incus image import "$from_bundle/image/meta.tar.xz" "$from_bundle/image/rootfs.squashfs" --alias jupyter-base
    else
        VENV=$VENV "$("$VENV/bin/python" -c 'from lxdspawner.recipes import images_dir; print(images_dir())')/ensure-image.sh" jupyter-base incus
    fi
    changed "image jupyter-base imported"
}

# -- the hub's virtualenv ----------------------------------------------------------------------

pip_install() {
    local args=(-q --disable-pip-version-check --root-user-action=ignore)
    [ -n "$from_bundle" ] && args+=(--no-index --find-links "$from_bundle/wheels")
    "$VENV/bin/pip" install "${args[@]}" "$@" >&2
}

step_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
        changed "created the virtualenv $VENV"
    fi
    local missing=() pkg
    for pkg in "${PIP_WANTED[@]}"; do
        "$VENV/bin/python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$pkg" \
            2>/dev/null || missing+=("$pkg")
    done
    if [ "$upgrade" = 1 ]; then
        local before
        before=$("$VENV/bin/pip" freeze 2>/dev/null)
        pip_install --upgrade "${PIP_WANTED[@]}"
        if [ "$before" != "$("$VENV/bin/pip" freeze 2>/dev/null)" ]; then
            changed "upgraded $VENV: $(diff <(echo "$before") <("$VENV/bin/pip" freeze) | sed -n 's/^> //p' | tr '\n' ' ')"
        else
            ok "$VENV is up to date"
        fi
    elif [ ${#missing[@]} -gt 0 ]; then
        pip_install "${missing[@]}"
        changed "installed in $VENV: ${missing[*]}"
    else
        ok "virtualenv $VENV has ${PIP_WANTED[*]}"
    fi
    pkgdir=$("$VENV/bin/python" -c 'import lxdspawner, os; print(os.path.dirname(lxdspawner.__file__))')/install
    [ -f "$pkgdir/jupyterhub_config.py" ] || die "$pkgdir: the installer's files are missing"
}

# -- files -------------------------------------------------------------------------------------

# install_file SRC DEST MODE: DEST becomes SRC (ours: units); says whether it changed.
install_file() {
    if cmp -s "$1" "$2"; then
        ok "$2"
        return 1
    fi
    mkdir -p "$(dirname "$2")"
    install -m "$3" "$1" "$2"
    changed "wrote $2"
}

# install_new_file SRC DEST MODE: a file the operator edits. Written when missing; else a
# different SRC goes beside it as DEST.new (reported), and DEST is never touched.
install_new_file() {
    mkdir -p "$(dirname "$2")"
    if [ ! -e "$2" ]; then
        install -m "$3" "$1" "$2"
        changed "wrote $2"
    elif cmp -s "$1" "$2"; then
        ok "$2"
        rm -f "$2.new"
    elif cmp -s "$1" "$2.new"; then
        ok "$2 (yours; the installer's version is in $2.new)"
    else
        install -m "$3" "$1" "$2.new"
        changed "kept your $2; the installer's new version is $2.new (compare: diff $2 $2.new)"
    fi
}

# render TEMPLATE: the template with the install's values.
render() {
    sed -e "s|@VENV@|$VENV|g" -e "s|@HUB_ADDRESS@|$hub_address|g" \
        -e "s|@ENDPOINT@|unix://$daemon_socket|g" -e "s|@HUB_ID@|$hub_id|g" \
        -e "s|@ISOLATION@|$isolation|g" "$1"
}

# env_secret FILE NAME: NAME=<random> in FILE (mode 0600) unless it has NAME already.
env_secret() {
    local file=$1 name=$2
    mkdir -p "$(dirname "$file")"
    touch "$file"
    if [ "$(stat -c %a "$file")" != 600 ]; then
        chmod 0600 "$file"
    fi
    if grep -q "^$name=" "$file"; then
        ok "$name in $file"
    else
        printf '%s=%s\n' "$name" "$(random_hex)" >>"$file"
        changed "generated $name into $file (mode 0600)"
    fi
}

# -- addresses ---------------------------------------------------------------------------------

step_addresses() {
    if [ -z "$address" ]; then
        address=$(ip -4 route get 192.0.2.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1)
        [ -n "$address" ] || address=$(ip -4 -o addr show scope global | awk '{sub("/.*", "", $4); print $4; exit}')
        [ -n "$address" ] || die "no IPv4 address found here: give --address"
    fi
    if [ -z "$hub_address" ]; then
        if [ "$daemon_socket" = /var/lib/incus/unix.socket ] && command -v incus >/dev/null; then
            local bridge
            bridge=$(incus profile device get default eth0 network 2>/dev/null || true)
            hub_address=$(incus network get "${bridge:-jupyterbr0}" ipv4.address 2>/dev/null | cut -d/ -f1)
        fi
        [ -n "$hub_address" ] || hub_address=$address
    fi
    [ -n "$hub_id" ] || hub_id="jupyterhub-$(hostname -s | tr -c 'A-Za-z0-9-\n' '-')"
    ok "HTTPS on ${domain:-$address}, the hub's API on $hub_address:8081, hub id $hub_id"
}

# -- the proxy ---------------------------------------------------------------------------------

step_proxy() {
    local chp="$VENV/proxy/node_modules/configurable-http-proxy/bin/configurable-http-proxy"
    if [ -x "$chp" ] && [ "$upgrade" = 0 ]; then
        ok "configurable-http-proxy $(node "$chp" --version 2>/dev/null || echo '?')"
    elif [ -n "$from_bundle" ]; then
        if [ -x "$chp" ] && cmp -s "$from_bundle/chp.tar.gz" "$STATE/chp.tar.gz"; then
            ok "configurable-http-proxy is the bundle's"
        else
            rm -rf "$VENV/proxy"
            mkdir -p "$VENV/proxy" "$STATE"
            tar -C "$VENV/proxy" --no-same-owner -xzf "$from_bundle/chp.tar.gz"
            cp "$from_bundle/chp.tar.gz" "$STATE/chp.tar.gz"
            changed "installed configurable-http-proxy $(node "$chp" --version) into $VENV/proxy"
        fi
    else
        apt_install npm
        local before=""
        [ -x "$chp" ] && before=$(node "$chp" --version)
        npm install --prefix "$VENV/proxy" --no-audit --no-fund --loglevel=error "$CHP_SPEC" >&2
        if [ "$before" != "$(node "$chp" --version)" ]; then
            changed "installed configurable-http-proxy $(node "$chp" --version) into $VENV/proxy"
        else
            ok "configurable-http-proxy $before"
        fi
    fi
    env_secret "$ETC/proxy.env" CONFIGPROXY_AUTH_TOKEN
    local tmp
    tmp=$(mktemp)
    render "$pkgdir/jupyterhub-proxy.service" >"$tmp"
    if install_file "$tmp" /etc/systemd/system/jupyterhub-proxy.service 0644; then
        systemctl daemon-reload
        # Only when its unit changed: restarting the proxy drops every user's connections.
        systemctl enable -q jupyterhub-proxy.service
        systemctl restart jupyterhub-proxy.service
        changed "(re)started jupyterhub-proxy.service"
    fi
    rm -f "$tmp"
    if ! systemctl is-active -q jupyterhub-proxy.service; then
        systemctl enable -q --now jupyterhub-proxy.service
        changed "started jupyterhub-proxy.service"
    fi
}

# -- PostgreSQL --------------------------------------------------------------------------------

psql_q() { (cd / && runuser -u postgres -- psql -X -q -t -A -v ON_ERROR_STOP=1 -c "$1"); }

step_postgres() {
    if ! systemctl is-active -q postgresql; then
        systemctl enable -q --now postgresql
        changed "started PostgreSQL"
    fi
    env_secret "$ETC/environment" JUPYTERHUB_DB_PASSWORD
    local password
    password=$(sed -n 's/^JUPYTERHUB_DB_PASSWORD=//p' "$ETC/environment" | tail -n 1)
    [[ $password =~ ^[0-9a-f]+$ ]] || die "JUPYTERHUB_DB_PASSWORD in $ETC/environment: hex digits only, please"
    local i
    for i in $(seq 1 60); do
        psql_q 'select 1' >/dev/null 2>&1 && break
        sleep 0.5
    done
    if [ "$(psql_q "select 1 from pg_roles where rolname = 'jupyterhub'")" != 1 ]; then
        psql_q "create role jupyterhub login password '$password'"
        changed "created PostgreSQL role jupyterhub"
    elif ! PGPASSWORD=$password psql -X -h 127.0.0.1 -U jupyterhub -d postgres -c 'select 1' >/dev/null 2>&1; then
        psql_q "alter role jupyterhub login password '$password'"
        changed "set PostgreSQL role jupyterhub's password (from $ETC/environment)"
    else
        ok "PostgreSQL role jupyterhub"
    fi
    if [ "$(psql_q "select 1 from pg_database where datname = 'jupyterhub'")" != 1 ]; then
        (cd / && runuser -u postgres -- createdb -O jupyterhub jupyterhub)
        changed "created PostgreSQL database jupyterhub"
    else
        ok "PostgreSQL database jupyterhub"
    fi
}

# -- the hub -----------------------------------------------------------------------------------

step_hub() {
    local tmp fingerprint
    if ! getent group jupyterhub-users >/dev/null; then
        groupadd --system jupyterhub-users
        changed "created group jupyterhub-users (who may log in: usermod -aG jupyterhub-users NAME)"
    fi
    tmp=$(mktemp)
    render "$pkgdir/jupyterhub_config.py" >"$tmp"
    install_new_file "$tmp" "$ETC/jupyterhub_config.py" 0644
    render "$pkgdir/jupyterhub.service" >"$tmp"
    if install_file "$tmp" /etc/systemd/system/jupyterhub.service 0644; then
        systemctl daemon-reload
    fi
    rm -f "$tmp"
    # The hub restarts when what it runs changed: its packages, config, unit or secrets.
    fingerprint=$({ "$VENV/bin/pip" freeze 2>/dev/null; cat "$ETC/jupyterhub_config.py" \
        /etc/systemd/system/jupyterhub.service "$ETC/proxy.env" "$ETC/environment"; } | sha256sum)
    mkdir -p "$STATE"
    systemctl enable -q jupyterhub.service
    if ! systemctl is-active -q jupyterhub.service; then
        systemctl start jupyterhub.service
        changed "started jupyterhub.service"
    elif [ "$fingerprint" != "$(cat "$STATE/hub.fingerprint" 2>/dev/null)" ]; then
        # Only the hub: the proxy and the users' servers stay up (cleanup_servers = False).
        systemctl restart jupyterhub.service
        changed "restarted jupyterhub.service (its packages, config or unit changed)"
    else
        ok "jupyterhub.service running"
    fi
    printf '%s\n' "$fingerprint" >"$STATE/hub.fingerprint"
}

# -- Caddy -------------------------------------------------------------------------------------

step_caddy() {
    local tmp site
    tmp=$(mktemp)
    {
        cat "$pkgdir/Caddyfile"
        echo
        if [ -n "$domain" ]; then
            # A public name: a certificate from Let's Encrypt (ports 80 and 443 reachable),
            # or from the ACME CA of --acme-ca; Caddy redirects HTTP to HTTPS by itself.
            printf '%s {\n' "$domain"
            if [ -n "$acme_ca" ]; then
                printf '\ttls {\n\t\tca %s\n' "$acme_ca"
                [ -z "$acme_ca_root" ] || printf '\t\tca_root /etc/caddy/acme-ca-root.pem\n'
                printf '\t}\n'
            fi
            printf '\treverse_proxy 127.0.0.1:8000\n}\n'
        else
            site=$address
            [[ $site == *:* ]] && site="[$site]"
            printf 'https://%s {\n\ttls internal\n\treverse_proxy 127.0.0.1:8000\n}\n\n' "$site"
            printf 'http://%s {\n\tredir https://{host}{uri} permanent\n}\n' "$site"
        fi
    } >"$tmp"
    mkdir -p "$STATE"
    local dest=/etc/caddy/Caddyfile reload=0
    if [ -n "$acme_ca_root" ] && install_file "$acme_ca_root" /etc/caddy/acme-ca-root.pem 0644; then
        reload=1
    fi
    # Debian's Caddyfile, or the one we wrote last, is replaced; one the operator edited is not.
    local debian_md5
    debian_md5=$(dpkg-query -W -f='${Conffiles}' caddy 2>/dev/null | awk '$1 == "/etc/caddy/Caddyfile" {print $2}')
    if cmp -s "$tmp" "$dest"; then
        ok "$dest"
    elif [ ! -e "$dest" ] || cmp -s "$dest" "$STATE/Caddyfile" ||
        [ "$(md5sum <"$dest" | cut -d' ' -f1)" = "$debian_md5" ]; then
        install -m 0644 "$tmp" "$dest"
        changed "wrote $dest (HTTPS on ${domain:-$address})"
        reload=1
    else
        install_new_file "$tmp" "$dest" 0644
    fi
    if cmp -s "$tmp" "$dest"; then
        cp "$tmp" "$STATE/Caddyfile"
    fi
    rm -f "$tmp"
    if ! systemctl is-active -q caddy; then
        systemctl enable -q --now caddy
        changed "started Caddy"
    elif [ "$reload" = 1 ]; then
        systemctl reload-or-restart caddy
        say "reloaded Caddy"
    fi
}

# -- run ---------------------------------------------------------------------------------------

step_debs
step_venv
step_daemon
step_image
step_addresses
step_proxy
step_postgres
step_hub
step_caddy
if [ "$changes" = 0 ]; then
    say "nothing changed: the install is complete and up to date"
else
    say "done ($changes changes): https://${domain:-$address}/ (logs: journalctl -u jupyterhub -u jupyterhub-proxy -u caddy)"
fi

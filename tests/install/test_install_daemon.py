"""The installer's own daemon: Incus from bookworm-backports, initialised from the preseed.

tests/install/test_install.py gives the installer the host's Incus (``--daemon-socket``). Here
the installer sets up the daemon itself, as on a fresh Debian 12 host: in a fresh Debian 12
system container with nesting (the same cached image and offline bundle as that test; the
bundle carries Incus' packages because the host's apt has bookworm-backports), ``install.sh
--from-bundle`` without ``--daemon-socket`` installs Incus from the bundle, initialises it from
/etc/lxdspawner/incus-preseed.yaml, and points the hub at it. Then, as the operator would:

- ``lxdspawner doctor`` inside, on the hub's own config, finds that daemon (Incus, its socket),
  the preseed's pool and the preseed's bridge with its gateway, and the image (the bench's
  busybox image lxdspawner-tiny, imported there, stands in for jupyter-base, whose 140 MB
  import into the nested daemon would double the test's time);
- the hub's unit is running, driving that daemon;
- ``--domain hub.test --acme-ca URL --acme-ca-root FILE`` switches HTTPS to that name with a
  certificate from an ACME CA: a second Caddy in the container is that CA (``acme_server``;
  no public CA is reachable from here), and the hub's API answers at https://hub.test/ with a
  certificate that only that CA's root verifies (Caddy's internal CA would fail);
- a second run changes nothing.

What this container cannot show: the preseed's btrfs pool (a loop file needs /dev/loop-control,
which an unprivileged container has not), so the operator's edit the preseed's comment allows
(``driver: dir``) is made before the first run and the shipped file lands beside it as .new; and
a container started on the nested daemon (this host mounts cgroup v1 with cpu and cpuacct apart,
and liblxc in the nested daemon fails to set up cgroups there: "Failed to open 9/cpuacct"), so
doctor runs with ``--no-probe``.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time

import pytest

from lxdspawner.recipes import images_dir
from testbench.hubtools import REPO

from .test_install import BUNDLE, installer_lines, prepare, run, run_quiet

pytestmark = [pytest.mark.install, pytest.mark.exclusive]

PRESEED = REPO / "lxdspawner" / "install" / "incus-preseed.yaml"


BOOTED = (
    "until case $(systemctl is-system-running --wait 2>/dev/null) in running|degraded) true;; "
    "*) false;; esac; do sleep 0.2; done"
)
ACME_DIR = "/srv/acme-ca"
ACME_ROOT = f"{ACME_DIR}/caddy/pki/authorities/local/root.crt"
ACME_URL = "https://acme.test:9443/acme/local/directory"
#: A Caddy that is an ACME CA (its own ports: the hub's Caddy has 80, 443 and 2019).
ACME_CADDYFILE = """{
	admin off
	http_port 9080
	auto_https disable_redirects
	skip_install_trust
}
https://acme.test:9443 {
	tls internal
	acme_server
}
"""
#: GET https://hub.test/hub/api trusting only the file argv[1], until Caddy has its certificate.
FETCH = """
import http.client, ssl, sys, time
context = ssl.create_default_context(cafile=sys.argv[1])
deadline = time.monotonic() + 90
while True:
    try:
        conn = http.client.HTTPSConnection("hub.test", context=context, timeout=10)
        conn.request("GET", "/hub/api")
        print(conn.getresponse().status, conn.sock.getpeercert()["issuer"])
        break
    except (OSError, ssl.SSLError) as e:
        if time.monotonic() > deadline:
            sys.exit(f"no certificate from the ACME CA: {e}")
        time.sleep(0.5)
"""


def dir_pool_preseed() -> str:
    """The shipped preseed with its pool's driver changed to ``dir`` (and no loop-file size)."""
    text = PRESEED.read_text()
    assert "    driver: btrfs\n    config:\n      size: 50GiB\n" in text, "the preseed changed"
    return text.replace("    driver: btrfs\n    config:\n      size: 50GiB\n", "    driver: dir\n")


def test_install_sets_up_incus_from_the_preseed():
    started = time.monotonic()
    image, _ = prepare()
    tiny = run(str(images_dir() / "build-image.sh"), "lxdspawner-tiny").strip().splitlines()[-1]
    name = f"lxdsp-test-installd-{secrets.token_hex(4)}"
    hub_id = f"testbench-installd-{secrets.token_hex(4)}"
    cli = ("incus",)
    try:
        run(*cli, "init", image, name, "-c", "security.nesting=true",
            "-c", "security.syscalls.intercept.mknod=true",
            "-c", "security.syscalls.intercept.setxattr=true")  # fmt: skip
        run(*cli, "config", "device", "add", name, "bundle", "disk",
            f"source={BUNDLE}", "path=/mnt/bundle", "readonly=true")  # fmt: skip
        run(*cli, "start", name)

        def inside(*args: str, input: str | None = None, timeout: float = 900) -> str:
            return run(*cli, "exec", name, "--", *args, input=input, timeout=timeout)

        # Until systemd has booted ("offline" before its bus is up: --wait does not wait for
        # that, and an install started meanwhile lost its /tmp to systemd-tmpfiles).
        inside("sh", "-c", BOOTED, timeout=120)
        inside("sh", "-c", "mkdir -p /etc/lxdspawner && cat >/etc/lxdspawner/incus-preseed.yaml",
               input=dir_pool_preseed())  # fmt: skip
        # HTTPS on loopback: this test needs nothing of the host's bridge.
        install = ("bash", "/mnt/bundle/install.sh", "--from-bundle", "/mnt/bundle",
                   "--skip-image", "--address", "127.0.0.1", "--hub-id", hub_id)  # fmt: skip
        first = installer_lines(inside(*install))
        print("\n".join(first))
        assert any("changed: installed Incus: incus-base" in line for line in first), first
        assert any(
            "changed: initialised Incus from /etc/lxdspawner/incus-preseed.yaml" in line
            for line in first
        ), first
        assert any("the hub's API on 10.220.0.1:8081" in line for line in first), first
        installed = time.monotonic()

        inside("mkdir", "-p", "/root/tiny")
        for part in ("meta.tar.xz", "rootfs.squashfs"):
            run(*cli, "file", "push", "-q", f"{tiny}/{part}", f"{name}/root/tiny/{part}")
        inside("incus", "image", "import", "/root/tiny/meta.tar.xz", "/root/tiny/rootfs.squashfs",
               "--alias", "lxdspawner-tiny")  # fmt: skip
        config = "load_subconfig('/etc/jupyterhub/jupyterhub_config.py')\n"
        config += "c.LxdSpawner.image = 'lxdspawner-tiny'\n"
        inside("sh", "-c", "cat >/root/tiny_config.py", input=config)
        doctor = "lxdspawner doctor -f /root/tiny_config.py --no-probe --format json"
        done = subprocess.run(
            [*cli, "exec", name, "--", "sh", "-c",
             f"set -a; . /etc/jupyterhub/environment; exec /opt/jupyterhub/bin/{doctor}"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.stdout.startswith("["), done.stdout + done.stderr
        rows = json.loads(done.stdout)
        found = {(r["check"], r["severity"]): r["what"] for r in rows}
        print("\n".join(f"{r['severity']:8} {r['check']:8} {r['what']}" for r in rows))
        assert "Incus" in found[("daemon", "ok")], rows
        assert "/var/lib/incus/unix.socket" in found[("daemon", "ok")], rows
        # The preseed's pool (dir: a warning naming its cost, which is the operator's choice).
        assert "pool 'jupyterhub' uses the dir driver" in found[("storage", "warning")], rows
        assert found[("network", "ok")] == "eth0 on jupyterbr0, gateway 10.220.0.1", rows
        assert "lxdspawner-tiny" in found[("image", "ok")], rows
        assert not [r for r in rows if r["severity"] == "error"], rows
        assert inside("systemctl", "is-active", "jupyterhub").strip() == "active"

        # --domain with an ACME CA of our own (a second Caddy, acme_server, in a transient
        # unit: no public CA is reachable from here): a run switches HTTPS to that name, and
        # Caddy gets its certificate from that CA (HTTP-01 or TLS-ALPN on this container).
        inside(
            "sh", "-c", f"mkdir -p {ACME_DIR} && cat >{ACME_DIR}/Caddyfile", input=ACME_CADDYFILE
        )
        inside("sh", "-c", "echo '127.0.0.1 hub.test acme.test' >>/etc/hosts")
        inside("systemd-run", "--unit=lxdsp-acme-ca", f"--setenv=XDG_DATA_HOME={ACME_DIR}",
               f"--setenv=XDG_CONFIG_HOME={ACME_DIR}", "/usr/bin/caddy", "run",
               "--adapter", "caddyfile", "--config", f"{ACME_DIR}/Caddyfile")  # fmt: skip
        inside("sh", "-c", f"until [ -s {ACME_ROOT} ]; do sleep 0.2; done", timeout=60)
        domain = (*install, "--domain", "hub.test", "--acme-ca", ACME_URL,
                  "--acme-ca-root", ACME_ROOT)  # fmt: skip
        switched = installer_lines(inside(*domain))
        print("\n".join(switched))
        assert any("changed: wrote /etc/caddy/Caddyfile (HTTPS on hub.test)" in line
                   for line in switched), switched  # fmt: skip
        caddyfile = inside("cat", "/etc/caddy/Caddyfile")
        assert f"hub.test {{\n\ttls {{\n\t\tca {ACME_URL}\n" in caddyfile, caddyfile
        inside("caddy", "validate", "--adapter", "caddyfile", "--config", "/etc/caddy/Caddyfile")
        # The hub's API over HTTPS at hub.test, its certificate checked against our CA's
        # root only: Caddy's internal CA (another root) would fail this.
        fetched = inside("/opt/jupyterhub/bin/python", "-c", FETCH, ACME_ROOT, timeout=120)
        assert fetched.startswith("200 "), fetched

        second = installer_lines(inside(*domain))
        assert not [line for line in second if ": changed:" in line], second
        assert "nothing changed" in second[-1], second
        print(
            f"timings: prepare+install {installed - started:.0f} s, "
            f"total {time.monotonic() - started:.0f} s"
        )
    except BaseException:
        journal = run_quiet(*cli, "exec", name, "--", "journalctl", "--no-pager", "-n", "80",
                            "-u", "incus", "-u", "jupyterhub")  # fmt: skip
        print(journal[-8000:])
        raise
    finally:
        run_quiet(*cli, "delete", "--force", name)

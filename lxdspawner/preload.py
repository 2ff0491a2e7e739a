"""A warm pool member's server, before and after its user claims it (see pool.py).

Not imported by the hub: pushed into each pool member (``/etc/lxdspawner/preload.py``) and run
by its unit as root with the image's ``python3``. It imports what the single-user server
imports (JupyterHub's single-user code, Jupyter Server, JupyterLab's server extension: about
2 s of a spawn), then waits for the claim the hub writes (``/etc/lxdspawner/claim/claim.json``,
root's). On a claim it makes the home (as root, as the usual unit's ExecStartPre does, only
where nothing is), drops to the user's gid and uid, and only then reads the user's environment
file (the user's, 0600: the token is in it), changes to the home and runs the server in this
process, with the argv the usual unit would give it.

Standard library only, Python 3.9 and later (whatever the image holds).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

CLAIM = "/etc/lxdspawner/claim/claim.json"
#: How often the claim is looked for: a stat every 20 ms costs nothing and bounds the delay.
INTERVAL = 0.02
#: The modules the single-user server imports, in order; those the image lacks are skipped.
PRELOAD = (
    "jupyter_server.serverapp",
    "jupyterhub.singleuser.mixins",
    "jupyterhub.singleuser.extension",
    "jupyterhub.singleuser",
    "jupyterlab",
    "jupyterlab.labapp",
    "jupyterlab_server",
    "jupyter_server_terminals",
    "jupyter_lsp",
    "notebook_shim",
    "jupyter_server.services.contents.largefilemanager",
    "jupyter_server.services.kernels.kernelmanager",
)
#: Environment variables that decide, at import, how jupyterhub.singleuser runs the server.
IMPORT_TIME_ENV = ("JUPYTERHUB_SINGLEUSER_APP", "JUPYTERHUB_SINGLEUSER_EXTENSION")


def log(message: str) -> None:
    print(f"lxdspawner preload: {message}", file=sys.stderr, flush=True)


def preload() -> None:
    started = time.monotonic()
    loaded = []
    for module in PRELOAD:
        try:
            importlib.import_module(module)
            loaded.append(module)
        except Exception as e:  # an image without JupyterLab, say: the server imports less
            log(f"not preloaded: {module}: {e.__class__.__name__}: {e}")
    log(f"preloaded {len(loaded)} modules in {time.monotonic() - started:.2f} s; waiting")


def wait_for_claim() -> dict:
    while True:
        try:
            with open(CLAIM, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            pass
        except ValueError:
            pass  # still being written: the hub's write is not atomic
        time.sleep(INTERVAL)


def become(claim: dict) -> None:
    uid, gid = int(claim["uid"]), int(claim["gid"])
    if uid == 0 and not claim.get("allow_uid0"):
        raise SystemExit("refusing uid 0: root is not allowed (min_uid)")
    if gid == 0 and not claim.get("allow_gid0"):
        raise SystemExit("refusing gid 0: group root is not allowed (min_gid)")
    made = subprocess.run(claim["make_home"], check=False)
    if made.returncode != 0:
        log(f"could not create the home {claim['home']!r} (exit {made.returncode})")
    # Groups first: once the uid is the user's, nothing else can be changed. The image's
    # account of the uid, if any, gives its supplementary groups, as systemd's User= does.
    account = _account(uid)
    if account is not None:
        os.initgroups(account.pw_name, gid)
    else:
        os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getegid() != gid:
        raise SystemExit("could not switch to the user's ids")


def _account(uid: int):
    import pwd

    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def load_environment(claim: dict) -> None:
    # Read as the user: the file is the user's (0600), and nothing of root's is opened
    # on a path the user could have replaced.
    with open(claim["env"], "rb") as f:
        env = json.loads(f.read())
    os.environ.clear()
    os.environ["PATH"] = claim["path"]
    account = _account(os.getuid())
    if account is not None:  # what systemd's User= sets (the hub's HOME comes below)
        os.environ.update(USER=account.pw_name, LOGNAME=account.pw_name, SHELL=account.pw_shell)
    os.environ.update({str(k): str(v) for k, v in env.items()})
    if any(k in os.environ for k in IMPORT_TIME_ENV):
        # Decided at import from the (then empty) environment: decide again.
        for name in [m for m in sys.modules if m == "jupyterhub.singleuser"]:
            del sys.modules[name]


def serve(claim: dict) -> None:
    argv = [str(a) for a in claim["argv"]]
    try:
        os.chdir(claim["home"])
    except OSError as e:
        log(f"cannot enter the home {claim['home']!r}: {e}; starting in /")
        os.chdir("/")
    if not argv or os.path.basename(argv[0]) != "jupyterhub-singleuser":
        os.execvp(argv[0], argv)  # noqa: S606 - another command (c.Spawner.cmd): nothing preloaded for it
    try:
        from jupyterhub.singleuser import main
    except ImportError as e:
        log(f"jupyterhub.singleuser cannot be imported here ({e}); running {argv[0]}")
        os.execvp(argv[0], argv)  # noqa: S606 - the argv, no shell
    sys.argv = argv
    sys.exit(main())


def run() -> None:
    os.umask(0o022)
    preload()
    claim = wait_for_claim()
    log("claimed")
    become(claim)
    load_environment(claim)
    serve(claim)


if __name__ == "__main__":
    run()

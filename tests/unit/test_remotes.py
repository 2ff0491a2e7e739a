"""Several remotes: the incus/lxc command line's configuration read from a temporary
directory with real (generated) certificates, every error naming its file, the search order,
the ``remotes`` setting's checks, and the spawner choosing and recording its daemon by
``remote``. The real daemons' version is tests/cluster/test_remotes.py."""

from __future__ import annotations

import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fakes import eventually
from test_spawner_config import spawner
from test_spawner_inprocess import fails, hub_daemon, server_answers  # noqa: F401
from test_spawner_inprocess import spawner as inprocess
from traitlets import TraitError

from lxdspawner.failures import SpawnError
from lxdspawner.lxd import LxdClient, Remote
from lxdspawner.lxd.cliremotes import CliRemoteError, config_dirs, resolve
from lxdspawner.remotes import UnknownRemote, choose


def _pem_pair(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


CONFIG = """\
default-remote: local
remotes:
  campus:
    addr: https://10.117.99.1:8443
    protocol: incus
    project: jupyter
    public: false
  images:
    addr: https://images.linuxcontainers.org
    protocol: simplestreams
    public: true
  sock:
    addr: unix:///run/other/unix.socket
  nocert:
    addr: https://10.117.99.2:8443
  oidc:
    addr: https://10.117.99.3:8443
    auth_type: oidc
"""


def _conf_dir(path: Path, config: str = CONFIG, *, client: bool = True) -> Path:
    (path / "servercerts").mkdir(parents=True)
    path.joinpath("config.yml").write_text(config)
    if client:
        crt, key = _pem_pair("hub")
        path.joinpath("client.crt").write_bytes(crt)
        path.joinpath("client.key").write_bytes(key)
    path.joinpath("servercerts", "campus.crt").write_bytes(_pem_pair("campus")[0])
    return path


@pytest.fixture
def incus_conf(tmp_path: Path) -> dict[str, str]:
    return {"INCUS_CONF": str(_conf_dir(tmp_path / "incus")), "HOME": str(tmp_path / "home")}


def test_a_cli_remote_is_read_with_its_certificates(incus_conf):
    conf = Path(incus_conf["INCUS_CONF"])
    remote = resolve("campus", incus_conf)
    assert remote == Remote(
        "https://10.117.99.1:8443",
        "jupyter",
        str(conf / "client.crt"),
        str(conf / "client.key"),
        str(conf / "servercerts" / "campus.crt"),
    )
    # The files are real: the client's TLS context loads them (and pins the server's).
    LxdClient(remote.endpoint, **{k: getattr(remote, k) for k in
              ("project", "client_cert", "client_key", "server_cert")})._ssl_context()  # fmt: skip
    # No servercerts/<name>.crt: the system's CAs, as the tool does.
    assert resolve("nocert", incus_conf).server_cert == ""
    assert resolve("sock", incus_conf) == Remote("unix:///run/other/unix.socket")


def test_local_is_the_tools_own_socket(incus_conf):
    env = {**incus_conf, "INCUS_SOCKET": "/run/mine/unix.socket"}
    assert resolve("local", env) == Remote("unix:///run/mine/unix.socket")


@pytest.mark.parametrize(
    "name, words",
    [
        ("images", ["image server", "simplestreams"]),
        ("oidc", ["auth_type 'oidc'"]),
        ("nowhere", ["'nowhere' is in none of", "campus", "images"]),
    ],
)
def test_every_error_names_the_file(incus_conf, name, words):
    with pytest.raises(CliRemoteError) as e:
        resolve(name, incus_conf)
    assert str(Path(incus_conf["INCUS_CONF"]) / "config.yml") in e.value.message
    for word in words:
        assert word in e.value.message


def test_missing_config_and_certificates_are_named(tmp_path):
    env = {"INCUS_CONF": str(tmp_path / "none"), "HOME": str(tmp_path / "home")}
    with pytest.raises(CliRemoteError) as e:
        resolve("campus", env)
    assert str(tmp_path / "none" / "config.yml") in e.value.message
    assert str(tmp_path / "home" / ".config" / "lxc" / "config.yml") in e.value.message

    conf = _conf_dir(tmp_path / "nokey", client=False)
    with pytest.raises(CliRemoteError) as e:
        resolve("campus", {"INCUS_CONF": str(conf), "HOME": str(tmp_path)})
    assert f"client certificate {conf / 'client.crt'} is missing" in e.value.message

    bad = tmp_path / "bad"
    bad.mkdir()
    bad.joinpath("config.yml").write_text("remotes: [\n")
    with pytest.raises(CliRemoteError) as e:
        resolve("campus", {"INCUS_CONF": str(bad), "HOME": str(tmp_path)})
    assert f"{bad / 'config.yml'} is not valid YAML" in e.value.message


def test_search_order_incus_first_then_lxc(tmp_path):
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    assert [str(d.path) for d in config_dirs({**env, "INCUS_CONF": "/i", "LXD_CONF": "/l"})] == [
        "/i",
        "/l",
        str(home / ".config/incus"),
        str(home / ".config/lxc"),
        str(home / "snap/lxd/common/config"),
    ]
    _conf_dir(home / ".config" / "incus")
    _conf_dir(
        home / "snap" / "lxd" / "common" / "config",
        "remotes:\n  campus: {addr: 'https://lxd:8443'}\n  lxdonly: {addr: 'unix://'}\n",
    )
    # Both define campus: Incus' wins; a name only lxc knows is found in lxc's.
    assert resolve("campus", env).endpoint == "https://10.117.99.1:8443"
    assert resolve("lxdonly", env).endpoint.startswith("unix:///")
    assert "lxd" in resolve("lxdonly", env).endpoint


@pytest.mark.parametrize(
    "value, words",
    [
        ({"campus": {"endpont": "x"}}, ["remotes['campus']['endpont']", "unknown key"]),
        ({"campus": {"endpoint": 8443}}, ["remotes['campus']['endpoint'] = 8443", "string"]),
        ({"campus": "https://x:8443"}, ["remotes['campus']", "must be a dict"]),
    ],
)
def test_the_remotes_setting_is_checked(value, words):
    with pytest.raises(TraitError) as e:
        spawner(remotes=value)
    for word in words:
        assert word in str(e.value)


def test_choose_a_remote_by_name(incus_conf):
    remotes = {"lxd": {"endpoint": "unix:///var/lib/lxd/unix.socket"},
               "cli": {"endpoint": "campus", "project": "other"}}  # fmt: skip
    default = {"endpoint": "", "project": ""}
    assert choose("", remotes, default, environ=incus_conf) == Remote()
    assert choose("lxd", remotes, default) == Remote("unix:///var/lib/lxd/unix.socket")
    cli = choose("cli", remotes, default, environ=incus_conf)  # the given project wins
    assert (cli.endpoint, cli.project) == ("https://10.117.99.1:8443", "other")
    assert choose("campus", remotes, default, environ=incus_conf).project == "jupyter"
    with pytest.raises(UnknownRemote) as e:
        choose("gpu", remotes, default, environ=incus_conf)
    assert "remote = 'gpu'" in str(e.value)
    assert all(f"'{n}'" in str(e.value) for n in ("lxd", "cli", "campus", "sock"))
    assert "'images'" not in str(e.value).split("The command line's")[0]  # an image server


def test_the_spawner_starts_on_the_remote_it_names_and_records_it(monkeypatch, incus_conf):
    monkeypatch.setenv("INCUS_CONF", incus_conf["INCUS_CONF"])
    remotes = {"lxd": {"endpoint": "unix:///var/lib/lxd/unix.socket"}}
    s = spawner(remotes=remotes, remote="lxd")
    s.user = SimpleNamespace(name="ann")
    daemon = s._daemon_to_start_on()
    assert daemon.remote == Remote("unix:///var/lib/lxd/unix.socket")
    s.instance_name, s.recorded_remote = "jupyter-ann", daemon.remote
    state = s.get_state()
    assert state["remote_name"] == "lxd"

    # The hub restarts; the profile now says another remote: the server stays where it is.
    later = spawner(remotes=remotes, remote="campus")
    later.load_state(state)
    assert later.daemon().remote == Remote("unix:///var/lib/lxd/unix.socket")
    assert later.recorded_remote_name == "lxd"
    assert later.get_state()["remote_name"] == "lxd"

    s.remote = "campus"  # a command-line remote, not in remotes
    assert s._daemon_to_start_on().remote.endpoint == "https://10.117.99.1:8443"

    s.remote = "gpu"
    with pytest.raises(SpawnError) as e:
        s._daemon_to_start_on()
    assert e.value.status_code == 400
    assert "remote = 'gpu'" in e.value.message and "'lxd'" in e.value.message


def test_a_default_endpoint_may_name_a_cli_remote(monkeypatch, incus_conf):
    monkeypatch.setenv("INCUS_CONF", incus_conf["INCUS_CONF"])
    s = spawner(endpoint="campus", project="p2")
    assert s.configured_remote.endpoint == "https://10.117.99.1:8443"
    assert s.configured_remote.project == "p2"


async def test_a_named_remote_that_is_down_is_named_and_its_server_stays(hub_daemon, fake):  # noqa: F811
    """In-process, with the in-memory daemon as the remote "far" (the default points
    elsewhere): a spawn there while it is down fails at once, naming it; once it is back the
    server starts there and records it; down again, poll reports it running (it cannot tell)
    and a new spawn there fails at once, naming it; nothing is deleted."""
    settings = {"endpoint": "unix:///nowhere.sock", "remotes": {"far": {"endpoint": fake.endpoint}}}
    fake.down = True
    error, _ = await fails(inprocess(fake, remote="far", **settings))
    assert error.status_code == 503
    assert str(error).startswith("remote 'far': the container daemon is not reachable: ")
    fake.down = False
    s = inprocess(fake, remote="far", **settings)
    await s.start()
    state = s.get_state()
    assert (state["remote_name"], state["endpoint"]) == ("far", fake.endpoint)
    later = inprocess(fake, **settings)  # a restarted hub, `remote` back to the default
    later.load_state(state)
    fake.down = True
    fake.drop_events()  # the connection and the event stream drop
    cache = await hub_daemon.cache()
    await eventually(lambda: not cache.healthy)
    assert await later.poll() is None
    error, _ = await fails(inprocess(fake, "bob", remote="far", **settings))
    assert str(error).startswith("remote 'far': the container daemon is not reachable: ")
    assert list(fake.instances) == ["jupyter-ana"]
    fake.down = False


def test_the_command_takes_a_cli_remote_as_its_endpoint(monkeypatch, incus_conf, capsys):
    from lxdspawner import cli

    for key, value in incus_conf.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["list", "--endpoint", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert "remote 'nosuch' is in none of" in err and incus_conf["INCUS_CONF"] in err

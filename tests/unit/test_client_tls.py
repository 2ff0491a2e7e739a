"""``server_cert`` pins one certificate: exactly it is accepted, over HTTPS and the events
websocket, whatever signed it and whatever name it carries; nothing else is, not even a
certificate of the same key or a leaf of a CA put in ``server_cert``.

No daemon: an aiohttp server on 127.0.0.1 answers ``GET /1.0`` and ``/1.0/events`` as one
does, and, as a daemon does, requires a client certificate. Every certificate is made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lxdspawner.lxd import LxdClient, LxdError, Unreachable
from lxdspawner.lxd.client import CONNECTED, ServerCertificateMismatch

SERVER_INFO = {
    "type": "sync",
    "status": "Success",
    "status_code": 200,
    "metadata": {
        "api_extensions": [],
        "environment": {
            "server": "incus",
            "server_version": "6.0.4",
            "server_clustered": False,
        },
    },
}
EVENT = {"type": "lifecycle", "metadata": {"action": "instance-started"}}


# -- certificates ---------------------------------------------------------------------------


def _certificate(
    key: ec.EllipticCurvePrivateKey,
    name: str,
    *,
    issuer: x509.Certificate | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    ca: bool = False,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.SERVER_AUTH,
    names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    """PEM files: (certificate, key) pairs and the DER of the certificates."""

    directory: Path
    der: dict[str, bytes]

    def crt(self, name: str) -> str:
        return str(self.directory / f"{name}.crt")

    def key(self, name: str) -> str:
        return str(self.directory / f"{name}.key")

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.der[name]).hexdigest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    server_key, ca_key, leaf_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()) for _ in "1234"
    )
    ca = _certificate(ca_key, "test CA", ca=True)
    certificates = {
        # As the daemons make theirs: self-signed, not a CA, named "unspecified".
        "server": (
            _certificate(server_key, "root@incus", names=[x509.DNSName("unspecified")]),
            server_key,
        ),
        # The same key and name, another serial: another certificate all the same.
        "twin": (
            _certificate(server_key, "root@incus", names=[x509.DNSName("unspecified")]),
            server_key,
        ),
        "ca": (ca, ca_key),
        # Issued by the CA for this very address: a CA-based check would accept it.
        "leaf": (
            _certificate(
                leaf_key,
                "127.0.0.1",
                issuer=ca,
                issuer_key=ca_key,
                names=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            ),
            leaf_key,
        ),
        "client": (
            _certificate(client_key, "jupyterhub", usage=ExtendedKeyUsageOID.CLIENT_AUTH),
            client_key,
        ),
    }
    der = {}
    for name, (certificate, key) in certificates.items():
        (directory / f"{name}.crt").write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
        )
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        der[name] = certificate.public_bytes(serialization.Encoding.DER)
    return Pki(directory, der)


# -- a daemon's TLS front -------------------------------------------------------------------


class FakeDaemon:
    """``GET /1.0`` and ``/1.0/events`` over TLS, with a client certificate required."""

    def __init__(self, pki: Pki):
        self.pki = pki
        self.ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl.verify_mode = ssl.CERT_REQUIRED
        self.ssl.load_verify_locations(cafile=pki.crt("client"))
        self.present("server")
        #: The client certificate of each request that reached a handler.
        self.client_certificates: list[bytes] = []
        self.url = ""
        self.port = 0

    def present(self, name: str) -> None:
        """Serve that certificate from the next handshake on."""
        self.ssl.load_cert_chain(self.pki.crt(name), self.pki.key(name))

    def _seen(self, request: web.Request) -> None:
        assert request.transport is not None
        sslobj = request.transport.get_extra_info("ssl_object")
        self.client_certificates.append(sslobj.getpeercert(binary_form=True))

    async def info(self, request: web.Request) -> web.Response:
        self._seen(request)
        response = web.json_response(SERVER_INFO)
        response.force_close()  # every request makes a new connection, and so a handshake
        return response

    async def events(self, request: web.Request) -> web.WebSocketResponse:
        self._seen(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json(EVENT)
        await ws.close()
        return ws


@pytest.fixture
async def daemon(pki: Pki) -> AsyncIterator[FakeDaemon]:
    fake = FakeDaemon(pki)
    app = web.Application()
    app.router.add_get("/1.0", fake.info)
    app.router.add_get("/1.0/events", fake.events)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    fake.port = sock.getsockname()[1]
    fake.url = f"https://127.0.0.1:{fake.port}"
    await web.SockSite(runner, sock, ssl_context=fake.ssl).start()
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def client_for(daemon: FakeDaemon, pki: Pki) -> AsyncIterator:
    """A client of the fake daemon with our client certificate and a ``server_cert``."""
    clients: list[LxdClient] = []

    def make(server_cert: str) -> LxdClient:
        client = LxdClient(
            daemon.url,
            client_cert=pki.crt("client"),
            client_key=pki.key("client"),
            server_cert=server_cert,
            timeout=5,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def assert_refused(error: ServerCertificateMismatch, daemon: FakeDaemon, pinned: str, shown: str):
    pki = daemon.pki
    assert isinstance(error, Unreachable)
    assert error.expected == pki.sha256(pinned)
    assert error.presented == pki.sha256(shown)
    assert error.message == (
        f"the server at {daemon.url} presented certificate sha256:{pki.sha256(shown)}, "
        f"but server_cert {pki.crt(pinned)} pins sha256:{pki.sha256(pinned)}: they do not "
        f"match, so the connection was refused (if the daemon's certificate was replaced on "
        f"purpose, put the new one in {pki.crt(pinned)})"
    )
    assert daemon.client_certificates == [], "a request got through"


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "server",  # self-signed, named "unspecified", not 127.0.0.1
        "leaf",  # issued by a CA the client does not know
    ],
)
async def test_the_pinned_certificate_is_accepted_whatever_signed_it(daemon, client_for, name):
    daemon.present(name)
    client = client_for(daemon.pki.crt(name))
    dialect = await client.open()
    assert dialect.product == "incus"
    assert (await client.request("GET", "/1.0"))["environment"]["server_version"] == "6.0.4"
    # The daemon saw our client certificate on both connections (one per request).
    assert daemon.client_certificates == [daemon.pki.der["client"]] * 2


async def test_another_certificate_of_the_same_key_is_refused(daemon, client_for):
    daemon.present("twin")
    with pytest.raises(ServerCertificateMismatch) as refused:
        await client_for(daemon.pki.crt("server")).open()
    assert_refused(refused.value, daemon, pinned="server", shown="twin")


async def test_a_ca_in_server_cert_does_not_vouch_for_its_leaves(daemon, client_for):
    daemon.present("leaf")
    with pytest.raises(ServerCertificateMismatch) as refused:
        await client_for(daemon.pki.crt("ca")).open()
    assert_refused(refused.value, daemon, pinned="ca", shown="leaf")


async def test_the_pin_holds_for_the_events_websocket(daemon, client_for):
    client = client_for(daemon.pki.crt("server"))
    async with contextlib.aclosing(client.events(reconnect=False)) as events:
        assert (await anext(events))["type"] == CONNECTED
        assert await anext(events) == EVENT
    assert daemon.client_certificates == [daemon.pki.der["client"]]

    daemon.client_certificates.clear()
    daemon.present("twin")
    async with contextlib.aclosing(client.events(reconnect=False)) as events:
        with pytest.raises(ServerCertificateMismatch) as refused:
            await anext(events)
    assert_refused(refused.value, daemon, pinned="server", shown="twin")


def _unusable_server_cert(pki: Pki, directory: Path, case: str) -> Path:
    path = directory / "server.crt"
    pem = Path(pki.crt("server")).read_text()
    if case == "directory":
        path.mkdir()
    elif case == "a key":
        path.write_text(Path(pki.key("server")).read_text())
    elif case == "damaged":
        lines = pem.splitlines()
        path.write_text("\n".join([lines[0], "A" * 64, *lines[2:]]) + "\n")
    elif case == "two":
        path.write_text(pem + Path(pki.crt("ca")).read_text())
    return path


@pytest.mark.parametrize("case", ["missing", "directory", "a key", "damaged", "two"])
async def test_an_unusable_server_cert_is_named(daemon, client_for, pki, tmp_path, case):
    path = _unusable_server_cert(pki, tmp_path, case)
    with pytest.raises(LxdError, match=re.escape(f"server_cert {path}")) as error:
        await client_for(str(path)).open()
    assert not isinstance(error.value, Unreachable)
    assert daemon.client_certificates == []


async def test_without_server_cert_the_system_cas_and_the_name_decide(daemon, client_for):
    """Unchanged behaviour, guarded here because the pinned context verifies nothing itself."""
    client = client_for("")
    context = client._ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    with pytest.raises(Unreachable, match="certificate verify failed") as error:
        await client.open()
    assert not isinstance(error.value, ServerCertificateMismatch)


async def test_a_blocking_socket_of_the_pinned_context_holds_the_pin_too(daemon, client_for):
    """The context must not be a plain CERT_NONE one to whoever wraps a socket with it."""
    daemon.present("leaf")
    context = client_for(daemon.pki.crt("ca"))._ssl_context()

    def handshake() -> None:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
            context.wrap_socket(sock).close()

    with pytest.raises(ssl.SSLCertVerificationError, match=daemon.pki.sha256("leaf")):
        await asyncio.to_thread(handshake)

"""The daemon's certificate, pinned: exactly the one in ``server_cert``, for every connection.

The incus/lxc command line pins the certificate a remote presented (``servercerts/<remote>.crt``);
the hub does the same with ``c.LxdSpawner.server_cert``. OpenSSL cannot express "this one
certificate": loaded as a CA, a certificate vouches for every certificate its key signs. So
the client's context verifies nothing itself and compares the SHA-256 of the peer's
certificate when each handshake ends (:class:`PinnedContext`).
"""

from __future__ import annotations

import hashlib
import re
import ssl
from dataclasses import dataclass
from typing import Any

from .errors import LxdError, Unreachable


class ServerCertificateMismatch(Unreachable):
    """The daemon presented another certificate than the one ``server_cert`` pins.

    ``expected`` and ``presented`` are the SHA-256 fingerprints (hex) of the DER of the two
    certificates, as ``incus info`` shows a daemon's own (``certificate_fingerprint``).
    """

    def __init__(self, message: str, *, expected: str, presented: str):
        super().__init__(message)
        self.expected = expected
        self.presented = presented


_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class PinnedCertificate:
    """The one server certificate a client accepts: the file it came from, its DER's SHA-256."""

    path: str
    sha256: str

    @classmethod
    def load(cls, path: str) -> PinnedCertificate:
        """The certificate of a PEM file; an LxdError naming ``server_cert`` if it has none.

        The file must hold exactly one certificate: pinning means one, and a bundle would
        leave the reader to guess which of them the daemon presents.
        """
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise LxdError(f"cannot read server_cert {path}: {e.strerror or e}") from e
        blocks = _PEM_CERTIFICATE.findall(text)
        if len(blocks) != 1:
            raise LxdError(
                f"server_cert {path} holds {len(blocks) or 'no'} PEM certificates: it must hold "
                "exactly the daemon's certificate (its server.crt, or cluster.crt for a cluster)"
            )
        try:
            der = ssl.PEM_cert_to_DER_cert(blocks[0])
            # Have OpenSSL parse it now: a damaged file is then reported as such, not as a
            # certificate that matches no server.
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=der)
        except (ValueError, ssl.SSLError) as e:
            raise LxdError(f"server_cert {path} is not a valid PEM certificate: {e}") from e
        return cls(path, hashlib.sha256(der).hexdigest())

    def check(self, der: bytes | None) -> None:
        """Raise unless ``der`` (the peer's certificate) is the pinned certificate."""
        presented = hashlib.sha256(der).hexdigest() if der else "none"
        if presented != self.sha256:
            raise NotPinned(self, presented)


class NotPinned(ssl.SSLCertVerificationError):
    """The handshake's refusal. It is an SSLError because asyncio aborts a handshake only on
    one; aiohttp then raises ClientConnectorCertificateError with it as certificate_error."""

    def __init__(self, pin: PinnedCertificate, presented: str):
        super().__init__(
            f"certificate sha256:{presented} is not the one server_cert {pin.path} pins "
            f"(sha256:{pin.sha256})"
        )
        self.pin = pin
        self.presented = presented


class _PinnedHandshake:
    """Ends every handshake by comparing the server's certificate with the context's pin."""

    context: PinnedContext

    def do_handshake(self, *args: Any) -> None:
        super().do_handshake(*args)  # type: ignore[misc]
        self.context.pin.check(self.getpeercert(binary_form=True))  # type: ignore[attr-defined]


class _PinnedSSLObject(_PinnedHandshake, ssl.SSLObject):
    """What asyncio (and so aiohttp) gets from ``wrap_bio``."""


class _PinnedSSLSocket(_PinnedHandshake, ssl.SSLSocket):
    """What a blocking ``wrap_socket`` gets: the pin holds there too, no silent CERT_NONE."""


class PinnedContext(ssl.SSLContext):
    """A client context that accepts exactly one server certificate, whatever signed it and
    whatever name it carries, as the incus/lxc CLI does (``servercerts/<remote>.crt``).

    OpenSSL cannot express that: a certificate loaded as a CA (``load_verify_locations``)
    also vouches for every certificate its key signs. So OpenSSL verifies nothing here
    (CERT_NONE) and the SSL object compares the DER's SHA-256 when the handshake ends, before
    asyncio reports the connection made, so before any request byte is written. Python's
    ``ssl`` lets a context choose that class (``SSLContext.sslobject_class``, which asyncio's
    ``SSLProtocol`` gets through ``wrap_bio``), so the pin holds for every connection made
    with the context: requests, the events websocket, each new connection of the pool.

    aiohttp's own pin, ``aiohttp.Fingerprint``, does the same comparison (``Fingerprint.check``
    in aiohttp/client_reqrep.py) but cannot carry a client certificate, which the daemon
    needs: ``ssl=`` takes an SSLContext or a Fingerprint, and with a Fingerprint
    ``TCPConnector._get_ssl_context`` (aiohttp/connector.py) uses aiohttp's module-level
    unverified context (aio-libs/aiohttp#3679, open since 2019).

    An impostor gets our client certificate before the check refuses it (with aiohttp's
    Fingerprint too): it is public, and our signature in the handshake covers the impostor's
    own certificate, so it cannot be replayed to the real daemon.
    """

    sslobject_class = _PinnedSSLObject
    sslsocket_class = _PinnedSSLSocket
    pin: PinnedCertificate

    @classmethod
    def pinning(cls, pin: PinnedCertificate) -> PinnedContext:
        ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # A TLS 1.2 renegotiation would bring a certificate that no handshake end checks.
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        ctx.pin = pin
        return ctx

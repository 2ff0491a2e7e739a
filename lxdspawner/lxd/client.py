"""An asyncio client for the LXD / Incus REST API, on aiohttp.

It speaks to the local unix socket (found automatically) or to a remote daemon over HTTPS
with a client certificate and a pinned server certificate. Every call is a coroutine; nothing
blocks the event loop, because the hub serves all of its users from one loop.

It knows nothing of JupyterHub: the spawner, the CLI and the tests all use it as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from .dialect import Dialect, local_socket_candidates
from .errors import (
    FileHelperFailed,
    LxdError,
    NotFound,
    OperationFailed,
    Unreachable,
    error_for_status,
)
from .tls import NotPinned, PinnedCertificate, PinnedContext, ServerCertificateMismatch

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict], Any]

#: Type of the synthetic event :meth:`LxdClient.events` yields whenever its stream connects.
CONNECTED = "lxdspawner-connected"


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together, for messages shown to a person."""
        return "\n".join(s for s in (self.stdout.strip(), self.stderr.strip()) if s)


def _q(name: str) -> str:
    return quote(name, safe="")


# -- the pinned server certificate ----------------------------------------------------------


class LxdClient:
    """One connection pool to one daemon (one endpoint, one project)."""

    def __init__(
        self,
        endpoint: str = "",
        *,
        client_cert: str = "",
        client_key: str = "",
        server_cert: str = "",
        project: str = "",
        timeout: float = 30.0,
    ):
        self.endpoint = endpoint
        self.client_cert = client_cert
        self.client_key = client_key
        self.server_cert = server_cert
        self.project = project
        self.timeout = timeout
        self.dialect: Dialect | None = None
        #: Every HTTP request and websocket this client made: benchmarks read it.
        self.request_count = 0
        self._session: aiohttp.ClientSession | None = None
        self._base = ""
        self._where = ""
        self._fingerprints: dict[str, tuple[str | None, float]] = {}

    # -- connection -------------------------------------------------------------------------

    @classmethod
    async def connect(cls, endpoint: str = "", **kwargs: Any) -> LxdClient:
        client = cls(endpoint, **kwargs)
        try:
            await client.open()
        except BaseException:
            await client.close()
            raise
        return client

    async def open(self) -> Dialect:
        """Open the session and learn the dialect from ``GET /1.0``."""
        if self._session is None:
            self._session = self._make_session()
        info = await self.request("GET", "/1.0")
        self.dialect = Dialect.from_server_info(info)
        return self.dialect

    def _make_session(self) -> aiohttp.ClientSession:
        endpoint = self.endpoint
        if endpoint.startswith("https://"):
            self._base = endpoint.rstrip("/")
            self._where = endpoint
            connector = aiohttp.TCPConnector(ssl=self._ssl_context(), limit=100)
        else:
            path = endpoint.removeprefix("unix://") if endpoint else self._find_socket()
            self._base = "http://lxd"
            self._where = f"unix socket {path}"
            connector = aiohttp.UnixConnector(path=path, limit=100)
        return aiohttp.ClientSession(connector=connector)

    @staticmethod
    def _find_socket() -> str:
        candidates = local_socket_candidates()
        for path in candidates:
            if os.path.exists(path):
                return path
        raise Unreachable(
            "no local LXD or Incus socket found (looked at "
            + ", ".join(candidates)
            + "); is the daemon installed and running? For a remote daemon set the endpoint "
            "to its https:// URL."
        )

    def _ssl_context(self) -> ssl.SSLContext:
        """The TLS context of an https endpoint: our client certificate, and whom we trust.

        With ``server_cert``, exactly that certificate (the daemons serve self-signed ones;
        a cluster serves its cluster.crt from every member): see :class:`PinnedContext`.
        Without it, the system's CAs and the host name, as any HTTPS client.
        """
        if not (self.client_cert and self.client_key):
            raise LxdError(
                f"endpoint {self.endpoint} is HTTPS: a client certificate and key are needed "
                "(client_cert, client_key), trusted by the daemon"
            )
        if self.server_cert:
            ctx: ssl.SSLContext = PinnedContext.pinning(PinnedCertificate.load(self.server_cert))
        else:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        try:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        except (OSError, ssl.SSLError) as e:
            raise LxdError(
                f"cannot load client certificate {self.client_cert} / key {self.client_key}: {e}"
            ) from e
        return ctx

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> LxdClient:
        if self.dialect is None:
            await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def where(self) -> str:
        """A human description of the endpoint, for messages."""
        return self._where or self.endpoint or "the local daemon"

    def _refusal(self, error: BaseException) -> ServerCertificateMismatch | None:
        """The error for a connection that ``server_cert`` refused; None for other failures.

        The handshake's refusal reaches the client wrapped, as aiohttp's
        ClientConnectorCertificateError, whose ``certificate_error`` is that refusal.
        """
        refused = getattr(error, "certificate_error", None)
        if not isinstance(error, aiohttp.ClientError) or not isinstance(refused, NotPinned):
            return None
        pin = refused.pin
        return ServerCertificateMismatch(
            f"the server at {self.where} presented certificate sha256:{refused.presented}, "
            f"but server_cert {pin.path} pins sha256:{pin.sha256}: they do not match, so the "
            f"connection was refused (if the daemon's certificate was replaced on purpose, "
            f"put the new one in {pin.path})",
            expected=pin.sha256,
            presented=refused.presented,
        )

    # -- raw requests -----------------------------------------------------------------------

    def _params(self, params: Mapping[str, Any] | None) -> dict[str, str]:
        merged = {k: str(v) for k, v in (params or {}).items() if v is not None}
        if self.project and "project" not in merged:
            merged["project"] = self.project
        return merged

    @contextlib.asynccontextmanager
    async def _open(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        data: bytes | str | AsyncIterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One HTTP request whose body the caller reads (or not) itself.

        Connection errors and timeouts, also while the body is read, become Unreachable.
        """
        if self._session is None:
            self._session = self._make_session()
        url = self._base + path
        self.request_count += 1
        try:
            async with self._session.request(
                method,
                url,
                params=self._params(params),
                json=json_body,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            ) as resp:
                yield resp
        except asyncio.TimeoutError as e:
            raise Unreachable(
                f"{method} {path} on {self.where} got no answer within "
                f"{timeout or self.timeout:g} s"
            ) from e
        except aiohttp.ClientError as e:
            raise self._refusal(e) or Unreachable(
                f"cannot reach the LXD/Incus daemon at {self.where}: {e}"
            ) from e

    async def raw(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes, str]:
        """One HTTP request: (status, body, content type). Connection errors become Unreachable."""
        async with self._open(
            method,
            path,
            params=params,
            json_body=json_body,
            data=data,
            headers=headers,
            timeout=timeout,
        ) as resp:
            body = await resp.read()
            return resp.status, body, resp.headers.get("Content-Type", "")

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request whose answer is LXD's JSON envelope; returns its metadata.

        Sync answers give their metadata; async answers give the operation's metadata
        (``{"id": ..., "status": ...}``): await it with :meth:`wait`.
        """
        status, body, _ = await self.raw(method, path, **kwargs)
        return self._metadata(method, path, status, body)

    async def request_with_etag(self, path: str) -> tuple[Any, str]:
        """GET ``path``: its metadata and its ETag, for a PUT or PATCH with ``If-Match`` that
        the daemon refuses (412) if the object changed in between."""
        async with self._open("GET", path) as resp:
            body = await resp.read()
            status, etag = resp.status, resp.headers.get("ETag", "")
        return self._metadata("GET", path, status, body), etag

    @staticmethod
    def _metadata(method: str, path: str, status: int, body: bytes) -> Any:
        try:
            envelope = json.loads(body) if body else {}
        except ValueError as e:
            raise LxdError(
                f"{method} {path}: the daemon answered HTTP {status} with non-JSON", status=status
            ) from e
        if envelope.get("type") == "error" or status >= 400:
            message = envelope.get("error") or f"HTTP {status}"
            raise error_for_status(
                status, f"{method} {path}: {message}", envelope.get("error_code")
            )
        return envelope.get("metadata")

    async def wait(
        self,
        operation: Mapping | str,
        *,
        timeout: float = 120.0,
        on_progress: ProgressCallback | None = None,
    ) -> dict:
        """Wait for a background operation; raise OperationFailed if it failed.

        With ``on_progress`` the wait is cut into short slices, and the operation's metadata
        (image unpack, file system remap, ...) is passed on after each slice.
        """
        op = await self._finished(operation, timeout=timeout, on_progress=on_progress)
        if op.get("status") != "Success":
            raise OperationFailed(op.get("err") or f"operation {str(op.get('status')).lower()}")
        return op

    async def _finished(
        self,
        operation: Mapping | str,
        *,
        timeout: float = 120.0,
        on_progress: ProgressCallback | None = None,
    ) -> dict:
        """The operation once it has ended, whether it succeeded, failed or was cancelled.

        A failed operation keeps its metadata (an exec's exit code and output records), which
        callers may need; the daemons forget it 5 s after its end.
        """
        op_id = operation if isinstance(operation, str) else operation["id"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        slice_s = 1 if on_progress else max(1, int(timeout))
        while True:
            remaining = deadline - loop.time()
            wait_s = max(1, min(slice_s, int(remaining) if remaining > 1 else 1))
            try:
                op = await self.request(
                    "GET",
                    f"/1.0/operations/{_q(op_id)}/wait",
                    params={"timeout": wait_s},
                    timeout=wait_s + self.timeout,
                )
            except LxdError as e:
                # Incus writes "200 OK" before it waits, then an error envelope if the wait
                # timed out ("context deadline exceeded") or if the operation failed (its own
                # error, without its metadata); LXD 5 answers the operation in both cases. So
                # on Incus, ask for the operation itself.
                if e.status not in (200, 504) and "deadline exceeded" not in e.message:
                    raise
                try:
                    op = await self.request("GET", f"/1.0/operations/{_q(op_id)}")
                except NotFound:
                    raise OperationFailed(e.message, status=e.status, code=e.code) from e
            if op.get("status") in ("Success", "Failure", "Cancelled"):
                return op
            if on_progress and op.get("metadata"):
                result = on_progress(op["metadata"])
                if asyncio.iscoroutine(result):
                    await result
            if loop.time() >= deadline:
                raise LxdError(f"operation {op_id} did not finish within {timeout:g} s")

    async def run(self, method: str, path: str, *, timeout: float = 120.0, **kwargs: Any) -> dict:
        """A request whose answer is an operation, awaited to its end."""
        on_progress = kwargs.pop("on_progress", None)
        op = await self.request(method, path, **kwargs)
        return await self.wait(op, timeout=timeout, on_progress=on_progress)

    # -- server -----------------------------------------------------------------------------

    async def server_info(self) -> dict:
        return await self.request("GET", "/1.0")

    async def server_time(self, target: str | None = None) -> float | None:
        """The daemon's clock (``target``: a cluster member's) as seconds since the epoch,
        from the ``Date`` header of its ``GET /1.0`` (one-second resolution); None when it
        sends none. Neither daemon tells its time in ``/1.0``; a request forwarded to a
        member (``?target=``) carries the member's own headers, ``Date`` included (both
        daemons' forwardedResponse copies them, and Go's server keeps a ``Date`` it is given).
        """
        from email.utils import parsedate_to_datetime

        async with self._open("GET", "/1.0", params={"target": target}) as resp:
            body = await resp.read()
            status, date = resp.status, resp.headers.get("Date", "")
        self._metadata("GET", "/1.0", status, body)
        try:
            return parsedate_to_datetime(date).timestamp() if date else None
        except (TypeError, ValueError):
            return None

    async def image_volumes(self, pool: str, *, target: str | None = None) -> list[str]:
        """The fingerprints of the images unpacked in ``pool`` (on member ``target``): a
        cluster copies an image to a member's pool at its first use there."""
        urls = await self.request(
            "GET", f"/1.0/storage-pools/{_q(pool)}/volumes/image", params={"target": target}
        )
        return [url.split("?")[0].rsplit("/", 1)[-1] for url in urls]

    async def resources(self, target: str | None = None) -> dict:
        return await self.request("GET", "/1.0/resources", params={"target": target})

    async def cluster_members(self) -> list[dict]:
        """The cluster's members with their status; an empty list on a standalone daemon."""
        try:
            return await self.request("GET", "/1.0/cluster/members", params={"recursion": 1})
        except LxdError as e:
            if e.status in (400, 404) or "not clustered" in e.message.lower():
                return []
            raise

    async def network(self, name: str) -> dict:
        return await self.request("GET", f"/1.0/networks/{_q(name)}")

    async def profile(self, name: str) -> dict:
        return await self.request("GET", f"/1.0/profiles/{_q(name)}")

    async def image_alias(self, alias: str) -> dict:
        return await self.request("GET", f"/1.0/images/aliases/{_q(alias)}")

    async def image_fingerprint(self, image: str, *, max_age: float = 0.0) -> str | None:
        """The full fingerprint of an image alias or (partial) fingerprint; None if unknown.

        With ``max_age``, an answer that old or younger is reused instead of asked again
        (an alias can be moved to a new image at any time: keep it short)."""
        now = time.monotonic()
        known = self._fingerprints.get(image)
        if known is not None and now - known[1] <= max_age:
            return known[0]
        try:
            if "alias" in image_source(image):
                fingerprint = (await self.image_alias(image))["target"]
            else:
                fingerprint = (await self.request("GET", f"/1.0/images/{_q(image)}"))["fingerprint"]
        except NotFound:
            fingerprint = None
        self._fingerprints[image] = (fingerprint, now)
        return fingerprint

    # -- instances --------------------------------------------------------------------------

    async def create_instance(
        self,
        name: str,
        *,
        source: Mapping[str, Any],
        profiles: Iterable[str] | None = None,
        config: Mapping[str, str] | None = None,
        devices: Mapping[str, Mapping[str, str]] | None = None,
        target: str | None = None,
        start: bool = False,
        instance_type: str = "container",
        timeout: float = 300.0,
        on_progress: ProgressCallback | None = None,
        ephemeral: bool = False,
    ) -> dict:
        """Create an instance from ``source`` (see :func:`image_source`); optionally start it.
        An ``ephemeral`` one is deleted by the daemon once it stops.

        When the daemon can create and start in one request it does; otherwise the start is a
        second request. Either way the instance is running when this returns with start=True.
        """
        body: dict[str, Any] = {
            "name": name,
            "type": instance_type,
            "source": dict(source),
            "config": dict(config or {}),
            "devices": {k: dict(v) for k, v in (devices or {}).items()},
        }
        if ephemeral:
            body["ephemeral"] = True
        if profiles is not None:
            body["profiles"] = list(profiles)
        one_request = start and self.dialect is not None and self.dialect.create_and_start
        if one_request:
            body["start"] = True
        op = await self.run(
            "POST",
            "/1.0/instances",
            params={"target": target},
            json_body=body,
            timeout=timeout,
            on_progress=on_progress,
        )
        if start and not one_request:
            await self.start_instance(name, timeout=timeout)
        return op

    async def _state_change(self, name: str, action: str, timeout: float, **extra: Any) -> dict:
        body = {"action": action, "timeout": int(timeout), **extra}
        return await self.run(
            "PUT", f"/1.0/instances/{_q(name)}/state", json_body=body, timeout=timeout + 30
        )

    async def start_instance(self, name: str, *, timeout: float = 60.0) -> dict:
        return await self._state_change(name, "start", timeout)

    async def stop_instance(self, name: str, *, timeout: float = 30.0, force: bool = False) -> dict:
        """Stop gracefully within ``timeout`` seconds, or at once with ``force``."""
        return await self._state_change(name, "stop", -1 if force else timeout, force=force)

    async def delete_instance(self, name: str, *, timeout: float = 120.0) -> dict:
        return await self.run("DELETE", f"/1.0/instances/{_q(name)}", timeout=timeout)

    async def shut_down(self, name: str, *, timeout: float, force: bool = False) -> bool:
        """Stop gracefully within ``timeout``, then by force; one that is stopped is fine.

        True if this stop did it: the operation of a stop ends once LXD has torn the
        container down. False if it was not running (it may still be being torn down).
        """
        try:
            await self.stop_instance(name, timeout=timeout, force=force)
            return True
        except NotFound:
            raise
        except LxdError as e:
            if not_running(e):
                return False
            if force:
                raise
            log.warning("graceful stop of %s failed (%s); forcing", name, e.message)
        try:
            await self.stop_instance(name, force=True)
        except LxdError as e:
            if not not_running(e):
                raise
            return False
        return True

    async def remove_instance(self, name: str, *, timeout: float = 120.0) -> None:
        """Stop by force and delete; one that is stopped or gone already is fine."""
        try:
            await self.shut_down(name, timeout=0, force=True)
        except NotFound:
            return
        await self.delete_stopped_instance(name, timeout=timeout)

    async def delete_stopped_instance(self, name: str, *, timeout: float = 120.0) -> None:
        """Delete an instance that has just stopped; one that is gone already is fine.

        LXD reports a container stopped a moment (about half a second) before it has torn it
        down, and refuses to delete it meanwhile ("Instance is running"): so retry then.
        """
        for delay in (0.05,) * 20 + (0.5,) * 20:
            try:
                await self.delete_instance(name, timeout=timeout)
                return
            except NotFound:
                return
            except LxdError as e:
                if "running" not in e.message.lower():
                    raise
            await asyncio.sleep(delay)
        try:
            await self.delete_instance(name, timeout=timeout)
        except NotFound:
            pass

    async def get_instance(self, name: str) -> dict:
        return await self.request("GET", f"/1.0/instances/{_q(name)}")

    async def update_instance(self, name: str, patch: Mapping[str, Any]) -> None:
        await self.request("PATCH", f"/1.0/instances/{_q(name)}", json_body=dict(patch))

    async def instance_state(self, name: str) -> dict:
        return await self.request("GET", f"/1.0/instances/{_q(name)}/state")

    async def list_instances(self, *, filter: str | None = None, recursion: int = 1) -> list:
        """Instances (full objects with recursion=1), optionally narrowed by LXD's ``filter=``."""
        return await self.request(
            "GET", "/1.0/instances", params={"recursion": recursion, "filter": filter}
        )

    async def instance_log(self, name: str, log_name: str = "lxc.log") -> str:
        status, body, _ = await self.raw("GET", f"/1.0/instances/{_q(name)}/logs/{_q(log_name)}")
        return body.decode(errors="replace") if status == 200 else ""

    async def console_log(self, name: str) -> str:
        status, body, _ = await self.raw("GET", f"/1.0/instances/{_q(name)}/console")
        return body.decode(errors="replace") if status == 200 else ""

    # -- files ------------------------------------------------------------------------------

    def _dialect(self) -> Dialect:
        if self.dialect is None:
            raise LxdError("client not opened: call await client.open() first")
        return self.dialect

    async def push_file(
        self,
        name: str,
        path: str,
        content: bytes | str,
        *,
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o644,
    ) -> None:
        """Write a file into the instance (running or stopped), replacing what is there."""
        data = content.encode() if isinstance(content, str) else content
        headers = self._dialect().file_headers(uid=uid, gid=gid, mode=mode)
        headers["Content-Type"] = "application/octet-stream"
        await self._write_file(name, path, headers, data)

    async def make_directory(
        self, name: str, path: str, *, uid: int = 0, gid: int = 0, mode: int = 0o755
    ) -> None:
        headers = self._dialect().file_headers(uid=uid, gid=gid, mode=mode, kind="directory")
        await self._write_file(name, path, headers)

    async def make_symlink(self, name: str, path: str, target: str) -> None:
        headers = self._dialect().file_headers(uid=0, gid=0, mode=0o777, kind="symlink")
        await self._write_file(name, path, headers, target.encode())

    #: Seconds a file write retries Incus 6.0.4's file-helper race (fixed upstream later):
    #: "dial unix /proc/self/fd/N/forkfile.sock: connect: no such file or directory", seen
    #: when files are written into a container just created, while others are. Mostly a
    #: retry works; under a burst of 30 on two cores one instance's helper once kept failing
    #: for minutes, so after this long FileHelperFailed says to try a fresh instance.
    file_race_budget = 5.0

    async def _write_file(
        self, name: str, path: str, headers: Mapping[str, str], data: bytes | None = None
    ) -> None:
        deadline = time.monotonic() + self.file_race_budget
        attempt = 0
        while True:
            try:
                await self.request(
                    "POST",
                    f"/1.0/instances/{_q(name)}/files",
                    params={"path": path},
                    data=data,
                    headers=headers,
                )
                return
            except LxdError as e:
                if "forkfile" not in e.message:
                    raise
                if time.monotonic() >= deadline:
                    raise FileHelperFailed(e.message, status=e.status, code=e.code) from e
            await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
            attempt += 1

    async def read_file(self, name: str, path: str) -> bytes:
        """The whole file: for files the hub wrote itself; see :meth:`read_file_tail`."""
        status, body, _ = await self.raw(
            "GET", f"/1.0/instances/{_q(name)}/files", params={"path": path}
        )
        if status >= 400:
            raise _file_error(status, body, name, path)
        return body

    #: Bytes :meth:`read_file_tail` reads at most when a daemon ignores its ``Range`` header.
    tail_read_cap = 64 * 2**20

    async def read_file_tail(self, name: str, path: str, max_bytes: int = 65536) -> bytes:
        """At most the last ``max_bytes`` of a file in the instance, running or stopped.

        For files whose size the instance's user controls, such as the server's log: the hub
        holds and transfers ``max_bytes``, whatever the file's size. It asks for a suffix range
        (``Range: bytes=-N``): Incus 6.0 and LXD 5.0 serve files with Go's
        ``http.ServeContent`` over a seekable SFTP file, so they answer 206 with just the tail
        (the whole file when shorter). Should a daemon ignore the range and send the whole
        file, only the last ``max_bytes`` are kept as it streams past, and reading stops after
        ``tail_read_cap`` bytes: then the answer is the end of the file's first
        ``tail_read_cap`` bytes, which is not the file's end if it is longer.

        The files API does not follow a symbolic link: for one, the answer is the path it
        points to, so a user cannot make the hub read another file through a link. A missing
        file raises NotFound.
        """
        status, body = await self._read_tail(
            f"/1.0/instances/{_q(name)}/files", params={"path": path}, max_bytes=max_bytes
        )
        if status >= 400:
            raise _file_error(status, body, name, path)
        return body

    async def _read_tail(
        self, path: str, *, params: Mapping[str, Any] | None = None, max_bytes: int
    ) -> tuple[int, bytes]:
        """(status, at most the last ``max_bytes`` of the body): see :meth:`read_file_tail`.
        An error's body (a small JSON envelope) is read up to 64 KiB."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        async with self._open(
            "GET", path, params=params, headers={"Range": f"bytes=-{max_bytes}"}
        ) as resp:
            if resp.status == 416:
                # An empty file, from a server that refuses any range of one (ours answer 206).
                return 200, b""
            if resp.status >= 400:
                return resp.status, await resp.content.read(65536)
            tail = bytearray()
            read = 0
            async for chunk in resp.content.iter_chunked(65536):
                chunk = chunk[: self.tail_read_cap - read]
                read += len(chunk)
                tail += chunk
                del tail[:-max_bytes]
                if read >= self.tail_read_cap:
                    break
            return resp.status, bytes(tail)

    # -- exec -------------------------------------------------------------------------------

    async def exec(
        self,
        name: str,
        command: list[str],
        *,
        environment: Mapping[str, str] | None = None,
        user: int | None = None,
        group: int | None = None,
        cwd: str | None = None,
        timeout: float = 300.0,
        record_output: bool = True,
    ) -> ExecResult:
        """Run a command to its end with its output recorded; the records are then deleted.

        The command is an argument vector: nothing here goes through a shell unless the caller
        runs one, so user-supplied values belong in ``environment``. Without
        ``record_output`` only the exit code comes back, two requests sooner.

        Whenever the command ran, its exit code comes back, 126 and 127 included (a shell's
        "not found"), although both daemons mark such an exec failed ("Command not found").
        OperationFailed means it did not run: ``command[0]`` does not exist or cannot be
        executed in the instance (then the message says so), or the daemon could not start it.
        """
        env = dict(environment or {})
        body: dict[str, Any] = {
            "command": list(command),
            "environment": env,
            "wait-for-websocket": False,
            "interactive": False,
            "record-output": record_output,
        }
        if user is not None:
            body["user"] = int(user)
        if group is not None:
            body["group"] = int(group)
        if cwd:
            body["cwd"] = cwd
        op = await self.request("POST", f"/1.0/instances/{_q(name)}/exec", json_body=body)
        done = await self._finished(op, timeout=timeout)
        meta = done.get("metadata") or {}
        texts = await self._take_records(meta.get("output") or {})
        exit_code = meta.get("return")
        if done.get("status") != "Success":
            argv0 = command[0] if command else ""
            err = done.get("err") or f"operation {str(done.get('status')).lower()}"
            # Both daemons turn exit codes 127 and 126 into the errors "Command not found" and
            # "Command not executable" (lxcCmd.Wait), after storing the exit code and the
            # records in the operation's metadata (instance_exec.go): any other failure is
            # the daemon's own.
            if exit_code not in (126, 127):
                raise OperationFailed(f"exec of {argv0!r} in {name}: {err}")
            if not any(texts.values()):
                try:
                    why = await self._not_started(name, argv0, exit_code, env, cwd)
                except LxdError as e:
                    log.debug("cannot tell whether %r started in %s: %s", argv0, name, e.message)
                    why = None
                if why:
                    raise OperationFailed(why)
        return ExecResult(
            -1 if exit_code is None else int(exit_code), texts.get("1", ""), texts.get("2", "")
        )

    #: The most of each recorded output stream of an exec that is read: its last 64 KiB. What
    #: runs in a user's container may print without end (a kept container runs what its user
    #: left there).
    exec_output_limit = 65536

    async def _take_records(self, outputs: Mapping[str, str]) -> dict[str, str]:
        """The recorded output of an exec by file descriptor ("1", "2"), deleted once read:
        the last ``exec_output_limit`` bytes of each."""
        texts: dict[str, str] = {}
        for fd, log_path in outputs.items():
            try:
                status, data = await self._read_tail(log_path, max_bytes=self.exec_output_limit)
                texts[str(fd)] = data.decode(errors="replace") if status in (200, 206) else ""
            finally:
                await self.raw("DELETE", log_path)
        return texts

    #: The PATH both daemons give an exec without one (instance_exec.go); they append the
    #: last two only when /snap or /etc/NIXOS exist, and looking in them otherwise is harmless.
    default_exec_path = (
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        ":/snap/bin:/run/current-system/sw/bin"
    )

    async def _not_started(
        self,
        name: str,
        argv0: str,
        exit_code: int,
        environment: Mapping[str, str],
        cwd: str | None,
    ) -> str | None:
        """Why ``argv0`` cannot have started in the instance, when its files show it; else None.

        For an exec that failed with 127 or 126 and printed nothing: a command that could not be
        executed and one that ran and exited so (``sh -c 'exit 127'``) look the same to the
        API. The files API tells them apart: 127 and no such file anywhere the exec looked, or
        126 and only a directory or a file without execute permission there, mean nothing ran.
        """
        if "/" in argv0:
            if not argv0.startswith("/") and not cwd:
                return None  # relative to a working directory this client does not know
            candidates = [posixpath.join(cwd or "/", argv0)]
            looked = ""
        else:
            search = environment.get("PATH")
            if search is None:
                config = (await self.get_instance(name)).get("expanded_config") or {}
                search = config.get("environment.PATH") or self.default_exec_path
            dirs = [d for d in search.split(":") if d.startswith("/")]
            candidates = [posixpath.join(d, argv0) for d in dirs]
            looked = f" (looked in {':'.join(dirs)})"
        unusable = ""
        for path in candidates:
            kind = await self._file_kind(name, path)
            if kind is None:
                continue
            file_type, mode = kind
            if file_type == "symlink" or (file_type == "file" and mode & 0o111):
                return None  # something to run is there: it ran
            if not unusable:
                unusable = (
                    f"{path} is a directory"
                    if file_type == "directory"
                    else f"{path} has no execute permission"
                )
        if exit_code == 127 and not unusable:
            return f"command {argv0!r} not found in {name}{looked}"
        if exit_code == 126 and unusable:
            return f"command {argv0!r} is not executable in {name}: {unusable}"
        return None

    async def _file_kind(self, name: str, path: str) -> tuple[str, int] | None:
        """(type, permission bits) of a path in the instance, from the files API's headers;
        None if there is nothing at that path."""
        async with self._open(
            "GET",
            f"/1.0/instances/{_q(name)}/files",
            params={"path": path},
            headers={"Range": "bytes=0-0"},  # only the headers matter: send as little as can be
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status >= 400 and resp.status != 416:  # 416: an empty file
                raise _file_error(resp.status, await resp.content.read(65536), name, path)
            prefix = self._dialect().header_prefix
            try:
                mode = int(resp.headers.get(f"{prefix}mode", ""), 8)
            except ValueError:
                mode = 0o755  # unknown: take it as executable, so that it counts as ran
            return resp.headers.get(f"{prefix}type", "file"), mode

    # -- storage volumes --------------------------------------------------------------------

    async def create_volume(
        self,
        pool: str,
        name: str,
        *,
        config: Mapping[str, str] | None = None,
        target: str | None = None,
        **fields: Any,
    ) -> None:
        """A custom volume; ``fields``: the request's other keys (description, content_type)."""
        body = {**fields, "name": name, "type": "custom", "config": dict(config or {})}
        result = await self.request(
            "POST",
            f"/1.0/storage-pools/{_q(pool)}/volumes/custom",
            params={"target": target},
            json_body=body,
        )
        if isinstance(result, dict) and result.get("id") and result.get("class") == "task":
            await self.wait(result)

    async def get_volume(self, pool: str, name: str, *, target: str | None = None) -> dict:
        return await self.request(
            "GET",
            f"/1.0/storage-pools/{_q(pool)}/volumes/custom/{_q(name)}",
            params={"target": target},
        )

    async def copy_volume_to_member(
        self,
        pool: str,
        name: str,
        *,
        source_member: str,
        target: str,
        config: Mapping[str, str],
        description: str = "",
        content_type: str = "filesystem",
        timeout: float = 3600.0,
    ) -> None:
        """Copy a custom volume, snapshots included, from one cluster member to another in the
        same pool under the same name (API extension ``cluster_internal_custom_volume_copy``:
        the daemon pulls it from ``source_member``), as ``incus storage volume move --target
        SRC --destination-target DST`` does before deleting the original. The config is
        passed on explicitly: Incus 6.0's one-call member-to-member move (a POST on the
        volume with ``migration`` and ``source.location``) leaves the new volume with none."""
        body = {
            "name": name,
            "type": "custom",
            "config": dict(config),
            "description": description,
            "content_type": content_type or "filesystem",
            "source": {"type": "copy", "name": name, "pool": pool, "location": source_member},
        }
        result = await self.request(
            "POST",
            f"/1.0/storage-pools/{_q(pool)}/volumes/custom",
            params={"target": target},
            json_body=body,
        )
        if isinstance(result, dict) and result.get("id"):
            await self.wait(result, timeout=timeout)

    async def update_volume_config(
        self, pool: str, name: str, config: Mapping[str, str], *, target: str | None = None
    ) -> None:
        """Set (merge) config keys of a custom volume."""
        await self.request(
            "PATCH",
            f"/1.0/storage-pools/{_q(pool)}/volumes/custom/{_q(name)}",
            params={"target": target},
            json_body={"config": dict(config)},
        )

    async def volume_state(self, pool: str, name: str, *, target: str | None = None) -> dict:
        """``GET …/state``: ``{"usage": {"used": bytes, "total": bytes}}`` (the usage may be
        missing where the driver cannot tell)."""
        return await self.request(
            "GET",
            f"/1.0/storage-pools/{_q(pool)}/volumes/custom/{_q(name)}/state",
            params={"target": target},
        )

    async def volume_snapshots(
        self, pool: str, name: str, *, target: str | None = None
    ) -> list[dict]:
        """A custom volume's snapshots (``name`` is the snapshot's own, ``created_at``...)."""
        return await self.request(
            "GET",
            f"/1.0/storage-pools/{_q(pool)}/volumes/custom/{_q(name)}/snapshots",
            params={"target": target, "recursion": 1},
        )

    async def create_volume_snapshot(
        self, pool: str, name: str, snapshot: str, *, target: str | None = None
    ) -> None:
        await self.run(
            "POST",
            f"/1.0/storage-pools/{_q(pool)}/volumes/custom/{_q(name)}/snapshots",
            params={"target": target},
            json_body={"name": snapshot},
        )

    async def restore_volume(
        self, pool: str, name: str, snapshot: str, *, target: str | None = None
    ) -> None:
        """Give a custom volume the content of one of its snapshots: a PUT of
        ``{"restore": snapshot}`` (without ``config``, nothing else changes). The daemons
        refuse while a running instance uses the volume."""
        result = await self.request(
            "PUT",
            f"/1.0/storage-pools/{_q(pool)}/volumes/custom/{_q(name)}",
            params={"target": target},
            json_body={"restore": snapshot},
        )
        if isinstance(result, dict) and result.get("id") and result.get("class") == "task":
            await self.wait(result)

    async def list_images(self) -> list[dict]:
        return await self.request("GET", "/1.0/images", params={"recursion": 1})

    async def image(self, fingerprint: str) -> dict:
        return await self.request("GET", f"/1.0/images/{_q(fingerprint)}")

    #: Bytes read from disk per chunk of an image upload (and per progress report).
    upload_chunk = 1 << 20

    async def import_image(
        self,
        meta: str | os.PathLike,
        rootfs: str | os.PathLike,
        *,
        on_progress: Callable[[int, int], Any] | None = None,
        timeout: float = 3600.0,
    ) -> str:
        """Upload a split image (``meta.tar.xz`` + ``rootfs.squashfs``); its fingerprint.

        ``POST /1.0/images`` with a multipart body of the parts ``metadata`` and ``rootfs``, as
        the daemons' own clients send it; the body is streamed from disk, so a 150 MB image is
        never held in memory, and ``on_progress(sent, total)`` is called after each chunk.
        The daemon computes the fingerprint (sha256 of both files) and answers it in the
        operation's metadata; an image it already has is a Conflict.
        """
        boundary = f"lxdspawner-{os.urandom(12).hex()}"
        parts = []
        for field, path in (("metadata", meta), ("rootfs", rootfs)):
            head = (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="{field}"; '
                f'filename="{os.path.basename(path)}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            parts.append((head, path, os.path.getsize(path)))  # noqa: ASYNC240 (a stat)
        tail = f"\r\n--{boundary}--\r\n".encode()
        total = sum(len(h) + size + 2 for h, _, size in parts) - 2 + len(tail)

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            for i, (head, path, _) in enumerate(parts):
                chunk = (b"\r\n" if i else b"") + head
                sent += len(chunk)
                yield chunk
                with open(path, "rb") as f:  # noqa: ASYNC230 (1 MiB reads from a local file)
                    while data := f.read(self.upload_chunk):
                        sent += len(data)
                        yield data
                        if on_progress:
                            on_progress(sent, total)
            yield tail
            if on_progress:
                on_progress(total, total)

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(total),
        }
        async with self._open(
            "POST", "/1.0/images", data=body(), headers=headers, timeout=timeout
        ) as resp:
            status, raw = resp.status, await resp.read()
        op = self._metadata("POST", "/1.0/images", status, raw)
        done = await self.wait(op, timeout=timeout)
        return (done.get("metadata") or {})["fingerprint"]

    async def set_image_alias(self, alias: str, fingerprint: str, description: str = "") -> None:
        """Point ``alias`` at ``fingerprint``: created if missing, else moved in one PUT, so a
        launch never finds the alias missing."""
        body = {"target": fingerprint, "description": description}
        try:
            await self.request("PUT", f"/1.0/images/aliases/{_q(alias)}", json_body=body)
        except NotFound:
            await self.request("POST", "/1.0/images/aliases", json_body={**body, "name": alias})

    async def delete_image(self, fingerprint: str, *, timeout: float = 120.0) -> None:
        await self.run("DELETE", f"/1.0/images/{_q(fingerprint)}", timeout=timeout)

    async def storage_pools(self) -> list[str]:
        urls = await self.request("GET", "/1.0/storage-pools")
        return [url.rsplit("/", 1)[-1] for url in urls]

    async def list_volumes(self, pool: str) -> list[dict]:
        return await self.request(
            "GET", f"/1.0/storage-pools/{_q(pool)}/volumes/custom", params={"recursion": 1}
        )

    async def delete_volume(self, pool: str, name: str, *, target: str | None = None) -> None:
        await self.request(
            "DELETE",
            f"/1.0/storage-pools/{_q(pool)}/volumes/custom/{_q(name)}",
            params={"target": target},
        )

    # -- events -----------------------------------------------------------------------------

    async def events(
        self,
        types: Iterable[str] = ("lifecycle", "operation"),
        *,
        reconnect: bool = True,
        retry_delay: float = 1.0,
    ) -> AsyncIterator[dict]:
        """Yield events from the ``/1.0/events`` websocket, reconnecting after failures.

        Each (re)connection is announced by a synthetic ``{"type": CONNECTED}`` event: a
        consumer that must not miss anything (a cache) lists what it follows after that event,
        and again after every reconnection.
        """
        if self._session is None:
            self._session = self._make_session()
        params = self._params({"type": ",".join(types)})
        url = self._base.replace("https://", "wss://").replace("http://", "ws://") + "/1.0/events"
        first = True
        while True:
            try:
                self.request_count += 1
                async with self._session.ws_connect(url, params=params, heartbeat=30) as ws:
                    yield {"type": CONNECTED, "reconnected": not first}
                    first = False
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            yield json.loads(msg.data)
                        elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                            break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                refused = self._refusal(e)
                if not reconnect:
                    failed = Unreachable(f"events stream from {self.where} failed: {e}")
                    raise refused or failed from e
                log.warning(
                    "events stream from %s failed (%s); reconnecting", self.where, refused or e
                )
            else:
                if not reconnect:
                    return
            first = False
            await asyncio.sleep(retry_delay)


def _file_error(status: int, body: bytes, name: str, path: str) -> LxdError:
    """The error of a failed files API request, from its JSON envelope when it has one."""
    try:
        message = json.loads(body).get("error") or f"HTTP {status}"
    except (ValueError, AttributeError):
        message = f"HTTP {status}"
    return error_for_status(status, f"read {path} in {name}: {message}")


def not_running(error: LxdError) -> bool:
    """Whether a stop failed only because the instance was not running."""
    message = error.message.lower()
    return "already stopped" in message or "not running" in message


def image_source(image: str, *, server: str = "", protocol: str = "simplestreams") -> dict:
    """The ``source`` of an instance created from a local image alias or fingerprint.

    A string of 12 to 64 hex digits is taken as a fingerprint (prefix), anything else as an
    alias. ``server`` names a remote image server (then ``image`` is an alias there).
    """
    is_fingerprint = 12 <= len(image) <= 64 and all(c in "0123456789abcdef" for c in image)
    source: dict[str, Any] = {"type": "image"}
    source["fingerprint" if is_fingerprint else "alias"] = image
    if server:
        source.update(server=server, protocol=protocol, mode="pull")
    return source


def ipv4_addresses(state: Mapping, interface: str = "eth0") -> list[str]:
    """Global IPv4 addresses of an interface in ``GET …/state``'s answer."""
    network = (state or {}).get("network") or {}
    nic = network.get(interface) or {}
    return [
        a["address"]
        for a in nic.get("addresses") or []
        if a.get("family") == "inet" and a.get("scope") == "global"
    ]


def host_from_endpoint(endpoint: str) -> str:
    """The host name of an https:// endpoint, or "" for the local socket."""
    return urlsplit(endpoint).hostname or "" if endpoint.startswith("https://") else ""


__all__ = [
    "ExecResult",
    "LxdClient",
    "NotFound",
    "PinnedCertificate",
    "ServerCertificateMismatch",
    "host_from_endpoint",
    "image_source",
    "ipv4_addresses",
]

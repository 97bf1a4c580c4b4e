"""The admin endpoint: a small JSON-over-HTTP/1.1 interface, off by default.

Routes (RFC 9110 semantics, RFC 9112 message syntax)::

    GET  /                              the list of routes
    GET  /exports                       {"exports": [ExportStatus...]}
    GET  /clients                       {"clients": [ClientStatus...]}
    POST /clients/<id>/disconnect       drop one client (200, or 404 if unknown)
    GET  /metrics                       Prometheus text format (nbdqcow.metrics)

Why not aiohttp: five fixed routes, no bodies to parse, no TLS, no streaming;
aiohttp would add about ten packages (multidict, yarl, frozenlist, aiosignal,
propcache...) to a server whose only other dependency is a decompressor.  The
parser here reads one request per connection with strict size and time limits
and answers with ``Connection: close``, which every HTTP client and the
Prometheus scraper handle.

Security: there is no authentication.  The endpoint can drop clients and
reveals export paths and client addresses, so it listens on 127.0.0.1 or on
a Unix socket created with mode 0600 (owner only); put it on a network
address only behind something that authenticates.

The server provides the data through the :class:`ServerState` protocol and
records traffic in a :class:`~nbdqcow.metrics.Metrics`; this module depends
on neither the server nor the protocol core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from types import TracebackType
from typing import Protocol, runtime_checkable

from nbdqcow.config import Address, TcpAddress, UnixAddress
from nbdqcow.errors import NbdqcowError
from nbdqcow.metrics import CONTENT_TYPE, Metrics

__all__ = ["AdminError", "AdminServer", "ClientStatus", "ExportStatus", "ServerState"]

log = logging.getLogger("nbdqcow.admin")

#: Longest request head (request line and headers) accepted.
MAX_HEAD = 8192
#: Longest request body accepted (and discarded: no route takes a body).
MAX_BODY = 65536
#: Seconds a client may take to send its request (against slowloris).
REQUEST_TIMEOUT = 10.0


class AdminError(NbdqcowError):
    """The admin endpoint cannot listen where it was asked to."""


@dataclass(frozen=True, slots=True)
class ExportStatus:
    """One export as the admin endpoint shows it."""

    name: str
    image: str
    format: str | None
    read_only: bool
    description: str
    #: Virtual size in bytes; None if the image is not open yet.
    size: int | None
    #: Clients currently attached to this export.
    clients: int
    #: False once removed by a reload while clients still finish.
    accepting: bool = True


@dataclass(frozen=True, slots=True)
class ClientStatus:
    """One connected client."""

    #: Opaque, unique for the server's lifetime; used in /clients/<id>/disconnect.
    id: str
    #: ``"host:port"``, ``"[v6]:port"`` or ``"unix"`` (plus the socket path if known).
    address: str
    #: None while the client is still in the handshake.
    export: str | None
    bytes_read: int
    bytes_written: int
    requests: int
    #: Unix time of accept().
    connected_since: float
    tls: bool = False


@runtime_checkable
class ServerState(Protocol):
    """What the admin endpoint reads from, and asks of, the running server."""

    def exports(self) -> Sequence[ExportStatus]:
        """Every export, including removed ones whose clients are still connected."""
        ...

    def clients(self) -> Sequence[ClientStatus]:
        """Every connected client."""
        ...

    async def disconnect(self, client_id: str) -> bool:
        """Drop a client (as on shutdown: in-flight requests finish or fail with
        ESHUTDOWN); False if there is no such client."""
        ...


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def _client_json(c: ClientStatus) -> dict[str, object]:
    d = asdict(c)
    d["connected_since"] = _iso(c.connected_since)
    return d


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str


@dataclass(slots=True)
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, obj: object, status: HTTPStatus = HTTPStatus.OK) -> _Response:
        return cls(status, json.dumps(obj, indent=1).encode() + b"\n")


ROUTES = {
    "/": "this list",
    "/exports": "GET: exports and their attached clients",
    "/clients": "GET: connected clients with their traffic",
    "/clients/<id>/disconnect": "POST: drop one client",
    "/metrics": "GET: Prometheus metrics",
}


class AdminServer:
    """The HTTP endpoint; an async context manager.

    Example::

        async with AdminServer(state, metrics) as admin:
            await admin.start(TcpAddress("127.0.0.1", 9109))
            ...
    """

    def __init__(self, state: ServerState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._unix_paths: list[str] = []

    @property
    def addresses(self) -> list[Address]:
        """Where it listens, with the actual port when 0 was asked for."""
        out: list[Address] = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                if sock.family == socket.AF_UNIX:
                    out.append(UnixAddress(name))
                else:
                    out.append(TcpAddress(name[0], name[1]))
        return out

    async def start(self, address: Address) -> None:
        """Listen on ``address`` (may be called several times)."""
        try:
            if isinstance(address, UnixAddress):
                sock = _unix_listener(address.path)
                self._unix_paths.append(address.path)
                server = await asyncio.start_unix_server(
                    self._handle, sock=sock, limit=MAX_HEAD
                )
            else:
                server = await asyncio.start_server(
                    self._handle, address.host, address.port, limit=MAX_HEAD
                )
        except OSError as exc:
            raise AdminError(f"admin endpoint {address}: {exc.strerror or exc}") from None
        self._servers.append(server)

    def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()

    async def wait_closed(self) -> None:
        for server in self._servers:
            await server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> AdminServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    # -- one connection, one request ---------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        head_only = False
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT)
                head_only = request.method == "HEAD"
                response = await self._route(request)
                extra: dict[str, str] = {}
            except _HttpError as exc:
                response = _Response.json({"error": str(exc)}, exc.status)
                extra = exc.headers
            except TimeoutError:
                response = _Response.json(
                    {"error": "request not received in time"}, HTTPStatus.REQUEST_TIMEOUT
                )
                extra = {}
            _write_response(writer, response, extra, head_only)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, request: _Request) -> _Response:
        path = request.path.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        if parts == []:
            _allow(request, "GET", "HEAD")
            return _Response.json({"routes": ROUTES})
        if parts == ["exports"]:
            _allow(request, "GET", "HEAD")
            return self._call(self._exports)
        if parts == ["clients"]:
            _allow(request, "GET", "HEAD")
            return self._call(self._clients)
        if parts == ["metrics"]:
            _allow(request, "GET", "HEAD")
            return _Response(HTTPStatus.OK, self.metrics.render(), CONTENT_TYPE)
        if len(parts) == 3 and parts[0] == "clients" and parts[2] == "disconnect":
            _allow(request, "POST")
            try:
                found = await self.state.disconnect(parts[1])
            except Exception:
                log.exception("admin: disconnecting client %s failed", parts[1])
                raise _HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error") from None
            if not found:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"no client with id {parts[1]!r}")
            return _Response.json({"disconnected": parts[1]})
        raise _HttpError(HTTPStatus.NOT_FOUND, f"no such resource: {path}")

    def _exports(self) -> _Response:
        return _Response.json({"exports": [asdict(e) for e in self.state.exports()]})

    def _clients(self) -> _Response:
        return _Response.json({"clients": [_client_json(c) for c in self.state.clients()]})

    @staticmethod
    def _call(fn: _ResponseFactory) -> _Response:
        try:
            return fn()
        except Exception:
            # A bug in the server's state reporting must not kill the endpoint,
            # nor leak a traceback to the HTTP client.
            log.exception("admin: building a response failed")
            raise _HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error") from None


def _allow(request: _Request, *methods: str) -> None:
    if request.method not in methods:
        raise _HttpError(
            HTTPStatus.METHOD_NOT_ALLOWED,
            f"{request.method} not allowed here; use {' or '.join(methods)}",
            {"Allow": ", ".join(methods)},
        )


class _ResponseFactory(Protocol):
    def __call__(self) -> _Response: ...


def _unix_listener(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` with mode 0600, replacing a stale one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise AdminError(f"admin endpoint unix:{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left behind by a server that died: safe to replace
        else:
            raise AdminError(f"admin endpoint unix:{path}: another process listens there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # chmod before listen(): nobody can connect in between.
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_request(reader: asyncio.StreamReader) -> _Request:
    """Read one request head (and discard any body) -- RFC 9112 sections 2-6."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _HttpError(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head over {MAX_HEAD} bytes"
        ) from None
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise
        raise _HttpError(HTTPStatus.BAD_REQUEST, "incomplete request head") from None
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "request head is not ASCII") from None
    lines = text.split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, _ = request_line
    if not target.startswith("/"):
        raise _HttpError(HTTPStatus.BAD_REQUEST, "request target must be a path")
    length = 0
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:40]!r}")
        name = name.lower()
        value = value.strip()
        if name == "transfer-encoding":
            raise _HttpError(HTTPStatus.NOT_IMPLEMENTED, "request bodies must use Content-Length")
        if name == "content-length":
            if not value.isdigit():
                raise _HttpError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {value!r}")
            length = int(value)
    if length > MAX_BODY:
        raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes")
    if length:
        await reader.readexactly(length)  # no route takes a body: read it so the close is clean
    return _Request(method, target)


def _write_response(
    writer: asyncio.StreamWriter, response: _Response, extra: dict[str, str], head_only: bool
) -> None:
    status = response.status
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body)),
        "Cache-Control": "no-store",
        "Connection": "close",
        **extra,
    }
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(head.encode("ascii"))
    if not head_only:
        writer.write(response.body)

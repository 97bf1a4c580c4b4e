"""The asyncio NBD server: listeners, exports, limits and clean shutdown.

:class:`NbdServer` accepts clients on any number of Unix and TCP (IPv4 and
IPv6, ``TCP_NODELAY``) sockets and runs one :class:`nbdqcow.session.Session`
per client against a shared :class:`~nbdqcow.exports.ExportCatalog`.  How a
connection is served (zero copy, concurrency, batching, error mapping, and
the measurements behind those choices) is documented in
:mod:`nbdqcow.session`.

Shutdown (SIGTERM/SIGINT, or :meth:`NbdServer.close`) follows proto.md
"Terminating the transmission phase": stop accepting, answer further options
with ``NBD_REP_ERR_SHUTDOWN`` and new requests with ``NBD_ESHUTDOWN``, let
in-flight requests finish within ``shutdown_timeout``, flush every writable
export, then close the connections.

Handshake cost (issue 6's ``handshakes`` workload: libnbd connect + GO +
shutdown, qcow2, Unix socket; 2 shared cores, load 2-3, A/B in one run,
server CPU from ``/proc/PID/stat``, 4000 handshakes x 5): 357 -> 295 us of
user CPU per handshake from this module's accept path (listener-inherited
TCP options, no enum conversions, no wrapper coroutine), the protocol core's
handshake fast paths (:mod:`nbdqcow.nbd.handshake` and
:mod:`nbdqcow.nbd.decisions`: 85 -> 47 us alone) and cheaper log records
(:mod:`nbdqcow.cli._logsetup`); system time stays ~60-75 us
(one ``accept4``, ``getsockname``, ``ioctl``, two ``setsockopt``, three
``sendmsg``/``recvfrom``, ``shutdown``, ``close``, four ``epoll_wait``, two
``epoll_ctl``: 29 syscalls, 8 of them ``getpid`` from asyncio).  qemu-nbd
7.2 on the same run: 18 us user + 80 us system.  For scale, the protocol
core driven by bare asyncio reader callbacks (no session, task, timeout or
log line: ``/tmp`` prototype) costs 160 us user + 70 us system: the event
loop's Python code and the core's generators set the floor of this design,
above what the 0.8x target needs.

The handshake timeout is one timer for the whole server
(:meth:`NbdServer._sweep`), not an ``asyncio.timeout`` per session: measured
in instructions (``valgrind --tool=callgrind`` on the server; a client
that pauses 20 ms before each message, so that every message finds the
server idle, as in the benchmark), the per-connection timer was ~40 k of
~910 k instructions per libnbd handshake (with the session's timer gone
and :meth:`nbdqcow.exports.Export.info`: 914 k -> 810 k).

Where the 0.8x target stands (same method, 2026-11-25): a bare asyncio
callback server answering libnbd's handshake with prebuilt bytes costs 175 k
instructions, ~58 us user + ~50 us system per handshake (6.8 k/s, about
qemu-nbd's rate); driving the real protocol core from the same callbacks
adds ~195-210 k instructions (~70 us: 3.7 k/s, ~0.6x).  The system time is
the four wake-ups of the client (greeting, two option replies, EOF) plus
accept and close, which qemu-nbd pays too (70-80 us); so with this event
loop and core the floor is near 0.6x before any session bookkeeping, and
0.8x would need the core's handshake itself several times cheaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from nbdqcow.admin import ClientStatus, ExportStatus
from nbdqcow.backends.base import BlockBackend
from nbdqcow.backends.open import open_backend
from nbdqcow.buffers import BufferPool
from nbdqcow.exports import ExportCatalog
from nbdqcow.metrics import Metrics
from nbdqcow.nbd import ProtocolLimits
from nbdqcow.poll import DEFAULT_POLL_NS
from nbdqcow.session import Session, nbd_errno
from nbdqcow.tls import TlsConfig

__all__ = [
    "DEFAULT_PORT",
    "BufferPool",
    "NbdServer",
    "ServerOptions",
    "nbd_errno",
    "open_image",
]

log = logging.getLogger("nbdqcow.server")

#: The IANA-registered NBD port.
DEFAULT_PORT = 10809


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Server-wide policy (the protocol core's own bounds are in ``limits``).

    Attributes:
        handshake_timeout: seconds a client may take from connecting to
            entering transmission (qemu-nbd ``--handshake-limit``).
        max_in_flight: requests served concurrently per connection (64, as
            in the config file's default: measured +10% 4 KiB random reads
            at QD32 over 16, since answered requests hold their slot
            until their reply is sent).
        max_in_flight_bytes: payload bytes (reads and writes) a connection's
            running requests may hold at once; the reader waits beyond it,
            so 16 requests of 32 MiB cannot pin 512 MiB per client.  A single
            request larger than this still runs, alone.
        max_connections: clients at once; more are closed on accept.
        payload_timeout: seconds a started WRITE payload may take to arrive.
        poll_max_us: microseconds a connection that is alone on the server
            may spin for its next request before going back to the event
            loop (:mod:`nbdqcow.poll`, qemu's ``poll-max-ns``); 0 disables.
        shutdown_timeout: how long in-flight requests may take to finish
            after SIGTERM before their connections are cut.
        tls: x509 credentials and mode; ``None`` is NOTLS.
        limits: the protocol core's bounds.
        metrics: where to record requests and connections (Prometheus).
    """

    handshake_timeout: float = 10.0
    max_in_flight: int = 64
    max_in_flight_bytes: int = 64 * 1024 * 1024
    max_connections: int = 256
    payload_timeout: float = 30.0
    poll_max_us: int = DEFAULT_POLL_NS // 1000
    shutdown_timeout: float = 10.0
    tls: TlsConfig | None = None
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)
    metrics: Metrics | None = None


async def open_image(path: str, *, fmt: str | None = None, read_only: bool = False,
                     snapshot: str | None = None) -> BlockBackend:
    """Open an image file (raw or qcow2; probed when ``fmt`` is None), or
    one of its internal snapshots (read-only, like ``qemu-nbd -l``).

    Opening parses metadata with synchronous reads, which is fine here: it
    happens before the server accepts anything.

    Raises:
        NbdqcowError: the image is unusable (format, corruption, policy).
        OSError: the file cannot be opened.
    """
    return open_backend(path, fmt=fmt, read_only=read_only or snapshot is not None,
                        snapshot=snapshot)


#: Linux copies a listening TCP socket's options (``TCP_NODELAY``,
#: ``SO_KEEPALIVE``) to the sockets it accepts, so they are set once on the
#: listener; elsewhere they are set per connection as well.
_TCP_OPTIONS_INHERITED = sys.platform.startswith("linux")


def _tune_tcp(sock: socket.socket) -> None:
    """proto.md: both sides SHOULD set TCP_NODELAY; keepalive lets the
    kernel notice clients that vanished without a FIN (a crashed or
    powered-off machine), which would otherwise hold a connection slot
    forever."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


#: Why a client that did not finish its handshake in time was dropped
#: (:meth:`NbdServer._sweep`; the session maps it to the "timeout" metric).
HANDSHAKE_TIMED_OUT = "dropped: handshake timed out"


def _describe_peer(tcp: bool, addr: object) -> str:
    if not tcp:
        return "unix"
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class NbdServer:
    """Serve the exports of a catalog on any number of listening sockets.

    Usage (see ``examples/embed_server.py``)::

        async with ExportCatalog() as catalog:
            catalog.add("disk", RawBackend("disk.img", read_only=False))
            server = NbdServer(catalog)
            await server.listen_tcp("127.0.0.1", 10809)
            await server.serve_forever()     # until server.close()

    The catalog stays the caller's; :meth:`serve_forever` flushes every
    writable export when it stops, and the catalog closes the backends.
    """

    def __init__(self, catalog: ExportCatalog, options: ServerOptions | None = None) -> None:
        self.catalog = catalog
        self.options = options or ServerOptions()
        # Built once (loading the key per client would cost a lot) and now,
        # so that bad credentials fail at start-up, not at the first client.
        self.tls_context = self.options.tls.context() if self.options.tls is not None else None
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        # listener fd -> timer re-registering it after an accept error
        self._backoffs: dict[int, asyncio.TimerHandle] = {}
        self._conns: dict[asyncio.Task[None], Session] = {}
        #: clients not yet in transmission -> handshake deadline (loop time),
        #: in accept order: the handshake timeout (_sweep)
        self._handshaking: dict[Session, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._next_id = 1
        self._closing = asyncio.Event()
        self._closed = False
        self.stopping = False
        self.addresses: list[str] = []

    # -- listening -----------------------------------------------------------
    async def listen_unix(self, path: str) -> str:
        """Listen on a Unix socket (a stale socket file is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(path)
                except ConnectionRefusedError:
                    os.unlink(path)  # nobody listens: left over from a crash
                else:
                    raise OSError(errno.EADDRINUSE, "another server listens there", path)
                finally:
                    probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, e.strerror, path) from None
        self._unix_paths.append(path)
        where = f"unix:{path}"
        self._listen(sock, where)
        return where

    async def listen_tcp(self, host: str | None, port: int) -> list[str]:
        """Listen on every address ``host`` resolves to (IPv4 and/or IPv6)."""
        loop = asyncio.get_running_loop()
        where_asked = f"{host or '*'}:{port}"
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            # name the address: "300.1.1.1:10809: Name or service not known"
            raise OSError(e.errno, e.strerror, where_asked) from None
        out: list[str] = []
        seen: set[tuple[int, object]] = set()
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # one socket per family, as getaddrinfo lists both
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
            except OSError as e:
                sock.close()
                raise OSError(e.errno, e.strerror, where_asked) from None
            h, p = sock.getsockname()[:2]
            where = f"tcp:[{h}]:{p}" if family == socket.AF_INET6 else f"tcp:{h}:{p}"
            self._listen(sock, where)
            out.append(where)
        return out

    @property
    def connection_count(self) -> int:
        """Clients connected right now."""
        return len(self._conns)

    def add_listener(self, sock: socket.socket) -> str:
        """Serve on an already-bound socket (e.g. from systemd activation)."""
        if sock.family == socket.AF_UNIX:
            where = f"unix:{sock.getsockname()}"
        else:
            h, p = sock.getsockname()[:2]
            where = f"tcp:[{h}]:{p}" if sock.family == socket.AF_INET6 else f"tcp:{h}:{p}"
        self._listen(sock, where)
        return where

    @property
    def ports(self) -> list[int]:
        """TCP ports listened on (useful after binding port 0)."""
        return [s.getsockname()[1] for s in self._listeners if s.family != socket.AF_UNIX]

    def _listen(self, sock: socket.socket, where: str) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            _tune_tcp(sock)  # inherited by accepted sockets (_TCP_OPTIONS_INHERITED)
        sock.listen(128)
        sock.setblocking(False)
        self._listeners.append(sock)
        self.addresses.append(where)
        self._start_accepting(sock)
        log.info("listening on %s (exports: %s)", where,
                 ", ".join(repr(e.name) for e in self.catalog) or "none")

    def _start_accepting(self, lsock: socket.socket) -> None:
        # The listening fd stays registered (loop.sock_accept registers and
        # unregisters it around every client: two epoll_ctl calls and
        # selector bookkeeping per handshake) and the client is accepted in
        # the reader callback itself, one per call: the epoll readiness is
        # fresh, so accept() succeeds without a trailing EAGAIN probe, and no
        # task switch sits between readiness and accept.  Several waiting
        # clients make the level-triggered fd report again at the next
        # iteration.  Measured (strace -c, handshake loop): 1 accept4 per
        # connection instead of 3 with an accept task woken by an Event.
        # (Accepting in a loop until EAGAIN would add a failed accept4 and an
        # exception to every wake-up of a server whose clients come one at a
        # time, the common case.)
        #
        # socket.accept() is a Python wrapper around the C accept: it reads
        # the listener's family and type through properties that convert
        # them to enums, and asks for the default timeout, at every client
        # (~3 us of ~20 us per accept on the CI machine, timeit); the C
        # call and the socket constructor are used here with the listener's
        # numbers, taken once.  The socket stays non-blocking for the
        # session (its stream sets that anyway).
        tcp = lsock.family in (socket.AF_INET, socket.AF_INET6)
        accept_fd: Callable[[], tuple[int, object]] = lsock._accept  # type: ignore[attr-defined]
        ids = (int(lsock.family), int(lsock.type), lsock.proto)
        asyncio.get_running_loop().add_reader(lsock.fileno(), self._on_acceptable, lsock,
                                              accept_fd, ids, tcp)

    def _on_acceptable(self, lsock: socket.socket, accept_fd: Callable[[], tuple[int, object]],
                       ids: tuple[int, int, int], tcp: bool) -> None:
        try:
            fd, addr = accept_fd()
            try:
                sock = socket.socket(*ids, fd)
            except BaseException:
                os.close(fd)
                raise
        except (BlockingIOError, InterruptedError):
            return  # another process sharing the listener took it
        except OSError as e:
            # EMFILE and friends: back off instead of spinning on a
            # listener that stays readable.
            log.warning("accept failed: %s", e.strerror or e)
            loop = asyncio.get_running_loop()
            loop.remove_reader(lsock.fileno())
            self._backoffs[lsock.fileno()] = loop.call_later(0.1, self._resume_accepting, lsock)
            return
        self._accepted(sock, addr, tcp)

    def _resume_accepting(self, lsock: socket.socket) -> None:
        self._backoffs.pop(lsock.fileno(), None)
        if not self._closed and lsock.fileno() >= 0:
            self._start_accepting(lsock)

    def _accepted(self, sock: socket.socket, addr: object, tcp: bool) -> None:
        peer = _describe_peer(tcp, addr)
        if len(self._conns) >= self.options.max_connections:
            log.warning("connection from %s refused: %d clients already", peer,
                        len(self._conns))
            sock.close()
            return
        if tcp and not _TCP_OPTIONS_INHERITED:
            _tune_tcp(sock)
        cid = self._next_id
        self._next_id += 1
        conn = Session(self, sock, peer, cid, addr)
        # No log line here: the session logs one line when the handshake
        # completes ("opened ... serving") and one when it closes; a third
        # line per connection cost ~10% of a handshake's server CPU (issue 6).
        if self.options.metrics is not None:
            self.options.metrics.connection_opened()
        # The session's own coroutine is the task (no wrapper coroutine to
        # step through at every resume); the bookkeeping runs when it ends.
        task = conn.loop.create_task(conn.run())
        self._conns[task] = conn
        task.add_done_callback(self._conn_done)
        loop = conn.loop
        deadline = loop.time() + self.options.handshake_timeout
        self._handshaking[conn] = deadline
        if self._sweeper is None:
            self._sweeper = loop.call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        """Drop the clients whose handshake outlived ``handshake_timeout``.

        One timer for the whole server instead of one per connection
        (issue 6: an ``asyncio.timeout`` around each handshake cost ~40 k
        instructions of a ~670 k one, callgrind): it fires at the oldest
        deadline; clients that reached transmission or left meanwhile are
        forgotten here, lazily.  Deadlines grow in accept order (one
        timeout for all), so the scan stops at the first one ahead.
        """
        self._sweeper = None
        hs = self._handshaking
        if not hs or self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn, deadline in list(hs.items()):
            if conn.in_transmission or conn.stream.closed:
                del hs[conn]
            elif deadline <= now:
                del hs[conn]
                # The session ends as for any abort (its reader task is
                # cancelled); it reports this reason as a timeout.
                conn.abort(HANDSHAKE_TIMED_OUT)
            else:
                self._sweeper = loop.call_at(deadline, self._sweep)
                return

    def _conn_done(self, task: asyncio.Task[None]) -> None:
        conn = self._conns.pop(task, None)
        if conn is not None:
            self._handshaking.pop(conn, None)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and conn is not None:
                # a bug: log it, keep serving the others
                log.error("connection %d: internal error: %s", conn.cid, exc, exc_info=exc)
                conn.stream.close()
        if self.options.metrics is not None:
            self.options.metrics.connection_closed()

    # -- the admin endpoint's view (nbdqcow.admin.ServerState) ----------------
    def exports(self) -> list[ExportStatus]:
        """Every export, with how many clients use it."""
        return [
            ExportStatus(name=e.name, image=e.image, format=e.format,
                         read_only=e.backend.caps.read_only, description=e.description,
                         size=e.backend.size, clients=self.catalog.users(e))
            for e in self.catalog
        ]

    def clients(self) -> list[ClientStatus]:
        """Every connected client."""
        return [
            ClientStatus(id=str(c.cid), address=c.peer,
                         export=c.export.name if c.in_transmission and c.export else None,
                         bytes_read=c.bytes_read, bytes_written=c.bytes_written,
                         requests=c.requests, connected_since=c.connected_since, tls=c.tls)
            for c in self._conns.values()
        ]

    async def disconnect(self, client_id: str) -> bool:
        """Drop one client as shutdown would: further requests get
        ``ESHUTDOWN``, in-flight ones finish (bounded), then it is closed."""
        for task, c in self._conns.items():
            if str(c.cid) == client_id:
                c.begin_shutdown()
                c.abort("disconnected by the administrator", hard=False)
                await asyncio.wait({task}, timeout=self.options.shutdown_timeout + 1)
                return True
        return False

    # -- running and stopping --------------------------------------------------
    def close(self) -> None:
        """Ask :meth:`serve_forever` to shut down (safe from signal handlers)."""
        self._closing.set()

    def install_signal_handlers(self) -> None:
        """Shut down cleanly on SIGTERM and SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        log.info("%s received, shutting down", signal.Signals(sig).name)
        self.close()

    async def serve_forever(self) -> None:
        """Serve until :meth:`close`, then shut down cleanly."""
        try:
            await self._closing.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, refuse new options and requests, let in-flight
        requests finish (at most ``shutdown_timeout``), flush writable exports
        and close every connection.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stopping = True
        self._closing.set()
        for h in self._backoffs.values():
            h.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        loop = asyncio.get_running_loop()
        for s in self._listeners:
            # unregister before closing: the fd number may be reused at once
            loop.remove_reader(s.fileno())
            s.close()
        for p in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(p)
        conns = dict(self._conns)
        for c in conns.values():
            # From here the core answers options ERR_SHUTDOWN and requests
            # ESHUTDOWN; nothing to send yet (waiting on a send here could
            # hang on a client that does not read).
            c.begin_shutdown()
        pending = [t for c in conns.values() for t in c.tasks]
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.options.shutdown_timeout)
            if late:
                log.warning("%d requests still running after %.0f s; cutting them off",
                            len(late), self.options.shutdown_timeout)
                for t in late:
                    t.cancel()
        for task in conns:
            task.cancel()
        if conns:
            await asyncio.gather(*conns, return_exceptions=True)
        await self.catalog.flush_all()
        log.info("server stopped")

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

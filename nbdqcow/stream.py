"""Byte streams the server runs NBD over: a plain non-blocking socket, or
that socket after STARTTLS (an ``ssl.SSLObject`` over memory BIOs).

Why raw sockets and not asyncio transports: on Python 3.11,
``Transport.writelines`` joins its buffers into one new ``bytes`` (3.12 got
``sendmsg``), which would copy every read payload; a raw socket lets a reply
go out as header + payload views in one ``sendmsg`` and lets a write payload
be received straight into the buffer that is handed to ``pwritev``.  A quick
measurement on the 2-core CI machine (16 requests in flight over a Unix
socket, 16-byte header + payload per reply; numbers are noisy on a shared
machine, best of three):

    ===========================  ===============  ===============
    payload                      sock_recv_into   BufferedProtocol
                                 + sendmsg        + writelines
    ===========================  ===============  ===============
    4 KiB replies                 80 k req/s       79 k req/s
    64 KiB replies                1.96 GB/s        1.83 GB/s
    ===========================  ===============  ===============

so the raw-socket design costs nothing in request rate and wins on large
payloads (no join copy), while keeping the zero-copy contract.

Since issue 6: a receive that finds bytes waiting never suspends, and the
fd stays registered with the loop between waits (``sock_recv_into``
registers and unregisters it per call); read replies may contain
:class:`FileSpan` parts, sent with ``os.sendfile`` behind the header
(``MSG_MORE``), within the same write turn; ``SO_SNDBUF``/``SO_RCVBUF`` are
raised to 4 MiB.  Measured with fio/nbdcopy on the shared CI machine (numbers
in :mod:`nbdqcow.session`): QD1 4 KiB random reads 9.3k -> 12.9k IOPS from
the receive path alone; raw sequential reads ~0.8 -> 1.8-2.0 GiB/s and
0.84 -> 0.20-0.28 CPU-s/GiB with sendfile.

Writes are atomic per reply: :meth:`send` first tries one synchronous
``sendmsg`` of all the parts (the usual case: nothing to await at all) and
only if the kernel takes part of it does it wait, while holding the stream's
write turn, so no other reply can slip in between two parts of this one.
:meth:`PlainStream._push` is that synchronous step for every kind of reply,
:class:`FileSpan` parts included (``sendmsg`` of the header with
``MSG_MORE``, ``sendfile`` of the span); a coroutine exists only while the
socket is full.  In a sequential read the socket usually *is* full (the
client is the slower side), and the two coroutines per reply this replaced
were a visible part of the server's CPU (numbers in
:mod:`nbdqcow.dataplane`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import socket
import ssl
from collections.abc import Callable, Coroutine, Sequence

from nbdqcow.backends.base import Buffer

__all__ = ["FileSpan", "PlainStream", "Stream", "TlsStream"]

#: Send buffer asked for each client socket.
_SNDBUF = 4 << 20
#: Linux's IOV_MAX: the most buffers one sendmsg accepts.
_IOV_MAX = 1024
#: TLS records carry at most 16 KiB of plaintext; feeding the SSLObject in
#: bigger pieces just makes it split them.
_TLS_READ = 256 * 1024


class FileSpan:
    """Reply bytes to send straight from a file with ``os.sendfile``.

    ``pad`` is ``count`` zero bytes, sent for whatever the file no longer has
    (a raw image truncated under the server reads as zeroes past its end).
    Only :class:`PlainStream` sends these; the session never gives one to a
    TLS stream.
    """

    __slots__ = ("count", "fd", "offset", "pad")

    def __init__(self, fd: int, offset: int, count: int, pad: memoryview) -> None:
        self.fd = fd
        self.offset = offset
        self.count = count
        self.pad = pad


def _nbytes(b: Buffer) -> int:
    return b.nbytes if isinstance(b, memoryview) else len(b)


class Stream:
    """A connected, non-blocking socket with atomic vectored sends."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            # Large read replies leave in one sendmsg instead of a partial
            # send, a wait for POLLOUT and the rest (issue 6: the kernel's
            # 208 KiB default halved sequential read throughput).  Memory is
            # only used while replies are queued; capped by wmem_max.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            # Likewise for WRITE payloads: more of a big payload per wake-up.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SNDBUF)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        # The right to write: held by at most one sender, handed directly to
        # the next waiter in FIFO order.  (asyncio.Lock is not enough: between
        # a release and the woken waiter running, ``locked()`` is False, and a
        # fast-path sender that then sent part of its reply would have to
        # queue *behind* that waiter -- which would write into the middle of
        # the half-sent reply.)
        self._busy = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._writable: asyncio.Future[None] | None = None
        # Readability: the fd stays registered between waits (see
        # _wait_readable), so a busy connection costs no epoll_ctl per request.
        self._readable: asyncio.Future[None] | None = None
        self._reading = False
        self._idle_fires = 0
        self.closed = False

    # -- the write turn ------------------------------------------------------
    def _take_turn_now(self) -> bool:
        if self._busy or self._waiters:
            return False
        self._busy = True
        return True

    async def _take_turn(self) -> None:
        if self._take_turn_now():
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._end_turn()  # the turn was handed to us: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def _end_turn(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # still busy: the turn is handed over
                return
        self._busy = False

    # -- reading -----------------------------------------------------------
    async def recv_into(self, buf: memoryview) -> int:
        """Receive at most ``len(buf)`` bytes into ``buf``; 0 means EOF."""
        raise NotImplementedError

    def try_recv_into(self, buf: memoryview) -> int | None:
        """Receive what is already there without waiting; ``None`` if that
        would block (or cannot be known without awaiting, as with TLS)."""
        return None

    async def recv_exact(self, buf: memoryview) -> bool:
        """Fill ``buf`` completely; ``False`` if EOF came first."""
        pos = 0
        n = len(buf)
        while pos < n:
            got = await self.recv_into(buf[pos:])
            if got == 0:
                return False
            pos += got
        return True

    async def _wait_readable(self) -> None:
        """Wait until the socket has data (or EOF, or an error).

        asyncio's ``sock_recv_into`` registers the fd with epoll before each
        wait and unregisters it after: two ``epoll_ctl`` calls and selector
        bookkeeping per request on a connection doing one request at a time.
        Here the registration is kept while the connection is busy and only
        dropped when it fires with nobody waiting (level-triggered: it would
        fire on every loop iteration while the reader is held back).
        """
        if self.closed:
            raise ConnectionAbortedError(errno.ECONNABORTED, "connection closed")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._readable = fut
        if not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True
        try:
            await fut
        finally:
            if self._readable is fut:
                self._readable = None

    def _on_readable(self) -> None:
        fut = self._readable
        if fut is not None and not fut.done():
            self._idle_fires = 0
            fut.set_result(None)
            return
        # Fired before the woken reader got to read (normal, once), or while
        # the reader is held back by back-pressure: stop watching then.
        self._idle_fires += 1
        if self._idle_fires > 2:
            self._stop_reading()

    def set_read_callback(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` from the event loop whenever the socket is
        readable (level-triggered), or stop with ``None``.

        The session's transmission pump (:mod:`nbdqcow.session`) reads from
        this callback directly: no future, no task wake-up, no second
        ``epoll_wait`` per request.  Replaces :meth:`_wait_readable`'s
        registration; do not mix the two at the same time.
        """
        if callback is None:
            self._stop_reading()
            return
        if self.closed:
            raise ConnectionAbortedError(errno.ECONNABORTED, "connection closed")
        self._loop.add_reader(self.sock.fileno(), callback)
        self._reading = True
        self._idle_fires = 0

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._idle_fires = 0
            self._loop.remove_reader(self.sock.fileno())

    # -- writing -----------------------------------------------------------
    async def send(self, bufs: Sequence[Buffer]) -> None:
        """Send all of ``bufs`` as one unit: no other :meth:`send` interleaves."""
        raise NotImplementedError

    def send_start(self, bufs: Sequence[Buffer]) -> Coroutine[None, None, None] | None:
        """Like :meth:`send`, but try to finish without awaiting.

        Returns ``None`` when everything went out at once, else a coroutine
        that completes the send (already ordered behind earlier sends).
        """
        return self.send(bufs)

    @property
    def busy(self) -> bool:
        """A send is in progress or queued."""
        return self._busy or bool(self._waiters)

    async def drain(self) -> None:
        """Return once every :meth:`send` started before this call is done
        (the write turn is FIFO, and an incomplete send holds it)."""
        if self._busy or self._waiters:
            await self._take_turn()
            self._end_turn()

    async def _sock_sendv(self, bufs: Sequence[Buffer], flags: int = 0) -> None:
        """Plain vectored send of everything; the caller has the write turn."""
        views = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
        views = [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in views]
        while views:
            batch = views[:_IOV_MAX]
            try:
                sent = self.sock.sendmsg(batch, (), flags)
            except (BlockingIOError, InterruptedError):
                sent = 0
            # Drop what went out, keep the rest (views, so nothing is copied).
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]
            if views and not sent:
                await self._wait_writable()

    async def _wait_writable(self) -> None:
        if self.closed:
            raise ConnectionAbortedError(errno.ECONNABORTED, "connection closed")
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_writer(fd, ready)
        self._writable = fut
        try:
            await fut
        finally:
            if self._writable is fut:  # else close() unregistered it already
                self._writable = None
                self._loop.remove_writer(fd)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            # A send blocked on a client that stopped reading must end too.
            # Unregister before closing: the fd number may be reused at once.
            self._stop_reading()
            r = self._readable
            if r is not None and not r.done():
                r.set_exception(ConnectionAbortedError(errno.ECONNABORTED, "connection closed"))
            w = self._writable
            if w is not None:
                self._writable = None
                self._loop.remove_writer(self.sock.fileno())
                if not w.done():
                    w.set_exception(
                        ConnectionAbortedError(errno.ECONNABORTED, "connection closed"))
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()


class PlainStream(Stream):
    """NBD in the clear."""

    def detach(self) -> socket.socket:
        """Hand the socket over (to a :class:`TlsStream`, after STARTTLS)."""
        self._stop_reading()
        self.closed = True
        return self.sock

    def try_recv_into(self, buf: memoryview) -> int | None:
        try:
            return self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return None

    async def recv_into(self, buf: memoryview) -> int:
        # Data already there (pipelined requests): no suspension at all.
        while True:
            try:
                return self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                await self._wait_readable()

    def send_start(self, bufs: Sequence[Buffer | FileSpan]
                   ) -> Coroutine[None, None, None] | None:
        """Send ``bufs`` (buffers and :class:`FileSpan` s) synchronously as
        far as the socket takes them (:meth:`_push`); only when it is full
        does the rest go to a coroutine, which keeps the write turn and
        waits for the socket between pushes.  A list passed in becomes the
        stream's until the send is done (partly sent parts are replaced)."""
        # _take_turn_now() and _end_turn() inlined for the usual case, no
        # other send in progress (one send per pump call: issue 6, QD1).
        if self._busy or self._waiters:
            return self._send_queued(bufs)
        self._busy = True
        parts = bufs if type(bufs) is list else list(bufs)
        try:
            i = self._push(parts, 0)
        except BaseException:
            self._end_turn()
            raise
        if i == len(parts):
            if self._waiters:
                self._end_turn()
            else:
                self._busy = False
            return None
        return self._send_rest(parts, i)

    async def send(self, bufs: Sequence[Buffer]) -> None:
        pending = self.send_start(bufs)
        if pending is not None:
            await pending

    async def _send_queued(self, bufs: Sequence[Buffer | FileSpan]) -> None:
        await self._take_turn()
        parts = list(bufs)
        try:
            i = self._push(parts, 0)
        except BaseException:
            self._end_turn()
            raise
        await self._send_rest(parts, i)

    async def _send_rest(self, parts: list[Buffer | FileSpan], i: int) -> None:
        """Finish sending ``parts[i:]`` with the write turn held; the turn
        is passed on at the end, whatever happens."""
        try:
            n = len(parts)
            while i < n:
                await self._wait_writable()
                i = self._push(parts, i)
        finally:
            self._end_turn()

    def _push(self, parts: list[Buffer | FileSpan], i: int) -> int:
        """Send ``parts[i:]`` until done or the socket is full, without
        waiting; return the index of the first part not completely sent
        (``len(parts)`` when all went out).  A part sent in part is
        replaced in ``parts`` by its rest.

        Buffers between file spans leave in one ``sendmsg`` (at most
        ``_IOV_MAX`` of them), with ``MSG_MORE`` when a span follows: on TCP
        a reply header then waits for its payload instead of leaving as a
        tiny segment of its own.  A :class:`FileSpan` goes out with
        ``os.sendfile``: the page cache to the socket without passing
        through Python (issue 6: 9.9 GiB/s vs 3.6-4.6 GiB/s for preadv +
        sendmsg on the CI machine); at the end of the file, its pad (zeroes)
        stands in for the rest.

        Issue 6: one synchronous loop for every reply.  Before, each reply
        with a span cost two coroutines (one per ``sendmsg``, one per
        ``sendfile``) whenever the socket was full -- which, in a sequential
        read, it nearly always is, the client being the slower side.
        """
        sock = self.sock
        n = len(parts)
        while i < n:
            p = parts[i]
            if type(p) is FileSpan:
                span: FileSpan = p
                try:
                    sent = os.sendfile(sock.fileno(), span.fd, span.offset, span.count)
                except (BlockingIOError, InterruptedError):
                    return i
                if sent == span.count:
                    i += 1
                elif sent == 0:  # end of the file: zeroes for the rest
                    parts[i] = span.pad
                else:
                    # Usually the socket filled up; or the file ended (the
                    # next sendfile, once writable, then returns 0).
                    parts[i] = FileSpan(span.fd, span.offset + sent, span.count - sent,
                                        span.pad[sent:])
                    return i
                continue
            j = i
            total = 0
            while j < n:
                q = parts[j]
                t = type(q)
                if t is FileSpan or j - i == _IOV_MAX:
                    break
                total += q.nbytes if t is memoryview else len(q)  # type: ignore[union-attr,arg-type]
                j += 1
            try:
                sent = sock.sendmsg(parts[i:j], (), socket.MSG_MORE if j < n else 0)  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                return i
            if sent == total:
                i = j
                continue
            # Drop what went out, keep the rest (views: nothing is copied).
            while sent:
                v = _byte_view(parts[i])  # type: ignore[arg-type]
                if sent >= v.nbytes:
                    sent -= v.nbytes
                    i += 1
                else:
                    parts[i] = v[sent:]
                    sent = 0
            return i
        return n


def _byte_view(b: Buffer) -> memoryview:
    v = b if type(b) is memoryview else memoryview(b)
    return v if v.format == "B" and v.ndim == 1 else v.cast("B")


class TlsStream(Stream):
    """NBD inside TLS, after ``NBD_OPT_STARTTLS``.

    The ``SSLObject`` is only touched synchronously between awaits, so the
    reader task and reply tasks never interleave inside it.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        super().__init__(sock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._rbuf = bytearray(_TLS_READ)
        self._eof = False

    @property
    def peer_certificate(self) -> dict[str, object] | None:
        cert = self._ssl.getpeercert()
        return dict(cert) if cert else None

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    async def handshake(self) -> None:
        """Run the TLS handshake.

        Raises:
            ssl.SSLError: the peer failed the handshake (bad or missing client
                certificate, no common version, not TLS at all).
            ConnectionError: the peer went away during it.
        """
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush_out()
                if not await self._fill():
                    raise ConnectionResetError("peer closed during the TLS handshake") from None
        await self._flush_out()

    async def _fill(self) -> bool:
        n = await self._loop.sock_recv_into(self.sock, memoryview(self._rbuf))
        if n == 0:
            self._in.write_eof()
            return False
        self._in.write(memoryview(self._rbuf)[:n])
        return True

    async def _flush_out(self) -> None:
        if self._out.pending:
            await self._take_turn()
            try:
                data = self._out.read()
                if data:
                    await self._sock_sendv([data])
            finally:
                self._end_turn()

    async def recv_into(self, buf: memoryview) -> int:
        if self._eof:
            return 0
        while True:
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                n: int = self._ssl.read(len(buf), buf)  # type: ignore[assignment]
                return n
            except ssl.SSLWantReadError:
                # TLS 1.3 may have produced records to send (key update).
                await self._flush_out()
                if not await self._fill():
                    self._eof = True
                    return 0
            except ssl.SSLZeroReturnError:
                self._eof = True
                return 0

    async def send(self, bufs: Sequence[Buffer]) -> None:
        # Encrypting copies anyway; doing it inside the turn keeps the records
        # of one reply contiguous on the wire.
        await self._take_turn()
        try:
            for b in bufs:
                if _nbytes(b):
                    self._ssl.write(b)
            data = self._out.read()
            await self._sock_sendv([data])
        finally:
            self._end_turn()

    def close(self) -> None:
        if not self.closed:
            try:
                self._ssl.unwrap()
                data = self._out.read()
                if data:
                    self.sock.send(data)
            except (ssl.SSLError, OSError):
                pass
        super().close()

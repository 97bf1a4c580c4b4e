"""One NBD connection: the asyncio adapter around the sans-I/O core.

ARCHITECTURE.md section 8.4; in the style of websockets' ``asyncio/``
adapter and aioquic's ``asyncio/protocol.py``: receive bytes, feed them to
:class:`nbdqcow.nbd.ServerConnection`, act on its events, send
``data_to_send()``.  No protocol decision is taken here.  The connection's
code is split by concern (issue 6):

* this module: the connection's life -- greeting, the reader loop,
  sending (:meth:`Session._flush_now`), back-pressure accounting, aborts,
  shutdown and the log lines about it;
* :mod:`nbdqcow.negotiation`: the handshake events (export lookup and
  policy, the export list, STARTTLS) and the set-up of transmission;
* :mod:`nbdqcow.pump`: the transmission phase on a plain socket, served
  from the event loop's readable callback, with small READs and WRITEs
  answered inline through the backend's
  :class:`~nbdqcow.backends.base.InlineIO` methods;
* :mod:`nbdqcow.dataplane`: a request on the async path (anything the
  inline path declines), sparse read replies, and sendfile replies for raw
  and read-only qcow2 images (the connection remembers a guest range known
  to be contiguous data in one host file, so a large sequential read costs
  no block status or mapping: ``DataPlane._try_sendfile``, also called from
  the pump).

Design (measurements in :mod:`nbdqcow.stream` and :mod:`nbdqcow.pump`):

* **Raw non-blocking sockets**, ``recv_into`` the core's
  :meth:`~nbdqcow.nbd.ServerConnection.get_buffer`: while a WRITE payload
  arrives, that is the payload buffer itself, so the kernel copies the data
  straight to where ``pwritev`` reads it.
* **Two readers.**  The handshake, and every phase of a TLS connection, run
  in :meth:`Session._read_loop`, a coroutine (TLS records are decrypted by
  the stream in a coroutine).  A plain connection entering transmission
  hands over to the pump (:meth:`~nbdqcow.pump.TransmissionPump._run_pump`):
  ``epoll_wait``, ``recv``, the data call and ``sendmsg`` per 4 KiB request
  at queue depth 1, 4 syscalls where the coroutine reader made 6-7.
* **Every buffered request is parsed and started before the reader yields.**
  A request that the backend cannot serve inline runs as a coroutine started
  inline (:func:`nbdqcow.eager.start`) until it would wait -- a page-cache
  miss handed to a thread, a FUA/FLUSH sync, a qcow2 allocation waiting on
  metadata -- and only then becomes a task.  At most ``max_in_flight``
  requests per connection are running or unsent, and their payloads hold at
  most ``max_in_flight_bytes`` (the reader stops reading at the bound:
  back-pressure, not a queue).
* **Replies**: each ``reply_*`` queues one complete reply in the core; the
  reader sends everything queued by its batch in one vectored ``sendmsg``;
  requests that finished in tasks share one send per loop iteration, so
  replies never interleave and go out in completion order
  (:meth:`nbdqcow.stream.Stream.send_start` is atomic).
* **Buffers**: read and write payloads come from a per-connection
  :class:`BufferPool`, allocated lazily (a handshake allocates nothing) and
  reused; a read buffer and its request slot are released only once its
  reply has left (:meth:`Session._release`).
* **Blocking file I/O**: reads use ``RWF_NOWAIT`` inline and a thread on a
  page-cache miss; flushes run in a thread.  Buffered writes stay inline:
  measured on the CI machine, a ``pwritev`` into the page cache costs 7 us
  (4 KiB), 14 us (64 KiB), 0.2 ms (1 MiB) and 8 ms for the largest request
  (32 MiB) -- a thread hop would cost more than it saves for all but the
  last.  Tried again (raw image, ``run_in_executor(HostFile.pwritev_sync)``,
  harness A/B on a loaded machine, inline / thread for >= 128 KiB / thread
  for all): seq-write 840-794 / 618-585 / 684-606 MiB/s, randwrite-prealloc
  QD32 35.4-33.1 k / 28.7-25.0 k / 10.2-10.0 k IOPS: the hand-off loses both
  ways, so it is not done.
* **Stalled payloads**: a client that starts a WRITE and never sends its
  payload would pin a buffer forever; once the payload buffer is handed out
  the rest must keep arriving within ``payload_timeout`` or the connection
  is cut.
* **Errors**: ``OSError`` -> its errno mapped by
  :func:`nbdqcow.nbd.to_nbd_errno`; :class:`~nbdqcow.errors.NbdqcowError` ->
  its ``errno``; anything else -> ``EIO`` and one log line.  A client that
  breaks the protocol is dropped with one log line; nothing a client sends
  produces a traceback.

History of the data path's speed (2-core shared CI machine, fio's libnbd
engine, 4 KiB random reads, Unix socket; qemu-nbd 7.2 beside it): 6.8k IOPS
at QD16 with a task per request; 8.5-14k after reply batching and the core's
fast paths; QD1 9.3k -> 12.9k with a persistent epoll registration; then
``python -m benchmarks.run --quick`` ratios vs qemu-nbd on qcow2 of 0.68x
(QD1) and 0.98x (QD32) with the inline data path, before the pump and
InlineIO (numbers after them: the issue 6 notes and the README).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING

from nbdqcow.buffers import BufferPool, Release
from nbdqcow.dataplane import SENDFILE_MIN, SPARSE_READ_MIN, DataPlane, Request, nbd_errno
from nbdqcow.eager import start
from nbdqcow.exports import Export
from nbdqcow.nbd import (
    BlockStatus,
    Cache,
    Event,
    Flush,
    Phase,
    ProtocolError,
    Read,
    RequestRejected,
    ServerConnection,
    TlsMode,
    Trim,
    Write,
    WriteZeroes,
)
from nbdqcow.negotiation import Negotiation
from nbdqcow.pump import _OUTPUT_HIGH, TransmissionPump
from nbdqcow.qcow2.image import Qcow2Image
from nbdqcow.sendfile import SendfileReplies
from nbdqcow.stream import PlainStream, Stream

if TYPE_CHECKING:
    from nbdqcow.server import NbdServer

__all__ = ["SENDFILE_MIN", "SPARSE_READ_MIN", "Session", "nbd_errno"]

log = logging.getLogger("nbdqcow.server")

class Session(TransmissionPump, DataPlane, Negotiation):
    """One client: the reader loop, its request tasks and their replies."""

    # The attributes the transmission pump touches per request or per batch
    # live in slots (issue 6).  A session has ~55 attributes across its
    # mixins, and CPython 3.11 keeps inline attribute values only for
    # classes with fewer than 30 names: beyond that every ``self.x`` is a
    # dict lookup.  Slots are the fastest loads and stores there are, and
    # leave the dict below the limit for the rest.  Every slot is set in
    # __init__ (a slot hides the mixins' class defaults).
    __slots__ = (
        "_aborted",
        "_flush_deferred",
        "_flush_handle",
        "_flush_waiters",
        "_held",
        "_inline",
        "_max_bytes",
        "_metrics",
        "_output_paused",
        "_paused",
        "_payload_timer",
        "_poll",
        "_poll_probe",
        "_pump_done",
        "_releases",
        "_resume_handle",
        "_send_error",
        "_send_tasks",
        "_sf_end",
        "_spans",
        "_try_read",
        "_try_write",
        "bytes_read",
        "bytes_written",
        "core",
        "errors",
        "loop",
        "payload_bytes",
        "pool",
        "requests",
        "server",
        "slots_free",
        "stream",
        "tasks",
    )

    def __init__(self, server: NbdServer, sock: socket.socket, peer: str, cid: int,
                 peer_address: object = None) -> None:
        self.server = server
        self.peer = peer
        self.peer_address = peer_address
        self.cid = cid
        self.stream: Stream = PlainStream(sock)
        self.pool = BufferPool()
        opts = server.options
        self.tls_ctx = server.tls_context
        tls_mode = opts.tls.mode if opts.tls is not None else TlsMode.OFF
        # WRITE payloads are received into pool buffers (no wrapper method:
        # one call fewer per 4 KiB WRITE).
        self.core = ServerConnection(limits=opts.limits, tls=tls_mode, allocate=self.pool.get)
        self._payload_timeout = opts.payload_timeout
        self._try_read = None
        self._try_write = None
        self.export: Export | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        #: request slots free (max_in_flight minus running or unsent ones);
        #: a plain counter: asyncio.Semaphore costs a coroutine per request
        self.slots_free = opts.max_in_flight
        self._slot_freed = asyncio.Event()
        self._metrics = opts.metrics
        #: payload bytes held by running requests (reads and writes)
        self.payload_bytes = 0
        self._max_bytes = opts.max_in_flight_bytes
        self._bytes_freed = asyncio.Event()
        self.requests = 0
        self.errors = 0
        self.loop = asyncio.get_running_loop()
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._flush_handle: asyncio.Handle | None = None
        #: a request is being started by the reader, which sends its reply
        #: with the rest of the batch (no flush to schedule for it)
        self._inline = False
        #: sendfile replies queued in the core: placeholder view id -> span
        self._spans = SendfileReplies()
        #: the raw image's fd when read replies may use sendfile
        self._sendfile_fd: int | None = None
        #: the read-only qcow2 image whose data clusters sendfile may serve
        self._sendfile_qcow2: Qcow2Image | None = None
        self._probe = bytearray(1)
        #: (payload buffers, budget bytes) of answered requests whose replies
        #: are queued or being sent: released once the send is done
        self._releases: list[Release] = []
        self._send_tasks: set[asyncio.Task[None]] = set()
        #: a flush skipped while a send waited for the socket (_flush_now)
        self._flush_deferred = False
        self._send_error: OSError | None = None
        self._aborted: str | None = None
        self._hard = True
        self._reader: asyncio.Task[None] | None = None
        self.in_transmission = False
        self.tls = False
        self.bytes_read = 0
        self.bytes_written = 0
        self.connected_since = time.time()
        # The pump's and the data plane's state, slotted (see __slots__);
        # the same values as their class defaults.
        self._pump_done = None
        self._held = None
        self._paused = False
        self._output_paused = False
        self._resume_handle = None
        self._payload_timer = None
        self._poll = None
        self._poll_probe = TransmissionPump._poll_probe
        self._sf_end = 0

    @property
    def payload_pending(self) -> bool:
        """A WRITE payload is half received: the rest is due within
        ``payload_timeout``.  The core's word, not a flag set when
        a payload buffer is allocated: the pump parses requests in batches, and a
        flag cleared as each complete WRITE started would forget a
        later one still arriving."""
        return self.core.payload_pending

    # -- output ------------------------------------------------------------
    async def flush(self) -> None:
        """Return once everything queued in the core so far has been sent.

        Replies are batched per event-loop iteration: the first caller
        schedules one send for the end of the iteration, and every request
        task that replies in the same iteration joins it.  With 16 requests
        in flight that is one ``sendmsg`` (and one wake-up of the client)
        instead of 16 (numbers in the module docstring).  Waiting until the
        batch is out is also what makes recycling payload buffers afterwards
        safe.

        Raises:
            OSError: the send failed (the stream is closed then).
        """
        fut: asyncio.Future[None] = self.loop.create_future()
        self._flush_waiters.append(fut)
        self._schedule_flush()
        await fut
        if self._send_error is not None:
            raise self._send_error

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        """Send everything queued in the core now, in one ``sendmsg``
        when the socket takes it; payload buffers and request slots of the
        replies in it are released once it is out."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._send_tasks and not self._flush_waiters and not self.stream.closed:
            # A send is waiting for the socket (the client reads slower than
            # we answer): what was queued since goes out in one send right
            # after it (_complete_send flushes again), not in a coroutine
            # and task per batch queued behind it (issue 6).
            self._flush_deferred = True
            return
        # (No new lists when nothing waits: the QD1 path runs this per
        # request.)
        waiters = self._flush_waiters
        if waiters:
            self._flush_waiters = []
        releases = self._releases
        if releases:
            self._releases = []
        bufs = self.core.data_to_send()
        stream = self.stream
        pending: Coroutine[None, None, None] | None
        try:
            if stream.closed:
                pending = None
                self._spans.clear()
            elif self._spans:
                assert isinstance(stream, PlainStream)
                pending = stream.send_start(self._spans.swap(bufs))
            elif bufs:
                pending = stream.send_start(bufs)
            else:
                pending = stream.drain() if stream.busy else None
        except OSError as e:  # the peer is gone (EPIPE, ECONNRESET)
            self._send_error = e
            self.abort(f"dropped: {e.strerror or e}")
            pending = None
        if pending is None:
            if releases:
                self._release(releases)
            if waiters:
                _wake(waiters)
            return
        task = self.loop.create_task(self._complete_send(pending, waiters, releases))
        self._send_tasks.add(task)
        task.add_done_callback(self._send_tasks.discard)

    async def _complete_send(self, pending: Coroutine[None, None, None],
                             waiters: list[asyncio.Future[None]],
                             releases: list[Release]) -> None:
        try:
            await pending
        except OSError as e:
            self._send_error = e
            self.abort(f"dropped: {e.strerror or e}")
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._send_tasks.discard(task)
            self._release(releases)
            _wake(waiters)
            if self._flush_deferred:
                self._flush_deferred = False
                self._flush_now()
            if self._output_paused:
                # The queued replies are on their way (or sent): read again.
                self._output_paused = False
                self._wake_pump()

    def _release(self, releases: list[Release]) -> None:
        # Only now that the replies have left may their buffers be reused
        # (the kernel has copied them) and their slots go to new requests.
        if not releases:
            return
        freed = self.pool.release(releases)
        self.payload_bytes -= freed
        self.slots_free += len(releases)
        if self._pump_done is not None:
            # Transmission pump: nothing waits on the events below.
            if self._paused:
                self._wake_pump()
            return
        self._slot_freed.set()  # only the reader ever waits for these
        if freed:
            self._bytes_freed.set()

    # -- the connection's life ---------------------------------------------
    def abort(self, reason: str, *, hard: bool = True) -> None:
        """End the connection from a request or send task.

        The socket is not closed here: the reader may be waiting on it in
        the event loop, and closing under it would leave the loop watching a
        file descriptor number the next accepted client may get.  The reader
        is cancelled instead and :meth:`_finish` closes the socket: at once
        when ``hard`` (the peer is gone: replies cannot be delivered), else
        after the in-flight requests are answered.
        """
        if self._aborted is None:
            self._aborted = reason
            self._hard = hard
            if self._reader is not None and self._reader is not asyncio.current_task():
                self._reader.cancel()

    async def run(self) -> None:
        reason = "closed"
        # why a connection ended before transmission, for the metrics
        kind = "eof"
        self._reader = asyncio.current_task()
        try:
            self._flush_now()  # the greeting: no need to wait a loop iteration
            if self._send_error is not None:
                raise self._send_error
            # No timer per connection for the handshake timeout: the server
            # sweeps its handshaking clients and abort()s the late ones
            # (NbdServer._sweep); an asyncio.timeout here cost ~40 k
            # instructions per handshake (issue 6).
            reason = await self._read_loop()
            kind = "abort" if reason.startswith("client aborted") else \
                "refused" if reason.startswith("refused") else "eof"
        except ProtocolError as e:
            reason, kind = f"dropped: {e}", "protocol"
        except OSError as e:
            reason = f"dropped: {e.strerror or type(e).__name__}"
            kind = "tls" if "TLS" in reason else "eof"
        except asyncio.CancelledError:
            if self._aborted is None or self.server.stopping:
                reason, kind = "closed by server shutdown", "shutdown"
                raise
            # our own abort(): not a cancellation of the connection task
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            reason = self._aborted
            if reason == _TIMED_OUT:
                kind = "timeout"
        finally:
            metrics = self.server.options.metrics
            if metrics is not None and not self.in_transmission:
                metrics.handshake_failed(kind)
            await self._finish(reason)

    async def _finish(self, reason: str) -> None:
        try:
            if self._aborted is not None and self._hard:
                # replies cannot be delivered: unblock tasks stuck sending them
                self.stream.close()
            if self.tasks:
                # Let in-flight requests complete; a client that stopped
                # reading could keep them waiting to send forever, hence the
                # bound.
                _, late = await asyncio.wait(set(self.tasks),
                                             timeout=self.server.options.shutdown_timeout)
                if late:
                    self.stream.close()
                    await asyncio.wait(late)
            if not self.stream.closed and (self._flush_handle is not None
                                           or self.stream.busy):
                # Requests finishing in tasks schedule their send for the end
                # of the loop iteration: get those replies out before closing
                # (bounded: the client may have stopped reading).
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(self.server.options.shutdown_timeout):
                        await self.flush()
        finally:
            self.stream.close()
            if self.export is not None:
                self.server.catalog.leave(self.export)
            verb, _, why = reason.partition(": ") if reason.startswith("dropped: ") \
                else ("closed", "", reason)
            # The one INFO line of a connection (its "opened" line is DEBUG:
            # issue 6 handshakes), so it says how long the client stayed.
            stats = (f"export {self.export.name!r}, {self.requests} requests, "
                     f"{self.errors} errors, {time.time() - self.connected_since:.1f} s"
                     f"{', TLS' if self.tls else ''}"
                     if self.export is not None else "no export")
            log.info("connection %d %s %s: %s (%s)", self.cid, self.peer, verb, why, stats)

    async def _read_loop(self) -> str:
        core = self.core
        while True:
            buf = core.get_buffer()
            # Bytes already there need neither a wait nor a timer (a timeout
            # context per receive of a big WRITE payload cost more than the
            # receive itself).
            got = self.stream.try_recv_into(buf)
            if got is not None:
                n = got
            elif self.payload_pending:
                try:
                    async with asyncio.timeout(self.server.options.payload_timeout):
                        n = await self.stream.recv_into(buf)
                except TimeoutError:
                    return "dropped: WRITE payload did not arrive in time"
            else:
                n = await self.stream.recv_into(buf)
            # EOF: close the get_buffer() bracket first, then signal it
            core.buffer_updated(n)
            if not n:
                core.receive_data(b"")
            # Every request already received is parsed and, when it does
            # not have to wait, answered before the replies go out together.
            # (In batches once in transmission: ServerConnection.next_events.)
            while events := core.next_events(self.slots_free or 1):
                for event in events:
                    if (type(event) in _REQUESTS and self.slots_free
                            and not self._over_budget(event)):  # type: ignore[arg-type]
                        # the common case, without a coroutine for _handle
                        self._begin(event)  # type: ignore[arg-type]
                        continue
                    end = await self._handle(event)
                    if end is not None:
                        # Usually the last replies leave at once: no loop
                        # iterations for an empty flush (issue 6).
                        self._flush_now()
                        if self._send_error is not None:
                            raise self._send_error
                        if self.stream.busy:
                            await self.flush()
                        return end
            self._flush_now()
            if self._send_error is not None:
                raise self._send_error
            if self._send_tasks and core.queued_output > _OUTPUT_HIGH:
                # A client that does not read its replies is not read either
                # (as in the pump): wait until what is queued has left.
                await self.flush()
            if n == 0:
                return "client closed the connection" if core.phase is Phase.CLOSED \
                    else "client went away mid-message"
            if self.in_transmission and isinstance(self.stream, PlainStream):
                # From here on the readable callback serves (nbdqcow.pump).
                return await self._run_pump()

    async def _handle(self, ev: Event) -> str | None:
        """Act on one event; return a reason when the connection must end."""
        if isinstance(ev, (Read, Write, Flush, Trim, WriteZeroes, Cache, BlockStatus)):
            # back-pressure: stop reading while max_in_flight requests run,
            # or while their payloads already hold max_in_flight_bytes.
            # Answered requests hold their slot until their reply is sent:
            # send what is queued before waiting for one.
            if not self.slots_free:
                self._flush_now()
                while not self.slots_free:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
            while self._over_budget(ev):
                self._bytes_freed.clear()
                self._flush_now()
                if self._over_budget(ev):
                    await self._bytes_freed.wait()
            self._begin(ev)
            return None
        if isinstance(ev, RequestRejected):
            self.requests += 1
            self._rejected(ev)
            return None
        return await self._negotiate(ev)

    def _rejected(self, ev: RequestRejected) -> None:
        """The core refused a request (and queued its error reply)."""
        self.errors += 1
        metrics = self.server.options.metrics
        if metrics is not None and self.export is not None:
            metrics.observe_request(self.export.name, ev.command_name, 0, 0.0, ev.errno.name)
        log.debug("connection %d: %s rejected: %s", self.cid, ev.command_name, ev.message)

    def _over_budget(self, ev: Request
                     ) -> bool:
        cost = ev.length if type(ev) is Read or type(ev) is Write else 0
        held = self.payload_bytes
        return bool(cost and held and held + cost > self._max_bytes)

    def _start_request(self, ev: Request
                       ) -> None:
        """Take a slot and run ``ev`` inline until it would wait (module
        docstring of :mod:`nbdqcow.eager`): a page-cache read or write needs
        no task."""
        cost = ev.length if type(ev) is Write or type(ev) is Read else 0
        self.slots_free -= 1
        self.payload_bytes += cost
        self._inline = True
        try:
            task = start(self._serve(ev, cost))
        finally:
            self._inline = False
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    # -- shutdown ------------------------------------------------------------
    def begin_shutdown(self) -> None:
        with contextlib.suppress(ProtocolError):
            self.core.shutdown()


#: nbdqcow.server.HANDSHAKE_TIMED_OUT (not imported: the server imports us)
_TIMED_OUT = "dropped: handshake timed out"

_REQUESTS = frozenset({Read, Write, Flush, Trim, WriteZeroes, Cache, BlockStatus})

def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for f in waiters:
        if not f.done():
            f.set_result(None)


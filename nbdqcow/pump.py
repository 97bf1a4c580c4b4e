"""The transmission phase driven from the event loop's readable callback.

Issue 6, QD1 latency.  Until this module the reader was a coroutine: a
readable socket completed a future, the future scheduled the reader task, the
next loop iteration (a second ``epoll_wait``, with timeout 0) stepped the
task, and after the batch the reader tried ``recv`` twice before creating the
next future.  Per 4 KiB request at queue depth 1 that was 7 syscalls and two
trips through the loop.  Here :meth:`TransmissionPump._pump` *is* the
readable callback (:meth:`nbdqcow.stream.Stream.set_read_callback`): it
receives, parses, runs every request it can inline and sends the replies in
one ``sendmsg``, then returns to the loop -- ``epoll_wait``, ``recv``,
``pread``, ``sendmsg``: 4 syscalls.  It does not ``recv`` until ``EAGAIN``:
a receive that did not fill the buffer found the socket drained, and epoll
is level-triggered, so bytes that arrive later wake it again.

Requests come in batches (:meth:`~nbdqcow.nbd.ServerConnection.next_events`:
every buffered request that takes the core's hot path is parsed in one loop,
no generator resume or call per request) and :meth:`_dispatch` answers a
cached small READ or an in-place WRITE itself -- the backend's synchronous
:class:`~nbdqcow.backends.base.InlineIO` method, the reply queued in the
core, the buffer and slot kept until the send (:data:`~nbdqcow.buffers.Release`
entries, taken back by one :meth:`~nbdqcow.buffers.BufferPool.release` call
per send).  Everything else goes through :meth:`_begin`: a large read
inside the known file extent is queued as a sendfile span, anything the
backend declines -- a page-cache miss, an allocating qcow2 write, FUA,
FLUSH, TRIM, large reads (sendfile, sparse replies) -- takes the async path
of :mod:`nbdqcow.dataplane`.  A request that does not fit under
back-pressure is held with the rest of its batch.  A batch shorter than
asked for means the core needs more input, so at queue depth 1 the core is
asked once per request, not a second time to learn that nothing follows.

Measurements (issue 6; 2-core shared VM, fio's nbd engine, 4 KiB random
I/O, Unix socket; server CPU from ``/proc``, utime + stime per I/O; "before"
is commit c68ebc3, "after" this design, both on the same tree otherwise and
alternated in the same runs):

* ``python3 -m benchmarks.run --quick --seconds 2 --workloads
  randread-qd1,randread-qd32`` (cached image on ext4): raw QD32 10.2 ->
  7.6 us/IO (nbdkit 9.7), qcow2 QD32 10.3 -> 8.4 (qemu-nbd 25-27), QD1
  unchanged within noise (raw 39, qcow2 43; nbdkit 25, qemu-nbd 35).  A
  second A/B (an ad-hoc script: ``nbdqcow serve`` from each tree in turn,
  fio for 3 s, 4 alternated runs, medians): raw QD32 9.7 -> 7.7 us/IO,
  user time 6.8 -> 4.9.
* The same with ``--workloads randwrite-prealloc --workdir /dev/shm``
  (tmpfs: the kernel's part of a 4 KiB write is ~2 us there, see the
  issue): raw 15.0 -> 11.3 us/IO (nbdkit 7-9), qcow2 18.3 -> 14.6
  (qemu-nbd 32-33); 4 alternated runs: raw 14.7 -> 11.8, qcow2 18.5 -> 14.2.
  Part of it is the reader's ``direct_min``: a 64 KiB receive nearly
  always ends inside a 4 KiB payload, and receiving that tail into the
  payload buffer itself cost one more ``recv`` per staging fill (4.6 ->
  2.6 receives per pump call under cProfile).
* The core alone (``python -m tests.nbd.bench_core``, structured replies):
  READ 2.6 us per request through ``next_event``, 1.8 through
  ``next_events``; WRITE 4.7 -> 3.0 (4.2 fed through ``get_buffer`` in
  64 KiB receives, the pump's way: a WRITE straddling two receives is
  finished by the generator).  Tried and not kept: finishing such a WRITE
  outside the generator too (bench 4.2 -> 3.6 us, but end to end no
  better: raw tmpfs writes 12.3 vs 11.9 us/IO over 12 alternated runs).
* cProfile of raw randread-qd32: 37 -> 24 Python calls per request.  What
  is left per request: the inline ``preadv`` (about 1.5 us with the
  backend's Python), batch parsing (0.8), the reply and bookkeeping
  (~1.4).  py-spy puts most of the rest in two syscalls: ``sendmsg``
  (40 % of samples for writes and QD1 reads: it wakes the client) and
  ``epoll_wait``.

Busy polling (:mod:`nbdqcow.poll`, qemu's ``poll-max-ns`` policy): after
sending its replies, a pump alone on the loop (one client connected, no
reply waiting for the socket, nothing held) spins on a ``MSG_PEEK``
receive for up to 32 us, adaptively, and serves what arrives without
going back to the loop.  A/B on the same tree (4 alternated 3 s fio runs,
medians, raw, loaded machine): QD1 17.5k -> 23.4k IOPS and 41.5 -> 33.6
us of server CPU per read (the spin costs less than the sleep and wake-up
it replaces); QD32 reads 70.5k -> 75.7k IOPS at the same 7.6 us/IO;
tmpfs QD32 writes unchanged (11.6 / 11.5 us/IO).  One readable callback
polls for at most ``_POLL_BUDGET_NS`` (1 ms) and not while a request of
the connection runs in a task: a client fast enough to be caught every
time (fio with a 1 ms window) otherwise held the loop -- accepts, timers,
signals, the admin endpoint -- for 347 ms at a stretch (review).

Without polling, QD1 is where this design stops helping.  Timed inside one QD1 pump call
(``perf_counter_ns`` around each step, on the loaded machine): ``recv``
2.8 us, ``_dispatch`` 13 (``next_events`` 4.3, the inline ``preadv`` 3.5,
~5 of reply and bookkeeping), the send 12-30 (``sendmsg`` waking the
client), plus the event loop's own round trip.  The Python steps cost 3-5x
their warm per-request cost because caches are cold after each idle wait;
the ~70-line callback server without validation measured on the CI machine
(22.5 us per QD1 read against 45.5 for the pump then, 5.6 at QD32) bounds
what trimming this path can still give.

Only the handshake and TLS connections keep the coroutine reader
(:meth:`nbdqcow.session.Session._read_loop`): a TLS record must be decrypted
before it is parsed, which the stream does in a coroutine.  It takes events
in batches too and starts requests with :meth:`_begin`, so inline I/O
serves TLS clients as well.

Back-pressure: when ``max_in_flight`` requests are unanswered or unsent, or
their payloads hold ``max_in_flight_bytes``, the request that does not fit is
*held*, the socket is no longer watched, and :meth:`_wake_pump` (called as
replies leave) resumes with it.  The WRITE payload timeout is a timer armed
only while a payload is half received, and paused with the reader (and
armed by :meth:`_resume` too, which may start a payload from buffered
bytes).  Refused and empty requests take no slot, so a client that floods
them without reading its replies is held by its output instead: once
``_OUTPUT_HIGH`` reply buffers wait behind a send the socket does not take,
the pump stops reading until that send completes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from time import perf_counter, perf_counter_ns
from typing import TYPE_CHECKING

from nbdqcow.backends.base import Buffer
from nbdqcow.buffers import BufferPool, Release
from nbdqcow.dataplane import Request
from nbdqcow.metrics import Metrics
from nbdqcow.nbd import (
    CommandFlag,
    Disconnect,
    EndOfStream,
    Errno,
    Event,
    Phase,
    Read,
    RequestRejected,
    ServerConnection,
    Write,
)
from nbdqcow.poll import AdaptivePoll
from nbdqcow.stream import Stream

if TYPE_CHECKING:
    from nbdqcow.server import NbdServer

__all__ = ["INLINE_READ_MAX", "TransmissionPump"]

#: READs shorter than this are offered to the backend's ``try_preadv``;
#: longer ones go to the async path, which may send them with sendfile or as
#: sparse replies.
INLINE_READ_MAX = 64 * 1024

#: The flags of a plain request (the core hands out one object per value):
#: no FUA to test for.
_NO_FLAGS = CommandFlag(0)

#: Reply buffers queued in the core beyond which the pump stops reading while
#: a send waits for the socket: a client that never reads its replies (a
#: flood of refused or zero-length requests, which take no request slot)
#: must not grow the server's memory (review: 32 -> 592 MiB RSS).  Normal
#: traffic stays far below it: 64 requests in flight queue ~128 buffers.
_OUTPUT_HIGH = 4096

#: Longest a pump call serves polled requests before returning to the loop
#: (nbdqcow.poll): accepts, timers and signals wait no longer than this.
_POLL_BUDGET_NS = 1_000_000


class TransmissionPump:
    """Callback-driven transmission for :class:`~nbdqcow.session.Session`."""

    # Provided by Session (see its __init__).
    core: ServerConnection
    server: NbdServer
    stream: Stream
    loop: asyncio.AbstractEventLoop
    pool: BufferPool
    slots_free: int
    payload_bytes: int
    requests: int
    bytes_read: int
    bytes_written: int
    _metrics: Metrics | None
    _releases: list[Release]
    _send_tasks: set[asyncio.Task[None]]
    tasks: set[asyncio.Task[None]]
    _send_error: OSError | None
    _aborted: str | None
    _payload_timeout: float
    _try_read: Callable[[int, Sequence[memoryview]], bool] | None
    _try_write: Callable[[int, Sequence[Buffer], bool], bool] | None
    _sf_end: int
    _max_bytes: int

    #: set while the pump runs: the reader coroutine waits on it
    _pump_done: asyncio.Future[str] | None = None
    #: parsed events not started yet: the first is a request that did not
    #: fit under back-pressure; started on resume
    _held: list[Event] | None = None
    _paused = False
    #: paused by _OUTPUT_HIGH until the waiting send completes
    _output_paused = False
    _resume_handle: asyncio.Handle | None = None
    _payload_timer: asyncio.TimerHandle | None = None
    _payload_seen = 0.0
    #: busy polling for the next requests (set when the pump starts)
    _poll: AdaptivePoll | None = None
    _poll_probe = bytearray(1)

    if TYPE_CHECKING:  # implemented by Session and DataPlane
        @property
        def payload_pending(self) -> bool: ...
        def _start_request(self, ev: Request) -> None: ...
        def _over_budget(self, ev: Request) -> bool: ...
        def _flush_now(self) -> None: ...
        def _rejected(self, ev: RequestRejected) -> None: ...
        def _account(self, ev: Request, error: Errno | None, seconds: float) -> None: ...
        def _try_sendfile(self, ev: Read) -> bool: ...

    # -- one request ---------------------------------------------------------
    def _begin(self, ev: Request) -> None:
        """Start a request that has its slot: inline when the backend can,
        else on the async path (which takes the slot itself)."""
        self.requests += 1
        t = type(ev)
        if t is Read:
            try_read = self._try_read
            rd: Read = ev  # type: ignore[assignment]  # narrowed by the exact type test
            n = rd.length
            if try_read is not None and 0 < n < INLINE_READ_MAX:
                buf = self.pool.get(n)
                started = perf_counter() if self._metrics is not None else 0.0
                try:
                    done = try_read(rd.offset, (buf,))
                except Exception:  # reported by the async path's retry
                    done = False
                if done:
                    self.core.reply_read(rd.cookie, (buf,))
                    # The buffer and the slot are held until the reply is sent.
                    self.slots_free -= 1
                    self.payload_bytes += n
                    self._releases.append(buf)
                    if self._metrics is None:
                        self.bytes_read += n
                    else:
                        self._account(rd, None, perf_counter() - started)
                    return
                self.pool.put(buf)
            elif n >= INLINE_READ_MAX and self._sf_end and self._try_sendfile(rd):
                # A large read inside the connection's known file extent:
                # its reply is queued as a sendfile span (nbdqcow.dataplane),
                # no coroutine, no buffer.
                self.slots_free -= 1
                self.payload_bytes += n
                self._releases.append(n)
                if self._metrics is None:
                    self.bytes_read += n
                else:
                    self._account(rd, None, 0.0)
                return
        elif t is Write:
            try_write = self._try_write
            wr: Write = ev  # type: ignore[assignment]  # narrowed by the exact type test
            if try_write is not None:
                data = wr.data
                started = perf_counter() if self._metrics is not None else 0.0
                try:
                    done = try_write(wr.offset, (data,), wr.fua)
                except Exception:  # reported by the async path's retry
                    done = False
                if done:
                    self.core.reply_ok(wr.cookie)
                    if self._metrics is None:
                        self.bytes_written += len(data)
                    else:
                        self._account(wr, None, perf_counter() - started)
                    # The data is in the page cache: the buffer is free now
                    # (and ``wr`` unusable: its length is the buffer's); the
                    # slot is held until the reply is sent.
                    self.pool.put(data)
                    self.slots_free -= 1
                    self._releases.append(0)
                    return
        self._start_request(ev)

    # -- the pump ------------------------------------------------------------
    async def _run_pump(self) -> str:
        """Serve transmission from the readable callback until the
        connection ends; return why (as ``_read_loop`` does)."""
        fut: asyncio.Future[str] = self.loop.create_future()
        self._pump_done = fut
        us = self.server.options.poll_max_us
        self._poll = AdaptivePoll(us * 1000) if us > 0 else None
        self._poll_probe = bytearray(1)
        try:
            self.stream.set_read_callback(self._pump)
            return await fut
        finally:
            self._pump_done = None
            self._paused = True  # nothing may resume the pump any more
            if self._resume_handle is not None:
                self._resume_handle.cancel()
                self._resume_handle = None
            if self._payload_timer is not None:
                self._payload_timer.cancel()
                self._payload_timer = None
            if not self.stream.closed:
                self.stream.set_read_callback(None)

    def _pump(self) -> None:
        """The socket is readable: receive, serve, reply (module docstring);
        then, alone on the loop, poll briefly for the next requests
        (:mod:`nbdqcow.poll`) and serve them without a trip through it."""
        if self._pump_done is None or self._paused or self._aborted is not None:
            return
        core = self.core
        sock = self.stream.sock
        poll = self._poll
        if poll is not None:
            poll.woke()
        budget_end = 0
        try:
            while True:
                while True:
                    buf = core.get_buffer()
                    try:
                        n = sock.recv_into(buf)
                    except (BlockingIOError, InterruptedError):
                        core.buffer_updated(0)  # closes the get_buffer() bracket
                        break
                    core.buffer_updated(n)
                    if not n:
                        core.receive_data(b"")
                    end = self._dispatch()
                    if end is None and not n:
                        end = "client closed the connection" if core.phase is Phase.CLOSED \
                            else "client went away mid-message"
                    if end is not None:
                        self._end(end)
                        return
                    if self._paused or n < len(buf) or core.queued_output > _OUTPUT_HIGH:
                        break
                self._flush_now()
                if self._send_error is not None:
                    self._end_with(self._send_error)
                    return
                if self._send_tasks and core.queued_output > _OUTPUT_HIGH:
                    # The client does not read its replies: stop reading its
                    # requests until the waiting send completes
                    # (Session._complete_send wakes us).
                    self._output_paused = True
                    self._pause()
                    break
                # Poll only when nothing else needs the loop: no other
                # client, no reply waiting for the socket, no held request,
                # no request of ours running in a task -- and for a bounded
                # time per callback, so accepts, timers and signals get
                # their turn however fast the client is.
                if (poll is None or self._paused or self._send_tasks or self.stream.busy
                        or self.tasks or self.server.connection_count != 1):
                    break
                now = perf_counter_ns()
                if not budget_end:
                    budget_end = now + _POLL_BUDGET_NS
                elif now >= budget_end:
                    break
                if not poll.wait(sock, self._poll_probe):
                    break
            if core.payload_pending or self._payload_timer is not None:
                self._watch_payload()
        except Exception as e:  # ProtocolError, OSError (ECONNRESET): run() reports them
            self._end_with(e)

    def _dispatch(self) -> str | None:
        """Start every parsed request that fits; a reason when the
        connection ends.

        The events come in batches (:meth:`ServerConnection.next_events`),
        and a cached small READ -- the bulk of a random-read load -- is
        answered right here, the steps of :meth:`_begin` inlined.  A
        request that does not fit (no slot, or its payload would pass
        ``max_in_flight_bytes``) is held with the rest of its batch."""
        core = self.core
        evs = self._held
        if evs is not None:
            self._held = None
            limit = 0  # what follows the held events is still to be parsed
        else:
            limit = self.slots_free or 1
            evs = core.next_events(limit)
        try_read = self._try_read
        try_write = self._try_write
        metrics = self._metrics
        pool_get = self.pool.get
        pool_put = self.pool.put
        reply_read = core.reply_read
        reply_ok = core.reply_ok
        releases = self._releases
        max_bytes = self._max_bytes
        while evs:
            for i, ev in enumerate(evs):
                t = type(ev)
                if t is Read:
                    rd: Read = ev  # type: ignore[assignment]  # narrowed by the exact type test
                    n = rd.length
                    held = self.payload_bytes
                    if not self.slots_free or (held and held + n > max_bytes):
                        self._held = evs[i:]
                        self._pause()
                        return None
                    if try_read is not None and metrics is None and n < INLINE_READ_MAX:
                        # _begin's inline read (n > 0: the core never emits
                        # an empty READ).
                        buf = pool_get(n)
                        bufs = (buf,)
                        try:
                            done = try_read(rd.offset, bufs)
                        except Exception:  # reported by the async path's retry
                            done = False
                        if done:
                            self.requests += 1
                            reply_read(rd.cookie, bufs)
                            # Buffer and slot are held until the reply is sent.
                            self.slots_free -= 1
                            self.payload_bytes = held + n
                            self.bytes_read += n
                            releases.append(buf)
                            continue
                        self.pool.put(buf)
                        self.requests += 1
                        self._start_request(rd)  # declined: not offered twice
                        continue
                    self._begin(rd)
                elif t is Write:
                    wr: Write = ev  # type: ignore[assignment]  # narrowed by the exact type test
                    data = wr.data
                    n = data.nbytes
                    held = self.payload_bytes
                    if not self.slots_free or (held and held + n > max_bytes):
                        self._held = evs[i:]
                        self._pause()
                        return None
                    if try_write is not None and metrics is None:
                        # _begin's inline write
                        try:
                            done = try_write(wr.offset, (data,),
                                             wr.flags is not _NO_FLAGS and wr.fua)
                        except Exception:  # reported by the async path's retry
                            done = False
                        if done:
                            self.requests += 1
                            reply_ok(wr.cookie)
                            self.bytes_written += n
                            # In the page cache: the buffer is free now (and
                            # ``wr`` unusable); the slot is held until the
                            # reply is sent.
                            pool_put(data)
                            self.slots_free -= 1
                            releases.append(0)
                            continue
                        self.requests += 1
                        self._start_request(wr)  # declined: not offered twice
                        continue
                    self._begin(wr)
                elif t is RequestRejected:
                    self.requests += 1
                    self._rejected(ev)  # type: ignore[arg-type]
                elif t is Disconnect:
                    return "client disconnected"
                elif t is EndOfStream:
                    return "client closed the connection"
                elif not self.slots_free:  # other requests: no payload to count
                    self._held = evs[i:]
                    self._pause()
                    return None
                else:
                    self._begin(ev)  # type: ignore[arg-type]
            if len(evs) < limit:
                # A short batch: the core needs more input (next_events'
                # contract), so no call to learn that nothing follows
                # (QD1: one call per request instead of two).
                break
            limit = self.slots_free or 1
            evs = core.next_events(limit)
        return None

    def _end(self, reason: str) -> None:
        self._flush_now()
        fut = self._pump_done
        self._pump_done = None
        if fut is not None and not fut.done():
            fut.set_result(reason)

    def _end_with(self, exc: BaseException) -> None:
        fut = self._pump_done
        self._pump_done = None
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    # -- back-pressure -------------------------------------------------------
    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.stream.set_read_callback(None)

    def _wake_pump(self) -> None:
        """Replies left (slots or payload bytes freed): resume a paused
        pump once its held request fits, in the next loop iteration (this
        runs inside a send)."""
        held = self._held
        if (self._paused and self._pump_done is not None and self._resume_handle is None
                and (held is None
                     or (self.slots_free and not self._over_budget(held[0])))):  # type: ignore[arg-type]
            self._resume_handle = self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self._resume_handle = None
        if self._pump_done is None or not self._paused:
            return
        self._paused = False
        try:
            end = self._dispatch()
            if end is not None:
                self._end(end)
                return
            if not self._paused:
                self._payload_seen = self.loop.time()  # paused time is not the client's
                self.stream.set_read_callback(self._pump)
                if self.core.payload_pending or self._payload_timer is not None:
                    self._watch_payload()
            self._flush_now()
            if self._send_error is not None:
                self._end_with(self._send_error)
        except Exception as e:
            self._end_with(e)

    # -- stalled WRITE payloads ----------------------------------------------
    def _watch_payload(self) -> None:
        """A WRITE payload half received must make progress within the
        payload timeout (a client could otherwise pin its buffer forever)."""
        if self.payload_pending:
            self._payload_seen = self.loop.time()
            if self._payload_timer is None:
                self._payload_timer = self.loop.call_later(self._payload_timeout,
                                                           self._payload_check)
        elif self._payload_timer is not None:
            self._payload_timer.cancel()
            self._payload_timer = None

    def _payload_check(self) -> None:
        self._payload_timer = None
        if not self.payload_pending or self._pump_done is None:
            return
        now = self.loop.time()
        if self._paused:
            self._payload_seen = now
        left = self._payload_seen + self._payload_timeout - now
        if left > 0:
            self._payload_timer = self.loop.call_later(left, self._payload_check)
            return
        self._end("dropped: WRITE payload did not arrive in time")

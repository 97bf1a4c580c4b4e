"""How one NBD request is executed and answered (issue 6 split it out of
:mod:`nbdqcow.session`, which keeps the connection's life: reading, the
handshake, sending and shutdown).

:class:`DataPlane` is a mixin of :class:`~nbdqcow.session.Session`: it runs
one transmission request against the export's backend and queues its reply
in the protocol core.  Two paths:

* the **async path** (:meth:`DataPlane._serve`): a coroutine per request,
  started inline by :func:`nbdqcow.eager.start` and turned into a task only
  if it really waits.  Every request can take it; errors become NBD error
  replies here;
* the **inline path** (:meth:`DataPlane._try_inline`): small READs and
  WRITEs offered to the backend's synchronous
  :class:`~nbdqcow.backends.base.InlineIO` methods, with no coroutine at
  all.  When the backend declines (cache miss, allocation, FUA) the request
  takes the async path as if nothing had happened.

Read replies of at least ``SENDFILE_MIN`` bytes that lie contiguous and
cached in a host file are sent with ``sendfile`` (:mod:`nbdqcow.sendfile`).

**Sequential reads** (issue 6).  Each connection remembers one *file
extent* (:meth:`DataPlane._learn_extent`): a stretch of guest bytes that is
data, contiguous in one host file -- the data region around the offset of
a raw file, or the run of a read-only qcow2 image mapped 16 MiB ahead.  A
large READ inside it (:meth:`DataPlane._try_sendfile`, called from
:meth:`nbdqcow.pump.TransmissionPump._begin`, before any coroutine) costs
two comparisons, one or two page-cache probes and a placeholder: no
block-status call, no mapping, no ``lseek``, no coroutine step that can
suspend.  Before, every 256 KiB read of
``nbdcopy`` asked ``block_status`` (for qcow2: the cluster map plus
``SEEK_DATA``/``SEEK_HOLE`` on the data file) for its sparse-read check,
mapped the range a second time for sendfile and probed the page cache
with two ``preadv2``; the sends took two coroutines per reply.  Measured on
the shared 2-core CI machine, 1 GiB images, ``nbdcopy -C1 --no-extents
URI null:``, servers side by side (``/tmp`` A/B script, medians of 7,
load average about 2; CPU is the server's utime+stime):

    =========================  ===============  ===============
    tree                       qcow2            raw
    =========================  ===============  ===============
    before (233d9e9)           2.03 GiB/s,      2.35 GiB/s,
                               0.33 s/GiB       0.22-0.24 s/GiB
    extent + synchronous send  3.07-3.38 GiB/s, 0.17-0.18 s/GiB
                               0.18 s/GiB
    a 250-line prototype       3.5 GiB/s, 0.07-0.08 s/GiB (raw,
    (sendfile, simple replies) simple replies, no validation)
    =========================  ===============  ===============

``nbdcopy`` itself spends about 0.2 CPU-s per GiB here (libnbd receiving
into its buffers), so on two shared cores it, not the server, now sets the
pace: the prototype's 9.9 GiB/s was not reproducible with ``nbdcopy`` on
this machine (3.4-3.75 GiB/s).  With four connections: qcow2 2.26 ->
3.57 GiB/s, raw 2.52 -> 3.54 GiB/s.  What is left of the server's CPU is
about half kernel (``sendfile``'s splice into the socket) and half Python
spread over the protocol core's parser, the pump and the reply
bookkeeping, none above 10 % of samples (py-spy ``--gil``).

The harness (``python -m benchmarks.run --quick --reps 3 --workloads
seq-read,seq-read-4c``, 1 GiB copies, load average 1-2), before (233d9e9's
server) and after (9da9382), ratio nbdqcow/qcow2 to qemu-nbd and server
CPU: seq-read 2.14x at 0.40 s/GiB -> 3.58-3.62x at 0.22 s/GiB, seq-read-4c
3.24x (qemu-nbd's own figure swings by +-20 % between runs) -> 3.42-3.89x
at 0.17-0.21 s/GiB; raw vs nbdkit file 1.62x -> 2.35-2.72x.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from nbdqcow.backends.base import BlockBackend, Buffer, ExtentFlag
from nbdqcow.buffers import BufferPool, Release
from nbdqcow.errors import NbdqcowError
from nbdqcow.exports import Export
from nbdqcow.nbd import (
    BlockStatus,
    Cache,
    Errno,
    Flush,
    Hole,
    ProtocolError,
    Read,
    ReadRun,
    ServerConnection,
    Trim,
    Write,
    WriteZeroes,
    to_nbd_errno,
)
from nbdqcow.qcow2.entries import SubclusterType
from nbdqcow.qcow2.image import Qcow2Image
from nbdqcow.sendfile import MAX as SENDFILE_MAX
from nbdqcow.sendfile import MIN as SENDFILE_MIN
from nbdqcow.sendfile import SendfileReplies, page_cached, resident
from nbdqcow.stream import Stream

if TYPE_CHECKING:
    from nbdqcow.metrics import Metrics
    from nbdqcow.server import NbdServer

__all__ = ["SENDFILE_MIN", "SPARSE_READ_MIN", "DataPlane", "Request", "nbd_errno"]

log = logging.getLogger("nbdqcow.server")

#: Reads at least this long ask the backend for block status first, to send
#: holes as OFFSET_HOLE chunks; below it the extra call costs more than it saves.
SPARSE_READ_MIN = 64 * 1024

#: How far ahead a read-only qcow2 image is mapped to learn a sendfile
#: extent (:meth:`DataPlane._learn_extent`): 256 L2 entries with 64 KiB
#: clusters, one mapping per 64 sequential 256 KiB reads.
_MAP_AHEAD = 16 << 20


Request = Read | Write | Flush | Trim | WriteZeroes | Cache | BlockStatus


def nbd_errno(exc: BaseException) -> Errno:
    """The NBD error a failed backend call is reported as."""
    if isinstance(exc, NbdqcowError):
        return to_nbd_errno(exc.errno)
    if isinstance(exc, OSError):
        return to_nbd_errno(exc.errno)
    return Errno.EIO


class DataPlane:
    """Request execution for :class:`~nbdqcow.session.Session`."""

    # Provided by Session.
    server: NbdServer
    core: ServerConnection
    stream: Stream
    pool: BufferPool
    export: Export | None
    loop: asyncio.AbstractEventLoop
    cid: int
    errors: int
    bytes_read: int
    bytes_written: int
    _metrics: Metrics | None
    _inline: bool
    _releases: list[Release]
    _spans: SendfileReplies
    _sendfile_fd: int | None
    _sendfile_qcow2: Qcow2Image | None
    _probe: bytearray
    #: the backend's InlineIO methods, bound when transmission starts
    _try_read: Callable[[int, Sequence[memoryview]], bool] | None
    _try_write: Callable[[int, Sequence[Buffer], bool], bool] | None

    #: The sendfile extent (:meth:`_learn_extent`): guest ``[_sf_start,
    #: _sf_end)`` is data at ``_sf_host`` onwards in file ``_sf_fd``.  Class
    #: defaults: empty until the first large read of the connection.
    _sf_start = 0
    _sf_end = 0
    _sf_fd = -1
    _sf_host = 0
    #: where the last read answered by _try_sendfile ended (guest offset)
    _sf_next = -1
    #: guest ``[_nf_start, _nf_end)`` starts with no data extent (a hole,
    #: zero or unallocated clusters): large reads from there take the
    #: general path without asking again
    _nf_start = 0
    _nf_end = 0

    if TYPE_CHECKING:  # implemented by Session
        def abort(self, reason: str, *, hard: bool = True) -> None: ...
        def _schedule_flush(self) -> None: ...

    # -- requests ----------------------------------------------------------
    async def _serve(self, ev: Request,
                     cost: int = 0) -> None:
        # Large reads inside the remembered file extent were offered to
        # _try_sendfile by TransmissionPump._begin, every request's way in.
        held: list[memoryview] = []
        metrics = self._metrics
        started = self.loop.time() if metrics is not None else 0.0
        error: Errno | None = None
        try:
            try:
                await self._execute(ev, held)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # every failure becomes an error reply
                self.errors += 1
                err = error = nbd_errno(e)
                if isinstance(e, OSError | NbdqcowError):
                    msg = str(e) if isinstance(e, NbdqcowError) else (e.strerror or str(e))
                    log.debug("connection %d: %s failed: %s", self.cid, type(ev).__name__, msg)
                else:
                    msg = "internal error"
                    log.error("connection %d: %s at %s failed: %s: %s", self.cid,
                              type(ev).__name__, getattr(ev, "offset", "-"),
                              type(e).__name__, e)
                if self.stream.closed:
                    return
                self.core.reply_error(ev.cookie, err, msg)
        except (OSError, ProtocolError) as e:
            self.abort(f"dropped: {getattr(e, 'strerror', None) or e}")
        finally:
            self._account(ev, error, self.loop.time() - started if metrics is not None else 0.0)
            # Buffers and slot are released with the send of the reply; a
            # request answered inline is sent by the reader at the end of its
            # batch, one finishing in a task at the end of this iteration.
            self._releases.append((held, cost))
            if not self._inline:
                self._schedule_flush()

    def _account(self, ev: Request,
                 error: Errno | None, seconds: float) -> None:
        nbytes = 0
        if isinstance(ev, Read):
            nbytes = ev.length
            if error is None:
                self.bytes_read += nbytes
        elif isinstance(ev, Write):
            nbytes = ev.length
            if error is None:
                self.bytes_written += nbytes
        elif not isinstance(ev, Flush):
            nbytes = ev.length
        metrics = self.server.options.metrics
        if metrics is not None and self.export is not None:
            metrics.observe_request(self.export.name, _COMMAND_NAMES[type(ev)], nbytes,
                                    seconds, None if error is None else error.name)

    async def _execute(self, ev: Request,
                       held: list[memoryview]) -> None:
        assert self.export is not None
        backend = self.export.backend
        core = self.core
        if isinstance(ev, Read):
            runs = await self._read(backend, ev, held)
            core.reply_read(ev.cookie, runs)
        elif isinstance(ev, Write):
            held.append(ev.data)
            await backend.pwritev(ev.offset, [ev.data], fua=ev.fua)
            core.reply_ok(ev.cookie)
        elif isinstance(ev, Flush):
            await backend.flush()
            core.reply_ok(ev.cookie)
        elif isinstance(ev, Trim):
            await backend.trim(ev.offset, ev.length, fua=ev.fua)
            core.reply_ok(ev.cookie)
        elif isinstance(ev, WriteZeroes):
            await backend.zero(ev.offset, ev.length, may_trim=ev.may_trim, fast=ev.fast,
                               fua=ev.fua)
            core.reply_ok(ev.cookie)
        elif isinstance(ev, Cache):
            await backend.cache(ev.offset, ev.length)
            core.reply_ok(ev.cookie)
        else:
            extents = await backend.block_status(ev.offset, ev.length)
            core.reply_block_status(ev.cookie, extents)

    async def _read(self, backend: BlockBackend, ev: Read, held: list[memoryview]
                    ) -> list[ReadRun]:
        """Read ``ev``'s range into pooled buffers; zero extents become holes
        when the client takes structured replies."""
        if ev.length == 0:
            return []
        if (SENDFILE_MIN <= ev.length <= SENDFILE_MAX
                and (self._sendfile_fd is not None or self._sendfile_qcow2 is not None)):
            # Not answered by the fast path in _serve: learn the file extent
            # around the request (which may suspend) and try again; a range
            # that is not all data in one piece, or not cached, is read below.
            await self._learn_extent(backend, ev)
            at = self._sendfile_at(ev)
            if at is not None:
                # Registered now; the caller queues the reply without
                # suspending, and the flush swaps the placeholder (a span
                # whose reply the core dropped is cleared there).
                run = self._spans.placeholder(ev.length)
                self._spans.register(run, at[0], at[1])
                return [run]
        spans: list[tuple[int, int, bool]] = [(ev.offset, ev.length, False)]
        if (self.core.structured_replies and not ev.df and ev.length >= SPARSE_READ_MIN
                and backend.caps.extents):
            spans = []
            end = ev.offset + ev.length
            for x in await backend.block_status(ev.offset, ev.length):
                stop = min(x.end, end)
                zero = bool(x.flags & ExtentFlag.ZERO)
                if spans and spans[-1][2] == zero:
                    s, _, _ = spans[-1]
                    spans[-1] = (s, stop - s, zero)
                else:
                    spans.append((x.offset, stop - x.offset, zero))
                if stop >= end:
                    break
            covered = spans[-1][0] + spans[-1][1] if spans else ev.offset
            if covered < end:  # the backend stopped early: read the rest
                if spans and not spans[-1][2]:
                    s, _, _ = spans[-1]
                    spans[-1] = (s, end - s, False)
                else:
                    spans.append((covered, end - covered, False))
        runs: list[ReadRun] = []
        for off, length, zero in spans:
            if zero:
                runs.append(Hole(length))
                continue
            buf = self.pool.get(length)
            held.append(buf)
            await backend.preadv(off, [buf])
            runs.append(buf)
        return runs

    # -- sendfile ------------------------------------------------------------
    def _try_sendfile(self, ev: Read) -> bool:
        """Queue ``ev``'s reply as a sendfile span if its range lies inside
        the connection's known file extent (:meth:`_learn_extent`) and looks
        cached; ``False`` (nothing done) otherwise.

        Synchronous and cheap: two comparisons, the page-cache probe, the
        placeholder.  The caller has taken the request's slot and releases
        it (with no buffers) when the reply is sent.
        """
        off = ev.offset
        n = ev.length
        start = self._sf_start
        if off < start or off + n > self._sf_end or not SENDFILE_MIN <= n <= SENDFILE_MAX:
            return False
        fd = self._sf_fd
        host = self._sf_host + (off - start)
        # The page-cache probe (page_cached: first and last byte), with one
        # syscall saved on a sequential read: when this read continues the
        # previous one, whose last byte was just seen cached, its first byte
        # is taken as cached too.
        if (off != self._sf_next and not resident(fd, host)) or not resident(fd, host + n - 1):
            return False
        self._sf_next = off + n
        spans = self._spans
        run = spans.placeholder(n)
        spans.register(run, fd, host)
        self.core.reply_read(ev.cookie, (run,))
        return True

    def _sendfile_at(self, ev: Read) -> tuple[int, int] | None:
        """``(fd, host offset)`` when the known extent covers ``ev`` and the
        range looks cached, else ``None``."""
        off = ev.offset
        start = self._sf_start
        if off < start or off + ev.length > self._sf_end:
            return None
        fd = self._sf_fd
        host = self._sf_host + (off - start)
        return (fd, host) if page_cached(fd, host, ev.length, self._probe) else None

    async def _learn_extent(self, backend: BlockBackend, ev: Read) -> None:
        """Remember the stretch of guest bytes from ``ev.offset`` that lies
        contiguous in one host file and is *data* (no hole worth an
        ``OFFSET_HOLE`` chunk), so later reads inside it go out with sendfile
        after two comparisons instead of a block-status call and a mapping
        each (:meth:`_try_sendfile`).

        * raw: the data region around the offset (``SEEK_DATA`` /
          ``SEEK_HOLE``) when the client takes structured replies and so
          could be sent holes; else the whole export.
        * read-only qcow2: the first run of a mapping ``_MAP_AHEAD`` bytes
          ahead, when it is plain data clusters following each other in the
          data file.

        Why remembering is safe: a read-only qcow2 image's mapping never
        changes (``Session`` enables qcow2 sendfile only without a write
        engine).  For a raw file the extent is only an identity mapping plus
        a guess that there is no hole to compact: whatever is remembered,
        sendfile reads the file as it is when the reply leaves.  A hole
        punched into the region since (TRIM, WRITE_ZEROES) goes out as
        zeroes in a data chunk -- the right bytes, less compactly; data
        written into a former hole is read like any data; a file that
        shrank is padded with zeroes (:class:`~nbdqcow.stream.FileSpan`).
        Like qemu-nbd's sparse reads (``block_status`` without
        ``want_zero``), host-file holes under allocated qcow2 clusters
        (metadata preallocation) are sent as data.

        The stretch that starts with something else (a hole, zero or
        unallocated clusters) is remembered too, as ``_nf_start, _nf_end``,
        so that reading through it does not look again (for qcow2, map
        16 MiB ahead) on every request before taking the sparse path.  That
        memory only ever means "use the general path", which is right
        whatever the file holds by then.
        """
        off = ev.offset
        if ((self._sf_start <= off and off + ev.length <= self._sf_end)
                or self._nf_start <= off < self._nf_end):
            return
        fd = self._sendfile_fd
        if fd is not None:
            size = backend.size
            if not (self.core.structured_replies and backend.caps.extents):
                self._remember(0, size, fd, 0)
                return
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
                if data != off:  # a hole first: the sparse path
                    self._nf_start, self._nf_end = off, data
                    return
                end = min(os.lseek(fd, off, os.SEEK_HOLE), size)
            except OSError:  # ENXIO: nothing but holes from here; EINVAL: no SEEK_DATA
                return
            self._remember(off, end, fd, off)
            return
        img = self._sendfile_qcow2
        if img is None:
            return
        window = min(max(ev.length, _MAP_AHEAD), img.size - off)
        runs = await img.map.runs(off, window)
        if not runs:
            return
        r = runs[0]
        if r.type is SubclusterType.NORMAL:
            self._remember(r.guest, r.guest + r.length, img.data.fd, r.host)
        else:
            self._nf_start, self._nf_end = r.guest, r.guest + r.length

    def _remember(self, start: int, end: int, fd: int, host: int) -> None:
        self._sf_next = -1  # continuity means adjacency only inside one extent
        self._sf_start = start
        self._sf_end = end
        self._sf_fd = fd
        self._sf_host = host


_COMMAND_NAMES: dict[type, str] = {
    Read: "READ", Write: "WRITE", Flush: "FLUSH", Trim: "TRIM", WriteZeroes: "WRITE_ZEROES",
    Cache: "CACHE", BlockStatus: "BLOCK_STATUS",
}

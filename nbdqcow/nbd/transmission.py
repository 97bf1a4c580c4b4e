"""The transmission half of :class:`~nbdqcow.nbd.ServerConnection`:
request parsing with edge validation (proto.md "Request message", "Request
types"; compact and extended headers), write-payload reception, and the
``reply_*`` methods that queue simple, structured or extended replies.
"""

from __future__ import annotations

from collections.abc import Sequence

from nbdqcow.backends.base import Extent
from nbdqcow.nbd import replies
from nbdqcow.nbd.answers import ReadRun
from nbdqcow.nbd.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from nbdqcow.nbd.errors import LocalProtocolError, RemoteProtocolError
from nbdqcow.nbd.events import (
    BlockStatus,
    Cache,
    Disconnect,
    EndOfStream,
    Event,
    Flush,
    Read,
    RequestRejected,
    Trim,
    Write,
    WriteZeroes,
    new_read,
    new_write,
    read_setters,
    write_setters,
)
from nbdqcow.nbd.meta import descriptors, status_function
from nbdqcow.nbd.reader import COMPACT_AT as _COMPACT_AT
from nbdqcow.nbd.reader import RECEIVE_LARGE, RECEIVE_SMALL
from nbdqcow.nbd.state import ConnectionState, InFlight, Parser, Phase, command_name
from nbdqcow.nbd.validate import EMPTY_OK, Rejection, payload_length, validate_request
from nbdqcow.nbd.wire import (
    EXTENDED_DATA_HEAD,
    EXTENDED_REQUEST,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_DATA_HEAD,
)

__all__ = ["TransmissionMixin"]


# Commands each reply method may answer.
_OK_COMMANDS = frozenset(
    {Command.WRITE, Command.FLUSH, Command.TRIM, Command.WRITE_ZEROES, Command.CACHE}
)
_READ_ONLY_CMD = frozenset({Command.READ})
_STATUS_CMD = frozenset({Command.BLOCK_STATUS})
_RANGE_EVENTS: dict[int, type[Read | Trim | Cache | WriteZeroes | BlockStatus]] = {
    Command.READ: Read,
    Command.TRIM: Trim,
    Command.CACHE: Cache,
    Command.WRITE_ZEROES: WriteZeroes,
    Command.BLOCK_STATUS: BlockStatus,
}


# Validated command flags are below 64: one CommandFlag object per value,
# built once, instead of an enum construction per request.
_FLAG_OBJECTS = tuple(CommandFlag(i) for i in range(64))
_WRITE, _FLUSH, _DISC = int(Command.WRITE), int(Command.FLUSH), int(Command.DISC)
_DF = int(CommandFlag.DF)
_READ = int(Command.READ)
_WRITE_ZEROES = int(Command.WRITE_ZEROES)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_READ_ONLY_FLAG = int(TransmissionFlag.READ_ONLY)
_SEND_FUA = int(TransmissionFlag.SEND_FUA)
_NO_FLAGS_ONLY = frozenset({0})
_FUA_FLAGS = frozenset({0, int(CommandFlag.FUA)})
_WRITE_PAYLOAD = "the payload of NBD_CMD_WRITE"
_PAYLOAD_LEN = int(CommandFlag.PAYLOAD_LEN)
_MAX_CHUNK = replies.MAX_CHUNK
_EMPTY_OK = frozenset(int(c) for c in EMPTY_OK)
_READ_SETTERS = read_setters()
_WRITE_SETTERS = write_setters()
#: ByteReader.direct_min in transmission
_DIRECT_MIN = 16 * 1024
_RECEIVE_SMALL, _RECEIVE_LARGE = RECEIVE_SMALL, RECEIVE_LARGE
# A one-buffer READ reply's header (replies.read_header), packed in place.
_SIMPLE_HEAD = SIMPLE_REPLY.pack
_STRUCTURED_HEAD = STRUCTURED_DATA_HEAD.pack
_EXTENDED_HEAD = EXTENDED_DATA_HEAD.pack
_SIMPLE_MAGIC = SIMPLE_REPLY_MAGIC
_STRUCTURED_MAGIC = STRUCTURED_REPLY_MAGIC
_EXTENDED_MAGIC = EXTENDED_REPLY_MAGIC
_DONE = int(ReplyFlag.DONE)
_DATA = int(ReplyType.OFFSET_DATA)


class TransmissionMixin(ConnectionState):
    """Requests in, replies out."""

    def _transmission(self) -> Parser:
        r = self._reader
        ext = self._extended
        header = EXTENDED_REQUEST if ext else REQUEST
        expected = EXTENDED_REQUEST_MAGIC if ext else REQUEST_MAGIC
        state = self._state
        assert state is not None
        mode = self._mode()
        drain_limit = max(state.max_payload, self._limits.max_write_drain)
        inflight = self._inflight
        # For the fast path below.  The minimum block is a power of 2 by
        # the Capabilities contract; were it not, a mask of -1 sends every
        # request down the general path.
        size, max_payload, mb = state.size, state.max_payload, state.min_block
        align_mask = mb - 1 if mb & (mb - 1) == 0 else -1
        writable = not state.flags & _READ_ONLY_FLAG
        fast_flags = _FUA_FLAGS if state.flags & _SEND_FUA else _NO_FLAGS_ONLY
        # Extended-header clients may mark a WRITE's length as its payload.
        write_flags = fast_flags | {f | _PAYLOAD_LEN for f in fast_flags} if ext else fast_flags
        # The same facts for _fast_requests, which parses outside this
        # generator while it is idle at the top of its loop.
        self._fast = (header.unpack_from, header.size, expected, fast_flags, write_flags,
                      writable, max_payload, size, align_mask)
        # A WRITE payload's tail shorter than this comes through the
        # staging buffer (ByteReader.direct_min; bigger ones are still
        # received in place).
        r.direct_min = _DIRECT_MIN
        # reply_read's and reply_ok's headers: 0 simple, 1 structured,
        # 2 extended
        self._reply_kind = 2 if ext else 1 if mode.structured else 0
        while True:
            self._idle = False
            # A whole header is usually buffered already: unpack it in place.
            fields = r.unpack_now(header)
            if fields is None:
                if r._pos == len(r._buf) and not r._eof:
                    # Nothing buffered (the end of every batch): pause
                    # without creating an at_clean_eof() generator.
                    self._idle = True
                    yield None
                    continue
                if (yield from r.at_clean_eof()):
                    self._set_phase(Phase.CLOSED)
                    yield EndOfStream()
                    return
                fields = header.unpack((yield from r.read_exact(header.size, "a request header")))
            magic, flags, command, cookie, offset, length = fields
            if magic != expected:
                raise RemoteProtocolError(f"bad request magic {magic:#x} (expected {expected:#x})")
            if (
                (
                    (command == _READ and flags in fast_flags)
                    or (command == _WRITE and writable and flags in write_flags)
                )
                and 0 < length <= max_payload
                and offset + length <= size
                and not (offset | length) & align_mask
                and not self._shutdown
            ):
                # The hot path (issue 6): a READ or WRITE, at most with FUA
                # (when advertised; and PAYLOAD_LEN on an extended WRITE), in
                # range, aligned and within the maximum passes every check of
                # validate_request, which is skipped.
                ev: Event
                if command == _READ:
                    ev = new_read(cookie, _FLAG_OBJECTS[flags], offset, length)
                else:
                    # Receive size for what follows (reader.RECEIVE_SMALL).
                    r.recv_size = _RECEIVE_LARGE if length < _DIRECT_MIN else _RECEIVE_SMALL
                    buf = self._payload_buffer(length)
                    if not r.read_into_now(buf):
                        yield from r.read_into(buf, _WRITE_PAYLOAD)
                    ev = new_write(cookie, _FLAG_OBJECTS[flags], offset, buf)
                if cookie in inflight:
                    self._track_duplicate(cookie, (command, flags, offset, length))
                else:
                    inflight[cookie] = (command, flags, offset, length)
                self._n_inflight += 1
                self._idle = True
                yield ev
                continue
            if command == _DISC:
                self._set_phase(Phase.CLOSED)
                yield Disconnect()
                return
            payload = payload_length(command, flags, length, ext)
            if payload > drain_limit:
                raise RemoteProtocolError(
                    f"{command_name(command)} payload of {payload} bytes exceeds the "
                    f"limit of {drain_limit}"
                )
            rej: Rejection | None
            if self._shutdown:
                rej = Rejection(Errno.ESHUTDOWN, "the server is shutting down")
            else:
                rej = validate_request(command, flags, offset, length, state)
            if rej is not None:
                if payload:
                    # Drain, so the next header is found where it is.
                    yield from r.skip(payload, f"the payload of a refused {command_name(command)}")
                self._out += replies.error(mode, cookie, offset, rej.errno, rej.message)
                self._idle = True
                yield RequestRejected(cookie, command, rej.errno, rej.message)
                continue
            if not length and command in _EMPTY_OK:
                # Valid and nothing to do (validate.py): answered here, like
                # qemu-nbd 7.2, so no backend ever sees an empty range.
                self._out += replies.empty(mode, cookie, offset, command == _READ)
                continue
            cflags = _FLAG_OBJECTS[flags]
            if command == _WRITE:
                buf = self._payload_buffer(payload)
                yield from r.read_into(buf, _WRITE_PAYLOAD)
                ev = new_write(cookie, cflags, offset, buf)
            elif command == _FLUSH:
                ev = Flush(cookie, cflags)
            elif command == _READ:
                ev = new_read(cookie, cflags, offset, length)
            else:
                ev = _RANGE_EVENTS[command](cookie, cflags, offset, length)
            if cookie in inflight:
                self._track_duplicate(cookie, (command, flags, offset, length))
            else:
                inflight[cookie] = (command, flags, offset, length)
            self._n_inflight += 1
            self._idle = True
            yield ev

    def _fast_requests(self, out: list[Event], limit: int) -> None:
        """Append to ``out`` up to ``limit`` events for the requests at the
        head of the buffer that take the hot path of :meth:`_transmission`
        (a READ, or a WRITE whose payload is buffered too); stop at the
        first request that does not, leaving it to the generator.

        Only while the generator is idle at the top of its loop
        (``self._idle``): there its next step would be to parse the very
        same header, so parsing it here instead changes nothing but the
        cost.  Issue 6: per 4 KiB request this saves the generator resume,
        ``next_event``'s frame and the per-request ``unpack_now`` /
        ``_consume`` calls; the buffer is consumed once per batch.  The
        conditions are those of the generator's hot path, in the same
        order; ``tests/nbd/test_hot_path.py`` checks the two against
        :func:`validate_request` and against each other.
        """
        if self._shutdown:
            return
        r = self._reader
        buf = r._buf
        pos = start = r._pos
        end = len(buf)
        # Issue 6: only what a READ needs is bound up front (the WRITE
        # branch fetches its own; the header's unpack_from and size come
        # with self._fast), and the buffer is consumed without a
        # ByteReader._consume call.  With the module-global phases of
        # connection.py: next_events() of a batch of one 4 KiB READ (queue
        # depth 1) 17.1k -> 14.3k instructions (callgrind, 50k calls fed
        # through get_buffer/buffer_updated, minus the feeding).
        unpack_from, hsize, expected, fast_flags, write_flags, writable, max_payload, size, \
            align_mask = self._fast
        inflight = self._inflight
        flag_objects = _FLAG_OBJECTS
        new_object, set_cookie, set_flags, set_offset, set_length = _READ_SETTERS
        append = out.append
        n = 0
        last_write = 0  # the length of the batch's last WRITE, if any
        view: memoryview | None = None
        try:
            while n < limit and end - pos >= hsize:
                magic, flags, command, cookie, offset, length = unpack_from(buf, pos)
                if not (
                    magic == expected
                    and (
                        (command == _READ and flags in fast_flags)
                        or (command == _WRITE and writable and flags in write_flags)
                    )
                    and 0 < length <= max_payload
                    and offset + length <= size
                    and not (offset | length) & align_mask
                ):
                    break
                if command == _READ:
                    # new_read() without its call
                    rd = new_object(Read)
                    set_cookie(rd, cookie)
                    set_flags(rd, flag_objects[flags])
                    set_offset(rd, offset)
                    set_length(rd, length)
                    ev: Event = rd
                    pos += hsize
                else:
                    data_at = pos + hsize
                    last_write = length
                    if end - data_at < length:
                        break  # the generator receives the rest in place
                    data = self._allocate(length)
                    if (type(data) is not memoryview or data.nbytes != length
                            or data.readonly or data.format != "B" or data.ndim != 1):
                        data = self._check_payload_buffer(data, length)
                    if view is None:
                        view = memoryview(buf)
                    data[:] = view[data_at : data_at + length]
                    pos = data_at + length
                    set_write_offset, set_write_data = _WRITE_SETTERS
                    wr = new_object(Write)  # new_write() without its call
                    set_cookie(wr, cookie)
                    set_flags(wr, flag_objects[flags])
                    set_write_offset(wr, offset)
                    set_write_data(wr, data)
                    ev = wr
                if cookie in inflight:
                    self._track_duplicate(cookie, (command, flags, offset, length))
                else:
                    inflight[cookie] = (command, flags, offset, length)
                append(ev)
                n += 1
        finally:
            if last_write:
                # Receive size for what follows (reader.RECEIVE_SMALL).
                r.recv_size = _RECEIVE_LARGE if last_write < _DIRECT_MIN else _RECEIVE_SMALL
            if view is not None:
                view.release()  # before the buffer may be resized below
            self._n_inflight += n
            if pos != start:
                # ByteReader._consume(pos - start) without its call.
                if pos == end:
                    buf.clear()
                    r._pos = 0
                elif pos >= _COMPACT_AT:
                    del buf[:pos]
                    r._pos = 0
                else:
                    r._pos = pos

    def _track_duplicate(self, cookie: int, req: InFlight) -> None:
        """A second request with a cookie still in flight (clients SHOULD NOT;
        the spec does not forbid it): replies pair with them in order."""
        self._inflight_dups.setdefault(cookie, []).append(req)

    def _payload_buffer(self, nbytes: int) -> memoryview:
        return self._check_payload_buffer(self._allocate(nbytes), nbytes)

    def _check_payload_buffer(self, buf: memoryview, nbytes: int) -> memoryview:
        """``allocate(nbytes)``'s result, checked (and cast to bytes)."""
        if not isinstance(buf, memoryview) or buf.readonly or buf.nbytes != nbytes:
            raise LocalProtocolError(
                f"allocate({nbytes}) must return a writable memoryview of {nbytes} bytes"
            )
        return buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")

    # --- transmission replies -------------------------------------------------

    def _peek(self, cookie: int, allowed: frozenset[int] | None, method: str) -> InFlight | None:
        """The oldest in-flight request with ``cookie`` (None after ERROR:
        replies to a failed connection are dropped, it is being closed)."""
        if self._phase is Phase.ERROR:
            return None
        req = self._inflight.get(cookie)
        if req is None:
            raise LocalProtocolError(f"{method}: no request with cookie {cookie:#x} awaits a reply")
        if allowed is not None and req[0] not in allowed:
            raise LocalProtocolError(
                f"{method} cannot answer {command_name(req[0])} (cookie {cookie:#x})"
            )
        return req

    def _pop(self, cookie: int) -> None:
        dups = self._inflight_dups.get(cookie)
        if dups:
            self._inflight[cookie] = dups.pop(0)
            if not dups:
                del self._inflight_dups[cookie]
        else:
            del self._inflight[cookie]
        self._n_inflight -= 1

    def _mode(self) -> replies.ReplyMode:
        # Fixed when transmission starts (_enter_transmission), and replies
        # exist only for requests of the transmission phase.
        mode = self._reply_mode
        assert mode is not None
        return mode

    def reply_ok(self, cookie: int) -> None:
        """Success without payload (WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE).

        A simple reply, or a ``NONE`` chunk with extended headers.

        Raises:
            LocalProtocolError: unknown cookie, or it is a READ/BLOCK_STATUS.
        """
        req = self._inflight.get(cookie)
        if req is None or req[0] not in _OK_COMMANDS:
            req = self._peek(cookie, _OK_COMMANDS, "reply_ok()")
            if req is None:
                return
        if self._inflight_dups:
            self._pop(cookie)
        else:  # _pop() without the call (the hot path of a 4 KiB WRITE)
            del self._inflight[cookie]
            self._n_inflight -= 1
        if self._reply_kind != 2:
            # replies.ok()'s simple reply, packed here
            self._out.append(_SIMPLE_HEAD(_SIMPLE_MAGIC, 0, cookie))
        else:
            self._out += replies.ok(self._mode(), cookie, req[2])

    def reply_read(self, cookie: int, runs: Sequence[ReadRun]) -> None:
        """Successful READ: ``runs`` (buffers and :class:`Hole` s) cover the
        request's range, in order, exactly ``length`` bytes in total.

        The offset is the request's (the core remembers it).  With structured
        replies each buffer becomes an ``OFFSET_DATA`` chunk and each hole an
        ``OFFSET_HOLE`` chunk (a single ``OFFSET_DATA`` with explicit zeroes
        under ``DF``); otherwise one simple reply whose payload is the buffers
        and zero slices.  Buffers are referenced, not copied.

        Raises:
            LocalProtocolError: unknown cookie, not a READ, or wrong total.
        """
        req = self._inflight.get(cookie)
        if req is not None and req[0] == _READ and len(runs) == 1:
            # The hot path (issue 6): one caller-owned buffer covering the
            # whole request, the usual answer to a small read.  One chunk
            # (or simple reply) header, then the buffer itself.
            run = runs[0]
            length = req[3]
            if type(run) is memoryview and run.nbytes == length <= _MAX_CHUNK:
                if self._inflight_dups:
                    self._pop(cookie)
                else:  # _pop() without the call
                    del self._inflight[cookie]
                    self._n_inflight -= 1
                # replies.read_header() without its call: the mode is fixed
                # for the connection (tests/nbd/test_hot_path.py compares
                # the bytes with the general builder's).
                kind = self._reply_kind
                if kind == 1:
                    head = _STRUCTURED_HEAD(_STRUCTURED_MAGIC, _DONE, _DATA, cookie,
                                            8 + length, req[2])
                elif kind == 0:
                    head = _SIMPLE_HEAD(_SIMPLE_MAGIC, 0, cookie)
                else:
                    head = _EXTENDED_HEAD(_EXTENDED_MAGIC, _DONE, _DATA, cookie, req[2],
                                          8 + length, req[2])
                self._out += (head, run)
                return
        req = self._peek(cookie, _READ_ONLY_CMD, "reply_read()")
        if req is None:
            return
        _, flags, offset, length = req
        total = replies.read_total(runs)
        if total != length:
            raise LocalProtocolError(
                f"reply_read(): runs total {total} bytes, the request read {length}"
            )
        self._pop(cookie)
        df = bool(flags & _DF)
        self._out += replies.read(self._mode(), cookie, offset, length, runs, df)

    def reply_block_status(self, cookie: int, extents: Sequence[Extent]) -> None:
        """Successful BLOCK_STATUS: ``extents`` as the backend returned them
        (contiguous from the request offset; may stop early, may run past the
        end of the request).

        The core sends one chunk per selected context: ``base:allocation``
        from ``Extent.flags``, ``qemu:allocation-depth`` from ``Extent.depth``,
        merging neighbours equal in that context, clipping to the request,
        keeping one extent under ``REQ_ONE``, 64-bit descriptors with extended
        headers.

        Raises:
            LocalProtocolError: unknown cookie, not a BLOCK_STATUS, or
                ``extents`` do not start at the request offset.
        """
        req = self._peek(cookie, _STATUS_CMD, "reply_block_status()")
        if req is None:
            return
        _, flags, offset, length = req
        req_one = bool(flags & CommandFlag.REQ_ONE)
        max_len = (1 << 63) if self._extended else 0xFFFFFFFF
        chunks: list[tuple[int, Sequence[tuple[int, int]]]] = []
        try:
            for ctx in self._meta_selected:
                descs = descriptors(
                    extents, offset, length, status_function(ctx.name), req_one, max_len
                )
                chunks.append((ctx.id, descs))
        except ValueError as e:
            raise LocalProtocolError(f"reply_block_status(): {e}") from None
        self._pop(cookie)
        self._out += replies.block_status(self._mode(), cookie, offset, chunks)

    def reply_error(self, cookie: int, error: Errno, message: str = "") -> None:
        """Fail a request with an NBD errno (use :func:`to_nbd_errno` for an
        ``OSError``).  With structured replies the message goes to the client
        in an ``ERROR`` chunk; with simple replies it is dropped.

        Two values are reserved by proto.md and replaced by ``EINVAL`` (the
        value it tells clients to assume for anything unexpected) elsewhere:
        ``ENOTSUP`` is only for a WRITE_ZEROES with ``FAST_ZERO`` (without
        the flag the server "MUST NOT fail with NBD_ENOTSUP"), and
        ``EOVERFLOW`` only for a READ with ``DF`` ("SHOULD NOT return
        NBD_EOVERFLOW except ...").  A backend's ``EOPNOTSUPP`` from, say, a
        TRIM thus never reaches the client as a fast-zero refusal.

        Raises:
            LocalProtocolError: unknown cookie, or ``error`` is not an NBD errno.
        """
        try:
            err = Errno(error)
        except ValueError:
            raise LocalProtocolError(f"reply_error(): {error} is not an NBD errno") from None
        req = self._peek(cookie, None, "reply_error()")
        if req is None:
            return
        command, flags = req[0], req[1]
        if (err is Errno.ENOTSUP and not (command == _WRITE_ZEROES and flags & _FAST_ZERO)) or (
            err is Errno.EOVERFLOW and not (command == _READ and flags & _DF)
        ):
            err = Errno.EINVAL
        self._pop(cookie)
        self._out += replies.error(self._mode(), cookie, req[2], err, message)

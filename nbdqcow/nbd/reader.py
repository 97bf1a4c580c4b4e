"""Incremental input for the NBD parser: generator-based ``read_exact`` in
the style of websockets' ``streams.py``, plus a *direct target* so that a
WRITE payload is received straight into the application's buffer.

The parser is one generator; each primitive here is a sub-generator used
with ``yield from``.  A primitive yields ``None`` while it lacks input and
returns once it has what it needs, so parsing does not depend on how the
input was chunked.

Two ways in, mirroring :class:`asyncio.Protocol` and
:class:`asyncio.BufferedProtocol`:

* :meth:`ByteReader.feed` copies a received chunk;
* :meth:`ByteReader.get_buffer` / :meth:`ByteReader.buffer_updated` let the
  transport write in place.  While :meth:`ByteReader.read_into` waits for a
  payload, ``get_buffer`` returns the unfilled tail of the payload buffer
  itself, so the payload is never copied.

Invariant: while a direct target (or a skip) is active, no unconsumed bytes
are buffered, because the primitive that set it consumed them all first.
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from typing import Any

from nbdqcow.backends.base import Buffer
from nbdqcow.nbd.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["RECEIVE_LARGE", "RECEIVE_SMALL", "ByteReader", "Need"]

#: What a reading primitive yields while it waits for input.
Need = Generator[None, None, None]

# Compact the buffer once this many consumed bytes sit at its start; below
# that, re-slicing a bytearray costs more than it saves.
_COMPACT_AT = 64 * 1024
#: (the same, for the core's batch parser, which consumes without a call)
COMPACT_AT = _COMPACT_AT

# The staging buffer starts this small and grows to its full size the first
# time a receive fills it.  A handshake moves a few dozen bytes per receive
# and many connections never get further (health checks, ``nbdinfo``,
# issue 6's handshake rate): zeroing 64 KiB for each of them cost about as
# much as parsing the whole handshake.  A connection that streams requests
# fills 4 KiB at its first busy receive and runs with the full size from
# then on.
_FIRST_STAGING = 4096

#: What one receive into the staging buffer may take (``recv_size``): the
#: default, and what the core sets while the client's WRITEs are small.
#: Issue 6, A/B of ``--workloads`` on one tree (fio, 3 alternated 4 s runs):
#: 4 KiB WRITEs at queue depth 32 (132 KiB of requests in flight) took
#: three receives per batch in 64 KiB, each ending inside a payload whose
#: WRITE then went through the generator; in one 256 KiB receive raw
#: tmpfs writes went 79.7-92.3k -> 86.8-104.8k IOPS, 6.2-6.8 -> 5.1-5.8 us
#: of user CPU per write.  Big payloads want the opposite: what lands in
#: the staging buffer is copied twice (into the internal buffer, then into
#: the payload buffer), and 1 GiB of 256 KiB WRITEs (nbdcopy) through a
#: 256 KiB staging buffer fell from ~1130 to ~780 MiB/s.  So the core
#: offers the large size only while WRITE payloads come through staging
#: (shorter than ``direct_min``), and the buffer grows to it only then.
#: Memory: a connection that has once sent a queue of small WRITEs keeps a
#: 256 KiB staging buffer (zeroed once) until it closes, four times the
#: 64 KiB of one that has not; one that only negotiates, or reads with
#: fewer than ~140 requests queued, stays at the first 4 KiB
#: (:data:`_FIRST_STAGING`).
RECEIVE_SMALL = 64 * 1024
RECEIVE_LARGE = 256 * 1024


class ByteReader:
    """Buffered client input with generator-based reads."""

    def __init__(self, staging_size: int = RECEIVE_LARGE, direct_min: int = 0) -> None:
        #: A payload still missing fewer bytes than this is received into
        #: the staging buffer and copied (set by the core for transmission).
        #: Issue 6, 4 KiB WRITEs at queue depth 32: a 64 KiB receive ends
        #: in the middle of a payload nearly every time, and receiving the
        #: few KiB of its tail into the payload buffer itself cost a
        #: ``recv`` of its own (two per staging fill); through the staging
        #: buffer the tail arrives with the headers that follow it.
        self.direct_min = direct_min
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        # get_buffer() hands out views of this buffer when no payload target
        # is active; it is never resized (only replaced by a bigger one, see
        # _FIRST_STAGING), so views stay valid.
        self._staging_size = staging_size
        self._staging = bytearray(min(staging_size, _FIRST_STAGING))
        #: How much of the staging buffer one receive is offered (see
        #: :data:`RECEIVE_SMALL`); the core sets it from the WRITEs it
        #: parses, and ``get_buffer`` and the growth of the buffer clamp it
        #: to ``staging_size``.
        self.recv_size = min(staging_size, RECEIVE_SMALL)
        self._target: memoryview | None = None
        self._filled = 0
        self._skip = 0
        self._lent: str | None = None  # what the last get_buffer() returned

    # --- input ----------------------------------------------------------------

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def receiving(self) -> bool:
        """A payload (:meth:`read_into`) is partly received."""
        return self._target is not None

    @property
    def buffered(self) -> int:
        """Unconsumed bytes held in the internal buffer."""
        return len(self._buf) - self._pos

    def feed(self, data: Buffer) -> None:
        """Take a received chunk (copied); an empty chunk means EOF."""
        if self._lent is not None:
            raise LocalProtocolError(
                "receive_data() called between get_buffer() and buffer_updated()"
            )
        if self._eof:
            raise LocalProtocolError("data received after EOF")
        mv = memoryview(data).cast("B")
        if not mv.nbytes:
            self._eof = True
            return
        mv = self._absorb(mv)
        if mv.nbytes:
            self._buf += mv

    def _absorb(self, mv: memoryview) -> memoryview:
        """Route the start of ``mv`` to an active target or skip; return the
        rest, which belongs in the buffer."""
        if self._target is not None:
            n = min(mv.nbytes, self._target.nbytes - self._filled)
            self._target[self._filled : self._filled + n] = mv[:n]
            self._filled += n
            return mv[n:]
        if self._skip:
            n = min(mv.nbytes, self._skip)
            self._skip -= n
            return mv[n:]
        return mv

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view for the transport to receive into."""
        if self._lent is not None:
            raise LocalProtocolError("get_buffer() called twice without buffer_updated()")
        if self._eof:
            raise LocalProtocolError("get_buffer() after EOF")
        target = self._target
        if target is not None and target.nbytes - self._filled >= max(self.direct_min, 1):
            self._lent = "target"
            return target[self._filled :]
        self._lent = "staging"
        staging = self._staging
        limit = self.recv_size
        return memoryview(staging) if len(staging) <= limit else memoryview(staging)[:limit]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer()``."""
        lent, self._lent = self._lent, None
        if lent is None:
            raise LocalProtocolError("buffer_updated() without get_buffer()")
        if nbytes <= 0:
            return
        if lent == "target":
            assert self._target is not None
            if nbytes > self._target.nbytes - self._filled:
                raise LocalProtocolError(f"buffer_updated({nbytes}) exceeds the buffer lent")
            self._filled += nbytes
            return
        staged = min(len(self._staging), self.recv_size)  # the view get_buffer() lent
        if nbytes > staged:
            raise LocalProtocolError(f"buffer_updated({nbytes}) exceeds the buffer lent")
        if self._target is None and not self._skip:
            # Nothing to route elsewhere (the usual case): no _absorb() call.
            self._buf += memoryview(self._staging)[:nbytes]
        else:
            rest = self._absorb(memoryview(self._staging)[:nbytes])
            if rest.nbytes:
                self._buf += rest
        if nbytes == staged:
            # A full receive: more was probably waiting.  (A new object, not
            # a resize: the caller may still hold a view of the old one.)
            self._grow()

    def _grow(self) -> None:
        """After a receive filled the whole staging buffer: replace it with
        one of the size a receive may take now, if that is bigger."""
        size = min(self.recv_size, self._staging_size)
        if len(self._staging) < size:
            self._staging = bytearray(size)

    # --- primitives (sub-generators) -----------------------------------------

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[self._pos : self._pos + n])
        self._consume(n)
        return out

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_AT:
            del self._buf[: self._pos]
            self._pos = 0

    def unpack_now(self, layout: struct.Struct) -> tuple[Any, ...] | None:
        """Unpack the next ``layout.size`` bytes in place if they are already
        buffered, else ``None`` (the per-request fast path: no generator, and
        no intermediate ``bytes`` object)."""
        pos = self._pos
        if len(self._buf) - pos < layout.size:
            return None
        fields = layout.unpack_from(self._buf, pos)
        self._consume(layout.size)
        return fields

    def take_now(self, n: int) -> bytes | None:
        """The next ``n`` bytes if they are already buffered, else ``None``
        (the per-request fast path: no generator is created)."""
        if len(self._buf) - self._pos < n:
            return None
        return self._take(n)

    def read_exact(self, n: int, what: str) -> Generator[None, None, bytes]:
        """Return the next ``n`` bytes (small: headers and option data).

        Raises:
            RemoteProtocolError: EOF before ``n`` bytes; names ``what``.
        """
        while len(self._buf) - self._pos < n:
            if self._eof:
                raise RemoteProtocolError(
                    f"connection closed in the middle of {what} "
                    f"({self.buffered} of {n} bytes received)"
                )
            yield
        return self._take(n)

    def at_clean_eof(self) -> Generator[None, None, bool]:
        """Wait for a byte or EOF; True at EOF with nothing buffered (the
        peer closed between two messages)."""
        while len(self._buf) == self._pos:
            if self._eof:
                return True
            yield
        return False

    def read_into_now(self, dest: memoryview) -> bool:
        """Fill ``dest`` at once if all its bytes are already buffered (the
        usual case for a small WRITE: the payload arrived with its header);
        otherwise do nothing and return False (use :meth:`read_into`)."""
        n = dest.nbytes
        pos = self._pos
        if len(self._buf) - pos < n:
            return False
        with memoryview(self._buf) as view:
            dest[:] = view[pos : pos + n]
        self._consume(n)
        return True

    def read_into(self, dest: memoryview, what: str) -> Need:
        """Fill ``dest`` (a payload buffer) completely.

        Bytes already buffered are copied; the rest arrive in place (through
        :meth:`get_buffer`) or are copied once from each fed chunk.
        """
        n = min(self.buffered, dest.nbytes)
        if n:
            # Through a temporary view, so the bytes are copied once; it is
            # released before _consume() may resize the buffer.
            with memoryview(self._buf) as view:
                dest[:n] = view[self._pos : self._pos + n]
            self._consume(n)
        if n == dest.nbytes:
            return
        self._target, self._filled = dest, n
        try:
            while self._filled < dest.nbytes:
                if self._eof:
                    raise RemoteProtocolError(
                        f"connection closed in the middle of {what} "
                        f"({self._filled} of {dest.nbytes} bytes received)"
                    )
                yield
        finally:
            self._target = None
            self._filled = 0

    def skip(self, n: int, what: str) -> Need:
        """Discard the next ``n`` bytes (a refused WRITE's payload)."""
        k = min(self.buffered, n)
        self._consume(k)
        self._skip = n - k
        while self._skip:
            if self._eof:
                raise RemoteProtocolError(
                    f"connection closed in the middle of {what} ({n - self._skip} of {n} bytes)"
                )
            yield

    def discard(self) -> None:
        """Drop buffered input (the session has ended; late bytes are noise)."""
        self._buf.clear()
        self._pos = 0

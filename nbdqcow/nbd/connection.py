"""The sans-I/O NBD server connection (ARCHITECTURE.md section 8.3; the
protocol is ``doc/proto.md``, fixed newstyle only, plus the extended-headers
extension).

Theory of operation
-------------------
A :class:`ServerConnection` is bytes in, events out, bytes out.  It never
touches a socket, a clock or a file.  The adapter (``nbdqcow.server``):

1. sends :meth:`data_to_send` (the greeting is queued at construction);
2. feeds every received chunk to :meth:`receive_data` (``b""`` at EOF), or,
   as an :class:`asyncio.BufferedProtocol`, forwards ``get_buffer`` /
   ``buffer_updated`` to the methods of the same name;
3. drains :meth:`next_event` until it returns ``None`` (or takes the
   events in batches with :meth:`next_events`: the same events, in the same
   order, with every buffered hot-path request parsed in one loop),
   acting on each event;
4. answers handshake events (``accept_export``, ``list_exports``,
   ``reject``) and transmission events (``reply_*``), then sends
   :meth:`data_to_send` again.

The events and the bytes produced do not depend on how the input is chunked.

Write payloads and zero copy
----------------------------
A WRITE payload is received into a buffer the *application* owns: the
connection is built with ``allocate(nbytes) -> memoryview`` (default: a fresh
``bytearray``), and calls it once per valid WRITE.  The payload is placed
there and handed over in :class:`~nbdqcow.nbd.events.Write` ``.data``; the
core keeps no reference afterwards, so the app may pass it to ``pwritev`` and
return it to a pool.

* Through :meth:`receive_data`, each received chunk is copied once, straight
  into that buffer (the chunk belongs to the transport anyway).
* Through :meth:`get_buffer`/:meth:`buffer_updated` (asyncio's
  ``BufferedProtocol``, or ``sock.recv_into``), once the request header has
  been parsed :meth:`get_buffer` returns *the unfilled tail of the payload
  buffer itself*, so the kernel writes the payload directly where
  ``pwritev`` will read it: zero copies.  Only the bytes that happened to
  arrive together with the header (at most one receive) are copied.

Headers and option data are small and are parsed from an internal buffer.

Read replies and zero copy
--------------------------
``reply_read`` takes the data as a list of runs: caller-owned buffers (e.g.
the ``memoryview`` slices ``preadv`` filled) and :class:`Hole` runs.  The core
queues reply headers as small ``bytes`` and the payload buffers *as given*:
:meth:`data_to_send` returns headers and payload views as separate items for
one vectored send (``sendmsg``/``writelines``).  The application must not
reuse a payload buffer until it has been sent.  Holes become
``OFFSET_HOLE`` chunks with structured replies, and slices of one shared
zero buffer otherwise.

Ordering and concurrency
------------------------
Every ``reply_*`` call appends one complete reply (all its chunks) to the
output queue, so replies from concurrent tasks never interleave on the wire
as long as the adapter writes each :meth:`data_to_send` result in order.
Requests may be answered in any order.

Layout
------
The class is assembled from four modules: :mod:`nbdqcow.nbd.state`
(phases, transitions, negotiated state), :mod:`nbdqcow.nbd.handshake`
(options), :mod:`nbdqcow.nbd.decisions` (handshake answers) and
:mod:`nbdqcow.nbd.transmission` (requests and replies); this module holds
the input side and the parser's top level.

Errors
------
For any input the core either proceeds or raises
:class:`~nbdqcow.nbd.errors.RemoteProtocolError` (the adapter hard-disconnects,
after optionally sending what is queued).  Misuse of the API raises
:class:`~nbdqcow.nbd.errors.LocalProtocolError`.  After either, the phase is
:attr:`Phase.ERROR`.
"""

from __future__ import annotations

from nbdqcow.backends.base import Buffer
from nbdqcow.nbd.constants import ClientFlag
from nbdqcow.nbd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from nbdqcow.nbd.events import EndOfStream, Event, HandshakeComplete
from nbdqcow.nbd.handshake import HandshakeMixin
from nbdqcow.nbd.settings import ProtocolLimits, TlsMode
from nbdqcow.nbd.state import TRANSITIONS, Allocator, Outcome, Parser, Phase
from nbdqcow.nbd.transmission import TransmissionMixin
from nbdqcow.nbd.wire import CLIENT_FLAGS, OPTION_HEADER

__all__ = ["TRANSITIONS", "Allocator", "Phase", "ServerConnection"]

# Handshake bytes buffered beyond one option of the maximum length (see
# _check_flood): a transport read's worth once parsed, 1 MiB before.
_TIGHT_SLACK = 64 * 1024
_LOOSE_SLACK = 1024 * 1024

# Plain ints: "~" on an IntFlag would only invert the *known* bits, and "&"
# with an IntFlag builds a new enum object each time.
_C_FIXED_NEWSTYLE = int(ClientFlag.FIXED_NEWSTYLE)
_C_NO_ZEROES = int(ClientFlag.NO_ZEROES)
_KNOWN_CLIENT_FLAGS = _C_FIXED_NEWSTYLE | _C_NO_ZEROES
# The phases in which a client must wait for each option's reply.
_HAGGLING = (Phase.CLIENT_FLAGS, Phase.OPTIONS)
# Issue 6: the phases the per-receive and per-batch paths test, as module
# globals.  ``Phase.TRANSMISSION`` is a class attribute of an Enum, and
# EnumType's ``__getattr__`` keeps Python 3.11 from specializing that
# lookup: ~100 ns each (timeit: 100 vs 10 ns for a global), four to five
# of them per receive.
_TRANSMISSION = Phase.TRANSMISSION
_ERROR = Phase.ERROR
_CLOSED = Phase.CLOSED
_TLS_HANDSHAKE = Phase.TLS_HANDSHAKE


class ServerConnection(HandshakeMixin, TransmissionMixin):
    """Server side of one NBD connection, without I/O.

    Args:
        limits: protocol bounds (option count/length, payload drain limit).
        tls: STARTTLS policy; a :class:`TlsMode` or its string value.
        allocate: returns the buffer a WRITE payload is received into; the
            default allocates a ``bytearray`` per write.
    """

    def __init__(
        self,
        *,
        limits: ProtocolLimits | None = None,
        tls: TlsMode | str = TlsMode.OFF,
        allocate: Allocator | None = None,
    ) -> None:
        super().__init__(limits=limits, tls=tls, allocate=allocate)
        self._parser = self._parse()

    # --- input ----------------------------------------------------------------

    def _check_input(self) -> bool:
        """False when input is to be ignored (the session has ended)."""
        if self._phase is _ERROR:
            raise LocalProtocolError(f"the connection has already failed: {self._error}")
        if self._phase is _TLS_HANDSHAKE:
            raise LocalProtocolError("input during the TLS handshake: call tls_established() first")
        return self._phase is not _CLOSED

    def _check_flood(self, slack: int) -> None:
        # During the handshake a client MUST wait for each option's final
        # reply, so at most one option can legitimately be buffered; more is
        # a flood that would otherwise grow the buffer without bound.  The
        # tight check (slack 64 KiB) runs in next_event() once the parser
        # has taken what it can: an oversized option's data is then being
        # skipped, not buffered.  receive_data()/buffer_updated() only apply
        # a loose cap, as one transport read may hold a header and the
        # start of such data before the parser has seen the header.
        if self._phase in _HAGGLING:
            bound = OPTION_HEADER.size + self._limits.max_option_length + slack
            if self._reader.buffered > bound:
                exc = RemoteProtocolError(
                    f"client sent {self._reader.buffered} bytes during the handshake "
                    "without waiting for replies"
                )
                self._fail(exc)
                raise exc

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes received from the client; ``b""`` means EOF.

        The bytes are copied (into the internal buffer, or straight into a
        pending WRITE payload buffer); ``data`` may be reused afterwards.
        Bytes after the session ended (DISC, ABORT) are ignored.

        Raises:
            LocalProtocolError: in TLS_HANDSHAKE (those bytes are TLS), after
                EOF, or in ERROR.
            RemoteProtocolError: the client floods the handshake without
                waiting for replies.
        """
        if not self._check_input():
            return
        self._reader.feed(data)
        self._check_flood(_LOOSE_SLACK)

    @property
    def payload_pending(self) -> bool:
        """A WRITE's payload buffer is allocated and the rest of its
        payload is still to be received (an adapter times this: a client
        could otherwise pin the buffer forever)."""
        return self._reader._target is not None  # ByteReader.receiving, without its call

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should be written
        (:meth:`asyncio.BufferedProtocol.get_buffer`).

        While a WRITE payload is being received this is the unfilled tail of
        the application's payload buffer (zero copy); otherwise a region of
        an internal buffer.  Write into it, then call :meth:`buffer_updated`
        before calling anything else on the connection.
        """
        r = self._reader
        if r._lent is None and r._target is None and not r._eof \
                and self._phase is _TRANSMISSION:
            # Issue 6: ByteReader.get_buffer's usual answer in transmission
            # (no payload being received: the staging buffer) without its
            # call.  With buffer_updated's path below and the module-global
            # phases, a get_buffer/buffer_updated(0) pair went from 6.4k to
            # 4.6k instructions (callgrind, 50k pairs minus the loop).
            r._lent = "staging"
            staging = r._staging
            limit = r.recv_size
            return memoryview(staging) if len(staging) <= limit else memoryview(staging)[:limit]
        if self._phase is _ERROR:
            raise LocalProtocolError(f"the connection has already failed: {self._error}")
        return r.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last
        :meth:`get_buffer` view (:meth:`asyncio.BufferedProtocol.buffer_updated`).
        At EOF (the receive returned 0 bytes) close the bracket with
        ``buffer_updated(0)``, then call ``receive_data(b"")``."""
        r = self._reader
        phase = self._phase
        if phase is _TRANSMISSION and r._lent == "staging" and r._target is None \
                and not r._skip:
            # The per-receive path of a busy connection: bytes received into
            # the staging buffer with nothing to route elsewhere
            # (ByteReader.buffer_updated's usual case, without its call).
            staging = r._staging
            lent = len(staging)  # the view get_buffer() offered: at most recv_size
            if lent > r.recv_size:
                lent = r.recv_size
            if 0 <= nbytes <= lent:
                r._lent = None
                if nbytes:
                    r._buf += memoryview(staging)[:nbytes]
                    if nbytes == lent:
                        r._grow()  # a full receive: as in ByteReader.buffer_updated
                return
        r.buffer_updated(nbytes)
        if phase is _TRANSMISSION:
            return  # nothing to check
        if phase is _CLOSED:
            self._reader.discard()
            return
        if phase is _TLS_HANDSHAKE and nbytes > 0:
            raise LocalProtocolError("input during the TLS handshake: call tls_established() first")
        self._check_flood(_LOOSE_SLACK)

    def next_event(self) -> Event | None:
        """Parse the next event, or return ``None``.

        ``None`` means more input is needed, a handshake event awaits its
        answer, the TLS handshake is due, or the connection has ended.

        Raises:
            RemoteProtocolError: the client broke the protocol; hard-disconnect.
            LocalProtocolError: the connection is already in ERROR.
        """
        if self._phase is _ERROR:
            raise LocalProtocolError(f"the connection has already failed: {self._error}")
        if self._parser is None:
            return None
        try:
            ev = next(self._parser)
            if ev is None and self._phase in _HAGGLING:
                self._check_flood(_TIGHT_SLACK)
            return ev
        except StopIteration:
            self._parser = None
            return None
        except ProtocolError as exc:
            self._fail(exc)
            raise
        except Exception as exc:  # a bug: still honour "ProtocolError only"
            err = LocalProtocolError(f"internal error in the NBD core: {exc!r}")
            self._fail(err)
            raise err from exc

    def next_events(self, limit: int) -> list[Event]:
        """Up to ``limit`` (>= 1) events: those :meth:`next_event` would
        return one by one, in the same order, stopping where it would
        return ``None`` (an empty list then).

        The transmission phase's batch interface (issue 6): every request
        already buffered that takes the hot path is parsed in one loop,
        without a call per request.  In transmission, fewer than ``limit``
        events means that :meth:`next_event` would now return ``None``
        (more input is needed, or the connection has ended), so the caller
        need not ask again before the next receive.  Before transmission it
        returns at most one event, since handshake events need an answer
        before parsing goes on.

        Raises:
            RemoteProtocolError, LocalProtocolError: as :meth:`next_event`
                (events parsed before the error are lost with the
                connection).
        """
        if self._phase is not _TRANSMISSION or self._parser is None:
            ev = self.next_event()
            return [] if ev is None else [ev]
        out: list[Event] = []
        r = self._reader
        while True:
            if self._idle:
                try:
                    self._fast_requests(out, limit - len(out))
                except ProtocolError as exc:
                    self._fail(exc)
                    raise
                except Exception as exc:  # as in next_event()
                    err = LocalProtocolError(f"internal error in the NBD core: {exc!r}")
                    self._fail(err)
                    raise err from exc
                if len(out) >= limit or (r._pos == len(r._buf) and not r._eof):
                    # Full, or nothing buffered: the generator would only
                    # yield None from the top of its loop.
                    return out
            ev = self.next_event()
            if ev is None:
                return out
            out.append(ev)
            if len(out) >= limit or self._phase is not _TRANSMISSION:
                return out

    # --- output ---------------------------------------------------------------

    @property
    def queued_output(self) -> int:
        """How many buffers are queued for the client (what
        :meth:`data_to_send` would return): the adapter stops reading a
        client that does not read its replies once this grows (a flood of
        refused or empty requests is answered without any backend call)."""
        return len(self._out)

    def data_to_send(self) -> list[Buffer]:
        """Take everything queued for the client, in order.

        Items are small header ``bytes`` and payload buffers exactly as given
        to ``reply_read`` (never joined).  Send them in one vectored write.
        Returns ``[]`` when nothing is queued.
        """
        out, self._out = self._out, []
        return out

    # --- the parser -----------------------------------------------------------

    def _parse(self) -> Parser:
        """The whole protocol as one generator: client flags, options,
        requests.  Yields events, or ``None`` when it cannot go on yet."""
        r = self._reader
        # The flags usually arrive before the parser first runs (and often
        # with the first option): no sub-generators then.
        fields = r.unpack_now(CLIENT_FLAGS)
        if fields is None:
            if (yield from r.at_clean_eof()):
                self._set_phase(_CLOSED)
                yield EndOfStream()
                return
            fields = CLIENT_FLAGS.unpack((yield from r.read_exact(4, "the client flags")))
        (cflags,) = fields
        unknown = cflags & ~_KNOWN_CLIENT_FLAGS
        if unknown:
            # proto.md: "the server MUST drop the TCP connection if the
            # client sets an unknown flag".
            raise RemoteProtocolError(f"client flags {cflags:#x} include unknown bits {unknown:#x}")
        if not cflags & _C_FIXED_NEWSTYLE and self._tls_mode is TlsMode.REQUIRED:
            raise RemoteProtocolError(
                "client did not set NBD_FLAG_C_FIXED_NEWSTYLE, so it cannot "
                "negotiate the TLS this server requires"
            )
        self._client_fixed = bool(cflags & _C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(cflags & _C_NO_ZEROES)
        self._set_phase(Phase.OPTIONS)
        while True:
            outcome = yield from self._option()
            if outcome is Outcome.END:
                return
            if outcome is Outcome.TRANSMISSION:
                break
        assert self._export is not None
        yield HandshakeComplete(
            self._export, self._flags, self._structured, self._extended, self._meta_selected
        )
        yield from self._transmission()

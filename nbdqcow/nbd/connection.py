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
3. drains :meth:`next_event` until it returns ``None``, acting on each event;
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

Errors
------
For any input the core either proceeds or raises
:class:`~nbdqcow.nbd.errors.RemoteProtocolError` (the adapter hard-disconnects,
after optionally sending what is queued).  Misuse of the API raises
:class:`~nbdqcow.nbd.errors.LocalProtocolError`.  After either, the phase is
:attr:`Phase.ERROR`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass

from nbdqcow.backends.base import Buffer, Extent
from nbdqcow.nbd import replies
from nbdqcow.nbd.answers import ExportInfo, ExportListing, ReadRun
from nbdqcow.nbd.constants import (
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    REQUEST_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    InfoType,
    Option,
    OptionReply,
    TransmissionFlag,
)
from nbdqcow.nbd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from nbdqcow.nbd.events import (
    Aborted,
    BlockStatus,
    Cache,
    Disconnect,
    EndOfStream,
    Event,
    ExportListRequested,
    ExportRequested,
    Flush,
    HandshakeComplete,
    HandshakeEvent,
    MetaContext,
    MetaContextRequested,
    Read,
    RequestRejected,
    StartTLS,
    Terminated,
    Trim,
    Write,
    WriteZeroes,
)
from nbdqcow.nbd.meta import descriptors, match_queries, status_function
from nbdqcow.nbd.options import (
    OptionInvalid,
    decode_string,
    encode_message,
    info_replies,
    meta_context_reply,
    parse_info_request,
    parse_meta_request,
    server_reply,
)
from nbdqcow.nbd.reader import ByteReader
from nbdqcow.nbd.settings import ProtocolLimits, TlsMode
from nbdqcow.nbd.validate import ExportState, Rejection, payload_length, validate_request
from nbdqcow.nbd.wire import (
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    EXTENDED_REQUEST,
    OPTION_HEADER,
    REQUEST,
    ZEROES_124,
    pack_greeting,
    pack_option_reply,
)

__all__ = ["TRANSITIONS", "Allocator", "Phase", "ServerConnection"]

#: Returns a writable buffer of exactly ``nbytes`` bytes for a WRITE payload.
Allocator = Callable[[int], memoryview]


class Phase(enum.Enum):
    """Where the connection is.  Transitions are listed in :data:`TRANSITIONS`."""

    #: Greeting queued; waiting for the 32-bit client flags.
    CLIENT_FLAGS = "client-flags"
    #: Option haggling.
    OPTIONS = "options"
    #: STARTTLS acknowledged; waiting for ``tls_established()``.
    TLS_HANDSHAKE = "tls-handshake"
    #: Requests and replies.
    TRANSMISSION = "transmission"
    #: Ended normally (ABORT, DISC, EOF, a refused EXPORT_NAME).
    CLOSED = "closed"
    #: A ProtocolError was raised.
    ERROR = "error"


#: The legal phase changes (ERROR is reachable from anywhere).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.CLIENT_FLAGS: frozenset({Phase.OPTIONS, Phase.CLOSED}),
    Phase.OPTIONS: frozenset({Phase.TLS_HANDSHAKE, Phase.TRANSMISSION, Phase.CLOSED}),
    Phase.TLS_HANDSHAKE: frozenset({Phase.OPTIONS, Phase.CLOSED}),
    Phase.TRANSMISSION: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
    Phase.ERROR: frozenset(),
}

# A plain int: "~" on an IntFlag would only invert the *known* bits.
_KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)

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


class _Outcome(enum.Enum):
    """What the handshake does after an option."""

    CONTINUE = "continue"
    TRANSMISSION = "transmission"
    END = "end"
    TERMINATE = "terminate"


@dataclass(slots=True)
class _Request:
    """An emitted request awaiting its reply."""

    command: int
    flags: int
    offset: int
    length: int


Parser = Generator[Event | None, None, None]


def _option_name(option: int) -> str:
    try:
        return f"NBD_OPT_{Option(option).name}"
    except ValueError:
        return f"option {option}"


def _command_name(command: int) -> str:
    try:
        return f"NBD_CMD_{Command(command).name}"
    except ValueError:
        return f"command {command}"


def _default_allocate(nbytes: int) -> memoryview:
    return memoryview(bytearray(nbytes))


class ServerConnection:
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
        self._limits = limits or ProtocolLimits()
        self._tls_mode = TlsMode(tls)
        self._allocate = allocate or _default_allocate
        self._reader = ByteReader()
        self._out: list[Buffer] = [
            pack_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        ]
        self._phase = Phase.CLIENT_FLAGS
        self._error: ProtocolError | None = None
        self._no_zeroes = False
        self._options = 0
        self._tls_active = False
        self._structured = False
        self._extended = False
        self._meta_export: str | None = None
        self._meta_selected: tuple[MetaContext, ...] = ()
        self._pending: HandshakeEvent | None = None
        self._outcome = _Outcome.CONTINUE
        self._terminate_reason = ""
        self._export: ExportInfo | None = None
        self._flags = TransmissionFlag(0)
        self._state: ExportState | None = None
        self._inflight: dict[int, list[_Request]] = {}
        self._n_inflight = 0
        self._reply_mode: replies.ReplyMode | None = None
        self._shutdown = False
        self._parser: Parser | None = self._parse()

    # --- state ----------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The current :class:`Phase`."""
        return self._phase

    @property
    def tls_active(self) -> bool:
        """True once ``tls_established()`` was called."""
        return self._tls_active

    @property
    def tls_mode(self) -> TlsMode:
        return self._tls_mode

    @property
    def structured_replies(self) -> bool:
        """Structured replies (or extended headers) are negotiated."""
        return self._structured

    @property
    def extended_headers(self) -> bool:
        """Extended headers are negotiated."""
        return self._extended

    @property
    def export(self) -> ExportInfo | None:
        """The export in use once transmission has started."""
        return self._export

    @property
    def transmission_flags(self) -> TransmissionFlag:
        """The flags sent for :attr:`export` (0 before transmission)."""
        return self._flags

    @property
    def meta_contexts(self) -> tuple[MetaContext, ...]:
        """Contexts selected with SET_META_CONTEXT (for the GO export)."""
        return self._meta_selected

    @property
    def in_flight(self) -> int:
        """Transmission requests emitted and not yet replied to."""
        return self._n_inflight

    @property
    def shutting_down(self) -> bool:
        """``shutdown()`` was called."""
        return self._shutdown

    @property
    def pending(self) -> HandshakeEvent | None:
        """The handshake event awaiting the application's answer, if any."""
        return self._pending

    def _set_phase(self, phase: Phase) -> None:
        if phase is not self._phase and phase not in TRANSITIONS[self._phase]:
            raise LocalProtocolError(f"internal error: phase {self._phase.name} -> {phase.name}")
        self._phase = phase

    def _fail(self, exc: ProtocolError) -> None:
        self._phase = Phase.ERROR
        self._error = exc
        self._parser = None

    # --- input ----------------------------------------------------------------

    def _check_input(self) -> bool:
        """False when input is to be ignored (the session has ended)."""
        if self._phase is Phase.ERROR:
            raise LocalProtocolError(f"the connection has already failed: {self._error}")
        if self._phase is Phase.TLS_HANDSHAKE:
            raise LocalProtocolError("input during the TLS handshake: call tls_established() first")
        return self._phase is not Phase.CLOSED

    def _check_flood(self) -> None:
        # During the handshake a client MUST wait for each option's final
        # reply, so at most one option can legitimately be buffered; more is
        # a flood that would otherwise grow the buffer without bound.
        if self._phase in (Phase.CLIENT_FLAGS, Phase.OPTIONS):
            bound = OPTION_HEADER.size + self._limits.max_option_length + 64 * 1024
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
        self._check_flood()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should be written
        (:meth:`asyncio.BufferedProtocol.get_buffer`).

        While a WRITE payload is being received this is the unfilled tail of
        the application's payload buffer (zero copy); otherwise a region of
        an internal buffer.  Write into it, then call :meth:`buffer_updated`
        before calling anything else on the connection.
        """
        if self._phase is Phase.ERROR:
            raise LocalProtocolError(f"the connection has already failed: {self._error}")
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last
        :meth:`get_buffer` view (:meth:`asyncio.BufferedProtocol.buffer_updated`).
        Use ``receive_data(b"")`` for EOF."""
        self._reader.buffer_updated(nbytes)
        if self._phase is Phase.CLOSED:
            self._reader.discard()
            return
        if self._phase is Phase.TLS_HANDSHAKE and nbytes > 0:
            raise LocalProtocolError("input during the TLS handshake: call tls_established() first")
        self._check_flood()

    def next_event(self) -> Event | None:
        """Parse the next event, or return ``None``.

        ``None`` means more input is needed, a handshake event awaits its
        answer, the TLS handshake is due, or the connection has ended.

        Raises:
            RemoteProtocolError: the client broke the protocol; hard-disconnect.
            LocalProtocolError: the connection is already in ERROR.
        """
        if self._phase is Phase.ERROR:
            raise LocalProtocolError(f"the connection has already failed: {self._error}")
        if self._parser is None:
            return None
        try:
            return next(self._parser)
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

    # --- output ---------------------------------------------------------------

    def data_to_send(self) -> list[Buffer]:
        """Take everything queued for the client, in order.

        Items are small header ``bytes`` and payload buffers exactly as given
        to ``reply_read`` (never joined).  Send them in one vectored write.
        Returns ``[]`` when nothing is queued.
        """
        out, self._out = self._out, []
        return out

    def _option_reply(self, option: int, reply: OptionReply, data: bytes = b"") -> None:
        self._out.append(pack_option_reply(option, reply, data))

    def _option_error(self, option: int, reply: OptionReply, message: str) -> None:
        self._option_reply(option, reply, encode_message(message))

    # --- the parser -----------------------------------------------------------

    def _parse(self) -> Parser:
        """The whole protocol as one generator: client flags, options,
        requests.  Yields events, or ``None`` when it cannot go on yet."""
        r = self._reader
        if (yield from r.at_clean_eof()):
            self._set_phase(Phase.CLOSED)
            yield EndOfStream()
            return
        (cflags,) = CLIENT_FLAGS.unpack((yield from r.read_exact(4, "the client flags")))
        unknown = cflags & ~_KNOWN_CLIENT_FLAGS
        if unknown:
            # proto.md: "the server MUST drop the TCP connection if the
            # client sets an unknown flag".
            raise RemoteProtocolError(f"client flags {cflags:#x} include unknown bits {unknown:#x}")
        if not cflags & ClientFlag.FIXED_NEWSTYLE and self._tls_mode is TlsMode.REQUIRED:
            raise RemoteProtocolError(
                "client did not set NBD_FLAG_C_FIXED_NEWSTYLE, so it cannot "
                "negotiate the TLS this server requires"
            )
        self._no_zeroes = bool(cflags & ClientFlag.NO_ZEROES)
        self._set_phase(Phase.OPTIONS)
        while True:
            outcome = yield from self._option()
            if outcome is _Outcome.END:
                return
            if outcome is _Outcome.TRANSMISSION:
                break
        assert self._export is not None
        yield HandshakeComplete(
            self._export, self._flags, self._structured, self._extended, self._meta_selected
        )
        yield from self._transmission()

    def _end(self, event: Event) -> Generator[Event | None, None, _Outcome]:
        self._set_phase(Phase.CLOSED)
        yield event
        return _Outcome.END

    def _option(self) -> Generator[Event | None, None, _Outcome]:
        r = self._reader
        if (yield from r.at_clean_eof()):
            return (yield from self._end(EndOfStream()))
        raw = yield from r.read_exact(OPTION_HEADER.size, "an option header")
        magic, option, length = OPTION_HEADER.unpack(raw)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(
                f"bad option magic {magic:#x} (expected IHAVEOPT {IHAVEOPT:#x})"
            )
        name = _option_name(option)
        self._options += 1
        if self._options > self._limits.max_options:
            raise RemoteProtocolError(
                f"too many options: {name} is option number {self._options}, "
                f"the limit is {self._limits.max_options}"
            )
        if length > self._limits.max_option_length:
            raise RemoteProtocolError(
                f"{name} length {length} exceeds the limit of "
                f"{self._limits.max_option_length} bytes"
            )
        data = yield from r.read_exact(length, f"{name} data")

        if option == Option.ABORT:
            # "The server MUST reply with NBD_REP_ACK", shutdown or not.
            self._option_reply(option, OptionReply.ACK)
            return (yield from self._end(Aborted()))
        if self._shutdown:
            if option == Option.EXPORT_NAME:
                return (yield from self._end(Terminated("the server is shutting down")))
            self._option_error(option, OptionReply.ERR_SHUTDOWN, "the server is shutting down")
            return _Outcome.CONTINUE
        if (
            self._tls_mode is TlsMode.REQUIRED
            and not self._tls_active
            and option != Option.STARTTLS
        ):
            if option == Option.EXPORT_NAME:
                return (
                    yield from self._end(
                        Terminated("NBD_OPT_EXPORT_NAME without TLS, which this server requires")
                    )
                )
            self._option_error(
                option, OptionReply.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first"
            )
            return _Outcome.CONTINUE

        if option == Option.EXPORT_NAME:
            return (yield from self._opt_export_name(data))
        if option in (Option.INFO, Option.GO):
            return (yield from self._opt_info(option, data))
        if option == Option.LIST:
            if data:
                self._option_error(
                    option, OptionReply.ERR_INVALID, f"{name} takes no data, got {len(data)} bytes"
                )
                return _Outcome.CONTINUE
            return (yield from self._ask(ExportListRequested()))
        if option == Option.STARTTLS:
            return (yield from self._opt_starttls(data))
        if option == Option.STRUCTURED_REPLY:
            self._opt_structured(data)
            return _Outcome.CONTINUE
        if option == Option.EXTENDED_HEADERS:
            self._opt_extended(data)
            return _Outcome.CONTINUE
        if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            return (yield from self._opt_meta(option, data))
        # "reply NBD_REP_ERR_UNSUP to unknown options and keep parsing".
        self._option_error(option, OptionReply.ERR_UNSUP, f"{name} is not supported")
        return _Outcome.CONTINUE

    def _ask(self, event: HandshakeEvent) -> Generator[Event | None, None, _Outcome]:
        """Emit a decision event and wait for the application's answer."""
        self._pending = event
        self._outcome = _Outcome.CONTINUE
        yield event
        while self._pending is not None:
            yield None
        if self._outcome is _Outcome.TERMINATE:
            return (yield from self._end(Terminated(self._terminate_reason)))
        return self._outcome

    def _opt_export_name(self, data: bytes) -> Generator[Event | None, None, _Outcome]:
        if self._extended:
            raise RemoteProtocolError(
                "NBD_OPT_EXPORT_NAME after extended headers were negotiated "
                "(the client MUST use NBD_OPT_GO)"
            )
        try:
            name = decode_string(data, "NBD_OPT_EXPORT_NAME export name")
        except OptionInvalid as e:
            # This option cannot be answered with an error.
            raise RemoteProtocolError(str(e)) from None
        return (yield from self._ask(ExportRequested(Option.EXPORT_NAME, name)))

    def _opt_info(self, option: int, data: bytes) -> Generator[Event | None, None, _Outcome]:
        try:
            name, requests = parse_info_request(data, _option_name(option))
        except OptionInvalid as e:
            self._option_error(option, OptionReply.ERR_INVALID, str(e))
            return _Outcome.CONTINUE
        return (yield from self._ask(ExportRequested(Option(option), name, requests)))

    def _opt_starttls(self, data: bytes) -> Generator[Event | None, None, _Outcome]:
        opt = Option.STARTTLS
        if self._tls_mode is TlsMode.OFF:
            self._option_error(opt, OptionReply.ERR_POLICY, "TLS is not enabled on this server")
            return _Outcome.CONTINUE
        if self._tls_active:
            self._option_error(opt, OptionReply.ERR_INVALID, "TLS is already active")
            return _Outcome.CONTINUE
        if data:
            self._option_error(
                opt,
                OptionReply.ERR_INVALID,
                f"NBD_OPT_STARTTLS takes no data, got {len(data)} bytes",
            )
            return _Outcome.CONTINUE
        if self._reader.buffered:
            # Whatever follows the ACK is TLS; bytes already here were sent
            # before the client could have seen the ACK.
            raise RemoteProtocolError(
                f"{self._reader.buffered} bytes sent after NBD_OPT_STARTTLS before its reply"
            )
        self._option_reply(opt, OptionReply.ACK)
        self._set_phase(Phase.TLS_HANDSHAKE)
        yield StartTLS()
        while self._phase is Phase.TLS_HANDSHAKE:
            yield None
        return _Outcome.CONTINUE

    def _opt_structured(self, data: bytes) -> None:
        opt = Option.STRUCTURED_REPLY
        if not self._limits.structured_replies:
            self._option_error(opt, OptionReply.ERR_UNSUP, "structured replies are disabled")
        elif data:
            self._option_error(
                opt,
                OptionReply.ERR_INVALID,
                f"NBD_OPT_STRUCTURED_REPLY takes no data, got {len(data)} bytes",
            )
        elif self._extended:
            self._option_error(
                opt, OptionReply.ERR_INVALID, "extended headers are already negotiated"
            )
        else:
            self._structured = True
            self._option_reply(opt, OptionReply.ACK)

    def _opt_extended(self, data: bytes) -> None:
        opt = Option.EXTENDED_HEADERS
        if not (self._limits.extended_headers and self._limits.structured_replies):
            self._option_error(opt, OptionReply.ERR_UNSUP, "extended headers are disabled")
        elif data:
            self._option_error(
                opt,
                OptionReply.ERR_INVALID,
                f"NBD_OPT_EXTENDED_HEADERS takes no data, got {len(data)} bytes",
            )
        else:
            self._extended = self._structured = True
            self._option_reply(opt, OptionReply.ACK)

    def _opt_meta(self, option: int, data: bytes) -> Generator[Event | None, None, _Outcome]:
        name = _option_name(option)
        if option == Option.SET_META_CONTEXT:
            # "replaces all previously-set metadata contexts", also on failure.
            self._meta_export, self._meta_selected = None, ()
        if not self._structured:
            self._option_error(
                option, OptionReply.ERR_INVALID, f"{name} needs NBD_OPT_STRUCTURED_REPLY first"
            )
            return _Outcome.CONTINUE
        try:
            export_name, queries = parse_meta_request(data, name)
        except OptionInvalid as e:
            self._option_error(option, OptionReply.ERR_INVALID, str(e))
            return _Outcome.CONTINUE
        return (yield from self._ask(MetaContextRequested(Option(option), export_name, queries)))

    def _transmission(self) -> Parser:
        r = self._reader
        ext = self._extended
        header = EXTENDED_REQUEST if ext else REQUEST
        size = header.size
        expected = EXTENDED_REQUEST_MAGIC if ext else REQUEST_MAGIC
        state = self._state
        assert state is not None
        mode = replies.ReplyMode(self._structured, ext)
        drain_limit = max(state.max_payload, self._limits.max_write_drain)
        inflight = self._inflight
        while True:
            # Fast path: a whole header is usually buffered already.
            raw = r.take_now(size)
            if raw is None:
                if (yield from r.at_clean_eof()):
                    self._set_phase(Phase.CLOSED)
                    yield EndOfStream()
                    return
                raw = yield from r.read_exact(size, "a request header")
            magic, flags, command, cookie, offset, length = header.unpack(raw)
            if magic != expected:
                raise RemoteProtocolError(f"bad request magic {magic:#x} (expected {expected:#x})")
            if command == _DISC:
                self._set_phase(Phase.CLOSED)
                yield Disconnect()
                return
            payload = payload_length(command, flags, length, ext)
            if payload > drain_limit:
                raise RemoteProtocolError(
                    f"{_command_name(command)} payload of {payload} bytes exceeds the "
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
                    yield from r.skip(payload, f"the payload of a refused {_command_name(command)}")
                self._out += replies.error(mode, cookie, offset, rej.errno, rej.message)
                yield RequestRejected(cookie, command, rej.errno, rej.message)
                continue
            cflags = _FLAG_OBJECTS[flags]
            ev: Event
            if command == _WRITE:
                buf = self._payload_buffer(payload)
                yield from r.read_into(buf, f"the payload of {_command_name(command)}")
                ev = Write(cookie, cflags, offset, buf)
            elif command == _FLUSH:
                ev = Flush(cookie, cflags)
            else:
                ev = _RANGE_EVENTS[command](cookie, cflags, offset, length)
            queue = inflight.get(cookie)
            if queue is None:
                inflight[cookie] = [_Request(command, flags, offset, length)]
            else:
                queue.append(_Request(command, flags, offset, length))
            self._n_inflight += 1
            yield ev

    def _payload_buffer(self, nbytes: int) -> memoryview:
        buf = self._allocate(nbytes)
        if not isinstance(buf, memoryview) or buf.readonly or buf.nbytes != nbytes:
            raise LocalProtocolError(
                f"allocate({nbytes}) must return a writable memoryview of {nbytes} bytes"
            )
        return buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")

    # --- handshake decisions --------------------------------------------------

    def _take_pending(self, event: HandshakeEvent) -> None:
        if self._phase is Phase.ERROR:
            raise LocalProtocolError(f"the connection has already failed: {self._error}")
        if self._pending is None or event is not self._pending:
            raise LocalProtocolError(f"{type(event).__name__} is not the pending handshake event")
        self._pending = None

    def _enter_transmission(self, name: str, export: ExportInfo) -> None:
        self._flags = export.transmission_flags(self._structured)
        if self._meta_export != name:
            # Contexts chosen for another export do not apply to this one.
            self._meta_selected = ()
        self._export = export
        self._state = ExportState(
            size=export.size,
            flags=int(self._flags),
            min_block=export.caps.min_block,
            max_payload=export.caps.max_block,
            structured=self._structured,
            extended=self._extended,
            meta_contexts=len(self._meta_selected),
        )
        self._set_phase(Phase.TRANSMISSION)
        self._outcome = _Outcome.TRANSMISSION

    def accept_export(
        self, event: ExportRequested | MetaContextRequested, export: ExportInfo
    ) -> None:
        """Answer an export lookup with the export the client meant.

        * INFO: queues ``NBD_REP_INFO`` replies and ``ACK``; options go on.
        * GO: the same, then transmission starts (:class:`HandshakeComplete`
          is the next event).
        * EXPORT_NAME: queues size, flags and (unless ``NO_ZEROES``) 124
          zero bytes; transmission starts.
        * LIST/SET_META_CONTEXT: the core matches the queries against
          ``export.contexts`` and queues ``NBD_REP_META_CONTEXT`` replies and
          ``ACK``.

        For INFO/GO the core itself may answer ``ERR_BLOCK_SIZE_REQD``
        instead (see :attr:`ExportInfo.require_block_size`).

        Raises:
            LocalProtocolError: ``event`` is not the pending handshake event.
        """
        self._take_pending(event)
        opt = event.option
        if isinstance(event, MetaContextRequested):
            offered = export.contexts
            names = match_queries(event.queries, offered, listing=not event.is_set)
            if event.is_set:
                self._meta_selected = tuple(MetaContext(offered.index(n) + 1, n) for n in names)
                self._meta_export = event.export_name
                for c in self._meta_selected:
                    self._out.append(meta_context_reply(opt, c.id, c.name))
            else:
                # "The metadata context ID in these replies is reserved and
                # SHOULD be set to zero".
                for n in names:
                    self._out.append(meta_context_reply(opt, 0, n))
            self._option_reply(opt, OptionReply.ACK)
            return
        if opt is Option.EXPORT_NAME:
            self._enter_transmission(event.name, export)
            self._out.append(EXPORT_NAME_REPLY.pack(export.size, self._flags))
            if not self._no_zeroes:
                self._out.append(ZEROES_124)
            return
        if export.needs_block_size and InfoType.BLOCK_SIZE not in event.info_requests:
            self._option_error(
                opt,
                OptionReply.ERR_BLOCK_SIZE_REQD,
                f"export {export.name!r} needs {export.caps.min_block}-byte aligned "
                "requests: request NBD_INFO_BLOCK_SIZE",
            )
            return
        flags = export.transmission_flags(self._structured)
        self._out += info_replies(opt, export, event.info_requests, flags)
        self._option_reply(opt, OptionReply.ACK)
        if opt is Option.GO:
            self._enter_transmission(event.name, export)

    def list_exports(self, event: ExportListRequested, exports: Iterable[ExportListing]) -> None:
        """Answer ``NBD_OPT_LIST``: one ``NBD_REP_SERVER`` per export, then ACK."""
        if not isinstance(event, ExportListRequested):
            raise LocalProtocolError(f"list_exports() cannot answer {type(event).__name__}")
        self._take_pending(event)
        for e in exports:
            self._out.append(server_reply(Option.LIST, e))
        self._option_reply(Option.LIST, OptionReply.ACK)

    def reject(
        self,
        event: HandshakeEvent,
        reply: OptionReply = OptionReply.ERR_UNKNOWN,
        message: str = "",
    ) -> None:
        """Refuse the pending handshake event with an error reply.

        ``message`` (UTF-8, truncated to 4096 bytes) is shown to the user.
        For EXPORT_NAME no reply is possible: the core emits
        :class:`Terminated` and the adapter must close.

        Raises:
            LocalProtocolError: ``reply`` is not an error, is
                ``ERR_TLS_REQD`` while TLS is active, or ``event`` is not
                pending.
        """
        reply = OptionReply(reply)
        if not reply.is_error:
            raise LocalProtocolError(f"reject() needs an error reply, not {reply.name}")
        if reply is OptionReply.ERR_TLS_REQD and self._tls_active:
            # proto.md: "MUST NOT send NBD_REP_ERR_TLS_REQD ... if TLS has
            # already been initiated".
            raise LocalProtocolError("ERR_TLS_REQD is forbidden once TLS is active")
        self._take_pending(event)
        if isinstance(event, ExportRequested) and event.option is Option.EXPORT_NAME:
            self._outcome = _Outcome.TERMINATE
            self._terminate_reason = (
                f"export {event.name!r} refused ({reply.name}{': ' + message if message else ''})"
            )
            return
        if isinstance(event, ExportRequested | MetaContextRequested):
            opt: int = event.option
        else:
            opt = Option.LIST
        self._option_error(opt, reply, message)

    def tls_established(self) -> None:
        """The TLS handshake after :class:`StartTLS` succeeded.  Negotiated
        state (structured replies, extended headers, meta contexts) is reset,
        as proto.md requires, and option haggling resumes over TLS."""
        if self._phase is not Phase.TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_established() in phase {self._phase.name}")
        self._tls_active = True
        # "MUST NOT preserve negotiated state across STARTTLS".
        self._structured = self._extended = False
        self._meta_export, self._meta_selected = None, ()
        self._set_phase(Phase.OPTIONS)

    def shutdown(self) -> None:
        """The server is shutting down: from now on options get
        ``ERR_SHUTDOWN`` (ABORT still gets ACK) and new requests get
        ``ESHUTDOWN`` (DISC is still honoured).  In-flight requests are the
        application's to finish or to fail with ``ESHUTDOWN``."""
        self._shutdown = True

    # --- transmission replies -------------------------------------------------

    def _peek(self, cookie: int, allowed: frozenset[int] | None, method: str) -> _Request | None:
        """The oldest in-flight request with ``cookie`` (None after ERROR:
        replies to a failed connection are dropped, it is being closed)."""
        if self._phase is Phase.ERROR:
            return None
        queue = self._inflight.get(cookie)
        if not queue:
            raise LocalProtocolError(f"{method}: no request with cookie {cookie:#x} awaits a reply")
        req = queue[0]
        if allowed is not None and req.command not in allowed:
            raise LocalProtocolError(
                f"{method} cannot answer {_command_name(req.command)} (cookie {cookie:#x})"
            )
        return req

    def _pop(self, cookie: int) -> None:
        queue = self._inflight[cookie]
        queue.pop(0)
        if not queue:
            del self._inflight[cookie]
        self._n_inflight -= 1

    def _mode(self) -> replies.ReplyMode:
        # Fixed once transmission starts; cached because it is per reply.
        mode = self._reply_mode
        if mode is None or mode != (self._structured, self._extended):
            mode = self._reply_mode = replies.ReplyMode(self._structured, self._extended)
        return mode

    def reply_ok(self, cookie: int) -> None:
        """Success without payload (WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE).

        A simple reply, or a ``NONE`` chunk with extended headers.

        Raises:
            LocalProtocolError: unknown cookie, or it is a READ/BLOCK_STATUS.
        """
        req = self._peek(cookie, _OK_COMMANDS, "reply_ok()")
        if req is None:
            return
        self._pop(cookie)
        self._out += replies.ok(self._mode(), cookie, req.offset)

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
        req = self._peek(cookie, _READ_ONLY_CMD, "reply_read()")
        if req is None:
            return
        total = replies.read_total(runs)
        if total != req.length:
            raise LocalProtocolError(
                f"reply_read(): runs total {total} bytes, the request read {req.length}"
            )
        self._pop(cookie)
        df = bool(req.flags & _DF)
        self._out += replies.read(self._mode(), cookie, req.offset, req.length, runs, df)

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
        req_one = bool(req.flags & CommandFlag.REQ_ONE)
        max_len = (1 << 63) if self._extended else 0xFFFFFFFF
        chunks: list[tuple[int, Sequence[tuple[int, int]]]] = []
        try:
            for ctx in self._meta_selected:
                descs = descriptors(
                    extents, req.offset, req.length, status_function(ctx.name), req_one, max_len
                )
                chunks.append((ctx.id, descs))
        except ValueError as e:
            raise LocalProtocolError(f"reply_block_status(): {e}") from None
        self._pop(cookie)
        self._out += replies.block_status(self._mode(), cookie, req.offset, chunks)

    def reply_error(self, cookie: int, error: Errno, message: str = "") -> None:
        """Fail a request with an NBD errno (use :func:`to_nbd_errno` for an
        ``OSError``).  With structured replies the message goes to the client
        in an ``ERROR`` chunk; with simple replies it is dropped.

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
        self._pop(cookie)
        self._out += replies.error(self._mode(), cookie, req.offset, err, message)

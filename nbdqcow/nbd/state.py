"""Connection state shared by the handshake and transmission halves of
:class:`~nbdqcow.nbd.ServerConnection`: phases and their legal transitions
(as data, in the style of h11's ``_state.py``), negotiated settings, the
in-flight table, and the small helpers both halves use.

Rule: a phase changes only through :meth:`ConnectionState._set_phase`, which
checks :data:`TRANSITIONS`; ERROR is entered only by ``_fail``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator
from typing import Any

from nbdqcow.backends.base import Buffer
from nbdqcow.nbd import replies
from nbdqcow.nbd.answers import ExportInfo
from nbdqcow.nbd.constants import Command, HandshakeFlag, Option, OptionReply, TransmissionFlag
from nbdqcow.nbd.errors import LocalProtocolError, ProtocolError
from nbdqcow.nbd.events import Event, HandshakeEvent, MetaContext
from nbdqcow.nbd.options import encode_message, option_name
from nbdqcow.nbd.reader import ByteReader
from nbdqcow.nbd.settings import ProtocolLimits, TlsMode
from nbdqcow.nbd.validate import ExportState
from nbdqcow.nbd.wire import pack_greeting, pack_option_reply

__all__ = [
    "TRANSITIONS",
    "Allocator",
    "ConnectionState",
    "InFlight",
    "Outcome",
    "Parser",
    "Phase",
    "command_name",
    "option_name",
]

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

    # Members are singletons compared by identity: hash them by identity
    # too.  Enum's own __hash__ is a Python function (hash of the name),
    # and _set_phase looks a phase up in TRANSITIONS a few times per
    # connection (issue 6: the handshake path).
    __hash__ = object.__hash__


#: The legal phase changes (ERROR is reachable from anywhere).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.CLIENT_FLAGS: frozenset({Phase.OPTIONS, Phase.CLOSED}),
    Phase.OPTIONS: frozenset({Phase.TLS_HANDSHAKE, Phase.TRANSMISSION, Phase.CLOSED}),
    Phase.TLS_HANDSHAKE: frozenset({Phase.OPTIONS, Phase.CLOSED}),
    Phase.TRANSMISSION: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
    Phase.ERROR: frozenset(),
}


class Outcome(enum.Enum):
    """What the handshake does after an option."""

    CONTINUE = "continue"
    TRANSMISSION = "transmission"
    END = "end"
    TERMINATE = "terminate"


#: An emitted request awaiting its reply: ``(command, flags, offset,
#: length)``.  A plain tuple because one is made per request: it costs a few
#: nanoseconds where a slotted dataclass costs about 200 (measured).
InFlight = tuple[int, int, int, int]


Parser = Generator[Event | None, None, None]


# Names of the known options and commands, built once: an enum lookup and
# an f-string per option cost more than the rest of a handshake option.
# (option_name is in nbdqcow.nbd.options, which needs it too.)
_COMMAND_NAMES = {int(c): f"NBD_CMD_{c.name}" for c in Command}


def command_name(command: int) -> str:
    return _COMMAND_NAMES.get(command) or f"command {command}"


#: The greeting every connection starts with (proto.md "Fixed newstyle
#: negotiation"), packed once.
_GREETING = pack_greeting(int(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
_NO_FLAGS = TransmissionFlag(0)
#: ``NBD_REP_ACK`` for each known option, packed once.
_ACKS = {int(o): pack_option_reply(o, OptionReply.ACK) for o in Option}


def _default_allocate(nbytes: int) -> memoryview:
    return memoryview(bytearray(nbytes))


class ConnectionState:
    """The state of one connection, and accessors for the application."""

    #: Why the handshake was terminated; set only then.  A class default, not
    #: set in ``__init__`` (issue 6): CPython 3.11 keeps an instance's
    #: attributes in its inline values, which the specialized ``self._x``
    #: loads read directly, only while the class's shared keys number fewer
    #: than 30; at 30 every attribute access of the core became a dict
    #: lookup.  Callgrind, the pump's read path in process: QD1 46.5k ->
    #: 45.5k instructions per request.  tests/nbd/test_core_attributes.py
    #: keeps the count under the limit.
    _terminate_reason = ""

    def __init__(
        self,
        *,
        limits: ProtocolLimits | None = None,
        tls: TlsMode | str = TlsMode.OFF,
        allocate: Allocator | None = None,
    ) -> None:
        self._limits = limits or ProtocolLimits()
        self._tls_mode = tls if type(tls) is TlsMode else TlsMode(tls)
        self._allocate = allocate or _default_allocate
        self._reader = ByteReader()
        self._out: list[Buffer] = [_GREETING]
        self._phase = Phase.CLIENT_FLAGS
        self._error: ProtocolError | None = None
        self._no_zeroes = False
        # The client set NBD_FLAG_C_FIXED_NEWSTYLE (without it: NOTLS mode).
        self._client_fixed = True
        self._options = 0
        self._tls_active = False
        self._structured = False
        self._extended = False
        self._meta_export: str | None = None
        self._meta_selected: tuple[MetaContext, ...] = ()
        self._pending: HandshakeEvent | None = None
        self._outcome = Outcome.CONTINUE
        self._export: ExportInfo | None = None
        self._flags = _NO_FLAGS
        self._state: ExportState | None = None
        # cookie -> the oldest in-flight request with that cookie; clients
        # SHOULD use distinct cookies, so later duplicates wait (in order) in
        # _inflight_dups and the common path handles no lists at all.
        self._inflight: dict[int, InFlight] = {}
        self._inflight_dups: dict[int, list[InFlight]] = {}
        self._n_inflight = 0
        self._reply_mode: replies.ReplyMode | None = None
        self._shutdown = False
        self._parser: Parser | None = None
        #: the transmission parser is suspended at the top of its loop, so
        #: the next request may be parsed outside it (_fast_requests)
        self._idle = False
        #: the hot path's facts, set when transmission starts
        self._fast: tuple[Any, ...] = ()
        #: the reply mode as 0 simple, 1 structured, 2 extended, set with _fast
        self._reply_kind = 0

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
        # Replies to requests still in flight are dropped from now on (the
        # reply fast paths find nothing and fall back to _peek, which says so).
        self._inflight.clear()
        self._inflight_dups.clear()

    def _option_reply(self, option: int, reply: OptionReply, data: bytes = b"") -> None:
        self._out.append(pack_option_reply(option, reply, data))

    def _ack(self, option: int) -> None:
        """Queue ``NBD_REP_ACK`` for ``option`` (prebuilt for known options)."""
        self._out.append(_ACKS.get(option) or pack_option_reply(option, OptionReply.ACK))

    def _option_error(self, option: int, reply: OptionReply, message: str) -> None:
        self._option_reply(option, reply, encode_message(message))

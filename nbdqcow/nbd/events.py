"""Events the NBD core hands to the application (ARCHITECTURE.md section 8.3).

Every event is a frozen, slotted dataclass.  Events come out of
:meth:`ServerConnection.next_event` in wire order.  They fall in three groups:

* **Handshake decisions** (:class:`ExportRequested`,
  :class:`ExportListRequested`, :class:`MetaContextRequested`): the core
  stops parsing until the application answers with ``accept_export``,
  ``list_exports`` or ``reject``.  Everything that needs no server policy
  (client flags, ``STRUCTURED_REPLY``, ``EXTENDED_HEADERS``, ``ABORT``,
  unknown options, limits) is handled inside the core and never surfaces.
* **Transmission requests** (:class:`Read`, :class:`Write`, :class:`Flush`,
  :class:`Trim`, :class:`WriteZeroes`, :class:`Cache`,
  :class:`BlockStatus`): already validated against the export
  (:mod:`nbdqcow.nbd.validate`); each needs exactly one ``reply_*`` call
  with its cookie, in any order.
* **Notices** (:class:`StartTLS`, :class:`HandshakeComplete`,
  :class:`RequestRejected`, and the ends :class:`Aborted`,
  :class:`Disconnect`, :class:`Terminated`, :class:`EndOfStream`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbdqcow.nbd.answers import ExportInfo
from nbdqcow.nbd.constants import Command, CommandFlag, Errno, Option, TransmissionFlag

__all__ = [
    "Aborted",
    "BlockStatus",
    "Cache",
    "CommandEvent",
    "Disconnect",
    "EndOfStream",
    "Event",
    "ExportListRequested",
    "ExportRequested",
    "Flush",
    "HandshakeComplete",
    "HandshakeEvent",
    "MetaContext",
    "MetaContextRequested",
    "Read",
    "RequestRejected",
    "StartTLS",
    "Terminated",
    "Trim",
    "Write",
    "WriteZeroes",
    "new_read",
    "new_write",
    "read_setters",
    "write_setters",
]


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every event."""


# --- handshake ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeEvent(Event):
    """An option the application must answer before the core reads on."""


@dataclass(frozen=True, slots=True)
class ExportRequested(HandshakeEvent):
    """``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_INFO`` or ``NBD_OPT_GO``.

    Answer with ``accept_export(event, ExportInfo)`` or
    ``reject(event, OptionReply.ERR_UNKNOWN, "no export 'x'")`` (or
    ``ERR_POLICY``, ``ERR_TLS_REQD`` for a TLS-only export, ...).  Rejecting
    ``EXPORT_NAME`` cannot be signalled to the client: the core then emits
    :class:`Terminated` and the adapter must close.

    Attributes:
        option: which of the three options it was.
        name: the export name, ``""`` for the default export.
        info_requests: the ``NBD_INFO_*`` types the client asked for, in its
            order, unknown ones included (the core ignores those); always
            empty for ``EXPORT_NAME``.
    """

    option: Option
    name: str
    info_requests: tuple[int, ...] = ()

    @property
    def enters_transmission(self) -> bool:
        """True for GO and EXPORT_NAME: accepting it ends the handshake."""
        return self.option is not Option.INFO


@dataclass(frozen=True, slots=True)
class ExportListRequested(HandshakeEvent):
    """``NBD_OPT_LIST``: answer ``list_exports(event, listings)`` or
    ``reject(event, OptionReply.ERR_POLICY, ...)``."""


@dataclass(frozen=True, slots=True)
class MetaContextRequested(HandshakeEvent):
    """``NBD_OPT_LIST_META_CONTEXT`` or ``NBD_OPT_SET_META_CONTEXT``.

    The core only needs to know which export is meant: answer
    ``accept_export(event, ExportInfo)`` (its ``meta_contexts`` say what the
    export offers) or ``reject(event, OptionReply.ERR_UNKNOWN, ...)``.  Query
    matching (``base:`` wildcards, unknown namespaces ignored), context ids and
    remembering the selection for ``GO`` are the core's job.

    Attributes:
        option: LIST_META_CONTEXT or SET_META_CONTEXT.
        export_name: the export the contexts are for.
        queries: the query strings, in the client's order (may be empty).
    """

    option: Option
    export_name: str
    queries: tuple[str, ...] = ()

    @property
    def is_set(self) -> bool:
        return self.option is Option.SET_META_CONTEXT


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """``NBD_OPT_STARTTLS`` was accepted and its ``NBD_REP_ACK`` queued.

    The adapter must send :meth:`data_to_send` (the ACK) in clear, then run
    the TLS server handshake on the socket, then call ``tls_established()``
    (or close the connection if the handshake failed: proto.md says the
    server MUST terminate then).  Until ``tls_established()`` the core
    accepts no input: bytes that arrive before the handshake belong to TLS.
    """


@dataclass(frozen=True, slots=True)
class MetaContext:
    """A selected metadata context: its id on the wire and its name."""

    id: int
    name: str


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """The handshake is over; transmission requests follow.

    Attributes:
        export: the ExportInfo the application accepted.
        flags: the transmission flags sent to the client.
        structured_replies: ``NBD_OPT_STRUCTURED_REPLY`` (or extended
            headers) is in effect.
        extended_headers: ``NBD_OPT_EXTENDED_HEADERS`` is in effect.
        meta_contexts: contexts selected for this export (BLOCK_STATUS is
            refused with ``EINVAL`` when empty).
    """

    export: ExportInfo
    flags: TransmissionFlag
    structured_replies: bool
    extended_headers: bool
    meta_contexts: tuple[MetaContext, ...]


@dataclass(frozen=True, slots=True)
class Aborted(Event):
    """``NBD_OPT_ABORT``: the ACK is queued; send it, then close."""


@dataclass(frozen=True, slots=True)
class Terminated(Event):
    """The server must end the session without a reply (proto.md: after an
    ``EXPORT_NAME`` it cannot satisfy).  Send what is queued, then close."""

    reason: str


@dataclass(frozen=True, slots=True)
class EndOfStream(Event):
    """The client closed its side cleanly, between two messages."""


# --- transmission ------------------------------------------------------------

# The flag tests below use plain ints: "&" on an IntFlag builds a new enum
# member each time (about 0.8 us), and these run once per request.
_FUA, _NO_HOLE, _DF = int(CommandFlag.FUA), int(CommandFlag.NO_HOLE), int(CommandFlag.DF)
_REQ_ONE, _FAST_ZERO = int(CommandFlag.REQ_ONE), int(CommandFlag.FAST_ZERO)


@dataclass(frozen=True, slots=True)
class CommandEvent(Event):
    """A validated transmission request; reply exactly once with ``cookie``.

    Attributes:
        cookie: the client's 64-bit handle, echoed in the reply.
        flags: the command flags as sent (unknown or unadvertised bits never
            get this far: such requests are rejected by the core).
    """

    cookie: int
    flags: CommandFlag

    @property
    def fua(self) -> bool:
        """``NBD_CMD_FLAG_FUA``: reply only once the effect is durable."""
        return bool(int(self.flags) & _FUA)


@dataclass(frozen=True, slots=True)
class Read(CommandEvent):
    """``NBD_CMD_READ``; answer with ``reply_read`` (or ``reply_error``)."""

    offset: int
    length: int

    @property
    def df(self) -> bool:
        """``NBD_CMD_FLAG_DF``: the core sends one content chunk whatever
        runs are given, so the application can ignore it."""
        return bool(int(self.flags) & _DF)


# A frozen dataclass's __init__ stores each field through
# object.__setattr__ (it has to get past its own __setattr__ guard), which
# makes building a Read cost about 0.8 us, a sizeable part of the per-request
# budget of issue 6.  The core builds its Reads through the slot descriptors
# instead: the very same frozen object, about twice as fast.
_new_object = object.__new__
_set_cookie = vars(CommandEvent)["cookie"].__set__
_set_flags = vars(CommandEvent)["flags"].__set__
_set_offset = vars(Read)["offset"].__set__
_set_length = vars(Read)["length"].__set__


def new_read(cookie: int, flags: CommandFlag, offset: int, length: int) -> Read:
    """``Read(cookie, flags, offset, length)``, built faster (see above)."""
    ev: Read = _new_object(Read)
    _set_cookie(ev, cookie)
    _set_flags(ev, flags)
    _set_offset(ev, offset)
    _set_length(ev, length)
    return ev


def read_setters() -> tuple[Callable[[type[Any]], Any], Callable[[CommandEvent, int], None],
                            Callable[[CommandEvent, CommandFlag], None],
                            Callable[[Read, int], None], Callable[[Read, int], None]]:
    """What :func:`new_read` calls, for a loop that builds many Reads
    without a call per event (the core's batch parser)."""
    return _new_object, _set_cookie, _set_flags, _set_offset, _set_length


@dataclass(frozen=True, slots=True)
class Write(CommandEvent):
    """``NBD_CMD_WRITE`` with its whole payload.

    ``data`` is a view of a buffer the core obtained from the connection's
    ``allocate`` callable and filled; from the moment this event is returned
    it belongs to the application (the core keeps no reference), so it can be
    handed straight to ``BlockBackend.pwritev`` and then recycled.
    """

    offset: int
    data: memoryview

    @property
    def length(self) -> int:
        return self.data.nbytes


_set_write_offset = vars(Write)["offset"].__set__
_set_write_data = vars(Write)["data"].__set__


def write_setters() -> tuple[Callable[[Write, int], None], Callable[[Write, memoryview], None]]:
    """The setters of a Write's own fields (with :func:`read_setters`'
    first three, what :func:`new_write` calls)."""
    return _set_write_offset, _set_write_data


def new_write(cookie: int, flags: CommandFlag, offset: int, data: memoryview) -> Write:
    """``Write(cookie, flags, offset, data)``, built like :func:`new_read`."""
    ev: Write = _new_object(Write)
    _set_cookie(ev, cookie)
    _set_flags(ev, flags)
    _set_write_offset(ev, offset)
    _set_write_data(ev, data)
    return ev


@dataclass(frozen=True, slots=True)
class Flush(CommandEvent):
    """``NBD_CMD_FLUSH``; ``reply_ok`` once every replied write is durable."""


@dataclass(frozen=True, slots=True)
class Trim(CommandEvent):
    """``NBD_CMD_TRIM`` (advisory discard)."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class WriteZeroes(CommandEvent):
    """``NBD_CMD_WRITE_ZEROES``."""

    offset: int
    length: int

    @property
    def may_trim(self) -> bool:
        """False when ``NBD_CMD_FLAG_NO_HOLE`` forbids punching a hole."""
        return not int(self.flags) & _NO_HOLE

    @property
    def fast(self) -> bool:
        """``NBD_CMD_FLAG_FAST_ZERO``: fail with ``ENOTSUP`` unless cheap."""
        return bool(int(self.flags) & _FAST_ZERO)


@dataclass(frozen=True, slots=True)
class Cache(CommandEvent):
    """``NBD_CMD_CACHE`` (advisory prefetch)."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockStatus(CommandEvent):
    """``NBD_CMD_BLOCK_STATUS``; answer with ``reply_block_status``."""

    offset: int
    length: int

    @property
    def req_one(self) -> bool:
        """``NBD_CMD_FLAG_REQ_ONE``: the core sends only the first extent."""
        return bool(int(self.flags) & _REQ_ONE)


@dataclass(frozen=True, slots=True)
class Disconnect(Event):
    """``NBD_CMD_DISC``: finish (reply to) in-flight requests, flush, close.
    The core parses nothing after it."""


@dataclass(frozen=True, slots=True)
class RequestRejected(Event):
    """A request failed validation; the core has already queued its error
    reply (and drained a WRITE payload).  For logging; needs no action.

    Attributes:
        cookie: the request's cookie.
        command: the raw command type (may be unknown to :class:`Command`).
        errno: the error sent.
        message: why, naming the field and value.
    """

    cookie: int
    command: int
    errno: Errno
    message: str

    @property
    def command_name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return f"command {self.command}"

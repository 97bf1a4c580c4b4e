"""The handshake half of :class:`~nbdqcow.nbd.ServerConnection`: option
haggling in fixed newstyle (proto.md "Fixed newstyle negotiation",
"Option types", "TLS support", "Metadata querying"; ``NBD_OPT_INFO``/``GO``
and ``NBD_OPT_EXTENDED_HEADERS`` from their extensions).  This module parses
the options and answers those the core decides alone; the application's
answers to handshake events (``accept_export``, ``list_exports``,
``reject``, ...) are :mod:`nbdqcow.nbd.decisions`, whose
:class:`~nbdqcow.nbd.decisions.DecisionsMixin` :class:`HandshakeMixin`
derives from.

The option parser is a sub-generator of the connection's parser: it yields
events (or ``None`` while waiting for input or an answer) and returns an
:class:`~nbdqcow.nbd.state.Outcome`.

Cost (issue 6: the handshake rate).  A client waits for each option's
reply, so an option is almost always wholly buffered when the parser runs:
it is taken with :meth:`~nbdqcow.nbd.reader.ByteReader.unpack_now` /
``take_now`` (no sub-generators), the option is named only for messages,
dispatch compares plain ints, ACKs and the greeting are prebuilt, GO's data
is parsed with a few ``struct`` calls (:func:`parse_info_request`), the
transmission flags are computed once on ints, and the reader's staging
buffer starts at 4 KiB.  The whole core side of libnbd's handshake
(greeting, client flags + STRUCTURED_REPLY, GO, DISC: ``ServerConnection``
alone, in a loop, on the shared 2-core machine) went from 83-88 us to
47-57 us.  Then the answers to INFO/GO were memoized on the
:class:`~nbdqcow.nbd.answers.ExportInfo`
(:meth:`~nbdqcow.nbd.decisions.DecisionsMixin._go_answer`: the INFO
replies and ACK, the flags, the negotiated ``ExportState`` and ``ReplyMode``
depend only on the immutable export and a small key) and enum members are
read once at import (~0.1 us per ``Enum.MEMBER`` on Python
3.11): the same loop measured in instructions, which the shared machine's
load does not change (``valgrind --tool=callgrind``, 2000 handshakes minus
none), 263 k -> 208 k per handshake when the application keeps one
``ExportInfo`` per export (:meth:`nbdqcow.exports.Export.info`), 272 k ->
270 k when it makes a new one per client.
"""

from __future__ import annotations

from collections.abc import Generator

from nbdqcow.nbd.constants import IHAVEOPT, Option, OptionReply
from nbdqcow.nbd.decisions import DecisionsMixin
from nbdqcow.nbd.errors import RemoteProtocolError
from nbdqcow.nbd.events import (
    Aborted,
    EndOfStream,
    Event,
    ExportListRequested,
    ExportRequested,
    HandshakeEvent,
    MetaContextRequested,
    StartTLS,
    Terminated,
)
from nbdqcow.nbd.options import (
    OptionInvalid,
    decode_string,
    parse_info_request,
    parse_meta_request,
)
from nbdqcow.nbd.settings import TlsMode
from nbdqcow.nbd.state import Outcome, Phase, option_name
from nbdqcow.nbd.wire import OPTION_HEADER

__all__ = ["HandshakeMixin"]

#: Options with data, and options that take none: an oversized one gets
#: ERR_TOO_BIG or ERR_INVALID respectively, any other ERR_UNSUP.
#: (EXPORT_NAME and ABORT never get that far.)
_DATA_OPTIONS = frozenset(
    {Option.INFO, Option.GO, Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT}
)
_NO_DATA_OPTIONS = frozenset(
    {Option.LIST, Option.STARTTLS, Option.STRUCTURED_REPLY, Option.EXTENDED_HEADERS}
)

# Option numbers as plain ints and the Option member of each, for the
# dispatch in _option (issue 6: a handshake is a few options, and enum
# lookups were a visible share of its cost).
_ABORT, _EXPORT_NAME, _LIST = int(Option.ABORT), int(Option.EXPORT_NAME), int(Option.LIST)
_INFO, _GO, _STARTTLS = int(Option.INFO), int(Option.GO), int(Option.STARTTLS)
_STRUCTURED_REPLY, _EXTENDED_HEADERS = int(Option.STRUCTURED_REPLY), int(Option.EXTENDED_HEADERS)
_META_OPTIONS = (int(Option.LIST_META_CONTEXT), int(Option.SET_META_CONTEXT))
_OPTIONS = {int(o): o for o in Option}
# Enum members read once: on Python 3.11 each ``Enum.MEMBER`` lookup costs
# ~0.1 us (a descriptor call), and a handshake did a few dozen.
_OPT_STRUCTURED_REPLY, _OPT_EXTENDED_HEADERS = Option.STRUCTURED_REPLY, Option.EXTENDED_HEADERS
_CONTINUE, _END, _TERMINATE = Outcome.CONTINUE, Outcome.END, Outcome.TERMINATE
_REQUIRED = TlsMode.REQUIRED
_PHASE_CLOSED = Phase.CLOSED


class HandshakeMixin(DecisionsMixin):
    """Option haggling (the handshake decisions are :class:`DecisionsMixin`'s)."""

    def _end(self, event: Event) -> Generator[Event | None, None, Outcome]:
        self._set_phase(_PHASE_CLOSED)
        yield event
        return _END

    def _option(self) -> Generator[Event | None, None, Outcome]:
        r = self._reader
        # A client waits for each reply, so the whole option is usually
        # buffered by the time the parser runs: take it without
        # sub-generators, and name the option only for messages.
        fields = r.unpack_now(OPTION_HEADER)
        if fields is None:
            if (yield from r.at_clean_eof()):
                return (yield from self._end(EndOfStream()))
            raw = yield from r.read_exact(OPTION_HEADER.size, "an option header")
            fields = OPTION_HEADER.unpack(raw)
        magic, option, length = fields
        if magic != IHAVEOPT:
            raise RemoteProtocolError(
                f"bad option magic {magic:#x} (expected IHAVEOPT {IHAVEOPT:#x})"
            )
        self._options += 1
        if self._options > self._limits.max_options:
            raise RemoteProtocolError(
                f"too many options: {option_name(option)} is option number {self._options}, "
                f"the limit is {self._limits.max_options}"
            )
        oversized = length > self._limits.max_option_length
        if option == _ABORT:
            # "The server MUST reply with NBD_REP_ACK", shutdown or not, and
            # "SHOULD ignore any data": none is read, the session ends here.
            self._ack(option)
            return (yield from self._end(Aborted()))
        if oversized and option == _EXPORT_NAME:
            # Longer than any valid name (4096 bytes), and no error reply is
            # possible for this option: hang up without reading it.
            raise RemoteProtocolError(
                f"{option_name(option)} length {length} exceeds the limit of "
                f"{self._limits.max_option_length} bytes"
            )
        if oversized:
            # More than we buffer.  qemu-nbd 7.2 reads and answers options of
            # any length, and proto.md's baseline wants unknown options
            # answered ERR_UNSUP with parsing going on: so the data is
            # streamed away (skip() never buffers it) and the option answered
            # below, ERR_TOO_BIG for one we know ("The request ... is too
            # large to process").  The option count still bounds the total.
            yield from r.skip(length, f"{option_name(option)} data")
            data = b""
        else:
            taken = r.take_now(length)
            if taken is None:
                taken = yield from r.read_exact(length, f"{option_name(option)} data")
            data = taken

        if self._shutdown:
            if option == _EXPORT_NAME:
                return (yield from self._end(Terminated("the server is shutting down")))
            self._option_error(option, OptionReply.ERR_SHUTDOWN, "the server is shutting down")
            return Outcome.CONTINUE
        if (
            self._tls_mode is _REQUIRED
            and not self._tls_active
            and option != _STARTTLS
        ):
            if option == _EXPORT_NAME:
                return (
                    yield from self._end(
                        Terminated("NBD_OPT_EXPORT_NAME without TLS, which this server requires")
                    )
                )
            self._option_error(
                option, OptionReply.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first"
            )
            return Outcome.CONTINUE

        if oversized:
            name = option_name(option)
            if option in _NO_DATA_OPTIONS:
                # Any data makes these invalid, whatever its length (qemu-nbd
                # answers the same).
                reply, why = OptionReply.ERR_INVALID, f"{name} takes no data, got {length} bytes"
            elif option in _DATA_OPTIONS:
                reply, why = (
                    OptionReply.ERR_TOO_BIG,
                    f"{name} length {length} exceeds the limit of "
                    f"{self._limits.max_option_length} bytes",
                )
            else:
                reply, why = OptionReply.ERR_UNSUP, f"{name} is not supported"
            self._option_error(option, reply, why)
            return Outcome.CONTINUE
        if option in (_GO, _INFO):
            try:
                name, requests = parse_info_request(data, option)
            except OptionInvalid as e:
                self._option_error(option, OptionReply.ERR_INVALID, str(e))
                return _CONTINUE
            return (yield from self._ask(ExportRequested(_OPTIONS[option], name, requests)))
        if option == _STRUCTURED_REPLY:
            self._opt_structured(data)
            return _CONTINUE
        if option == _EXPORT_NAME:
            return (yield from self._opt_export_name(data))
        if option == _LIST:
            if data:
                self._option_error(
                    option,
                    OptionReply.ERR_INVALID,
                    f"{option_name(option)} takes no data, got {len(data)} bytes",
                )
                return Outcome.CONTINUE
            return (yield from self._ask(ExportListRequested()))
        if option == _STARTTLS:
            return (yield from self._opt_starttls(data))
        if option == _EXTENDED_HEADERS:
            self._opt_extended(data)
            return _CONTINUE
        if option in _META_OPTIONS:
            return (yield from self._opt_meta(option, data))
        # "reply NBD_REP_ERR_UNSUP to unknown options and keep parsing".
        self._option_error(
            option, OptionReply.ERR_UNSUP, f"{option_name(option)} is not supported"
        )
        return Outcome.CONTINUE

    def _ask(self, event: HandshakeEvent) -> Generator[Event | None, None, Outcome]:
        """Emit a decision event and wait for the application's answer."""
        self._pending = event
        self._outcome = _CONTINUE
        yield event
        while self._pending is not None:
            yield None
        if self._outcome is _TERMINATE:
            return (yield from self._end(Terminated(self._terminate_reason)))
        return self._outcome

    def _opt_export_name(self, data: bytes) -> Generator[Event | None, None, Outcome]:
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

    def _opt_starttls(self, data: bytes) -> Generator[Event | None, None, Outcome]:
        opt = Option.STARTTLS
        if self._tls_mode is TlsMode.OFF:
            self._option_error(opt, OptionReply.ERR_POLICY, "TLS is not enabled on this server")
            return Outcome.CONTINUE
        if not self._client_fixed:
            # "The server MUST operate in NOTLS mode unless the server set
            # flag NBD_FLAG_FIXED_NEWSTYLE and the client replied with
            # NBD_FLAG_C_FIXED_NEWSTYLE" (REQUIRED mode already hung up).
            self._option_error(
                opt,
                OptionReply.ERR_POLICY,
                "TLS needs fixed newstyle: the client did not set NBD_FLAG_C_FIXED_NEWSTYLE",
            )
            return Outcome.CONTINUE
        if self._tls_active:
            self._option_error(opt, OptionReply.ERR_INVALID, "TLS is already active")
            return Outcome.CONTINUE
        if data:
            self._option_error(
                opt,
                OptionReply.ERR_INVALID,
                f"NBD_OPT_STARTTLS takes no data, got {len(data)} bytes",
            )
            return Outcome.CONTINUE
        if self._reader.buffered:
            # Whatever follows the ACK is TLS; bytes already here were sent
            # before the client could have seen the ACK.
            raise RemoteProtocolError(
                f"{self._reader.buffered} bytes sent after NBD_OPT_STARTTLS before its reply"
            )
        self._ack(opt)
        self._set_phase(Phase.TLS_HANDSHAKE)
        yield StartTLS()
        while self._phase is Phase.TLS_HANDSHAKE:
            yield None
        return Outcome.CONTINUE

    def _opt_structured(self, data: bytes) -> None:
        opt = _OPT_STRUCTURED_REPLY
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
        elif self._structured:
            # proto.md lets a server fail a repeated state-changing option
            # with ERR_INVALID; qemu-nbd 7.2 does ("structured reply already
            # negotiated"), and libnbd reads that as "negotiated, sticky".
            self._option_error(
                opt, OptionReply.ERR_INVALID, "structured replies are already negotiated"
            )
        else:
            self._structured = True
            self._ack(opt)

    def _opt_extended(self, data: bytes) -> None:
        opt = _OPT_EXTENDED_HEADERS
        if not (self._limits.extended_headers and self._limits.structured_replies):
            self._option_error(opt, OptionReply.ERR_UNSUP, "extended headers are disabled")
        elif data:
            self._option_error(
                opt,
                OptionReply.ERR_INVALID,
                f"NBD_OPT_EXTENDED_HEADERS takes no data, got {len(data)} bytes",
            )
        elif self._extended:
            # A repeat, answered as qemu-nbd (8.2+) does; after structured
            # replies alone the upgrade is legal (qemu's client tries
            # EXTENDED_HEADERS first, but others may order them the other way).
            self._option_error(
                opt, OptionReply.ERR_INVALID, "extended headers are already negotiated"
            )
        else:
            self._extended = self._structured = True
            self._ack(opt)

    def _opt_meta(self, option: int, data: bytes) -> Generator[Event | None, None, Outcome]:
        name = option_name(option)
        if option == Option.SET_META_CONTEXT:
            # "replaces all previously-set metadata contexts", also on failure.
            self._meta_export, self._meta_selected = None, ()
        if not self._limits.structured_replies:
            # Like a server that predates structured replies: the option
            # family that needs them is unknown here.
            self._option_error(
                option, OptionReply.ERR_UNSUP, f"{name}: structured replies are disabled"
            )
            return Outcome.CONTINUE
        if not self._structured and option == Option.SET_META_CONTEXT:
            # SET "MUST NOT be requested unless structured replies have been
            # negotiated", the server "SHOULD send ERR_INVALID".  LIST only
            # "SHOULD NOT" be, and a server "MAY" refuse it: like qemu-nbd 7.2
            # we answer it, since listing commits the client to nothing.
            self._option_error(
                option, OptionReply.ERR_INVALID, f"{name} needs NBD_OPT_STRUCTURED_REPLY first"
            )
            return Outcome.CONTINUE
        try:
            export_name, queries = parse_meta_request(data, name)
        except OptionInvalid as e:
            self._option_error(option, OptionReply.ERR_INVALID, str(e))
            return Outcome.CONTINUE
        return (yield from self._ask(MetaContextRequested(Option(option), export_name, queries)))

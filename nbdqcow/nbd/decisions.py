"""The application's answers to handshake events, the other half of the
handshake of :class:`~nbdqcow.nbd.ServerConnection` (the option parser that
emits those events is :mod:`nbdqcow.nbd.handshake`): ``accept_export``,
``list_exports``, ``reject``, ``tls_established`` and ``shutdown``, and the
move to transmission after ``NBD_OPT_GO``/``NBD_OPT_EXPORT_NAME``.

Implements the server's replies of proto.md "Option types" (``NBD_REP_INFO``,
``NBD_REP_SERVER``, ``NBD_REP_META_CONTEXT``, the error replies and
``NBD_OPT_EXPORT_NAME``'s reply), "TLS support" (no ``NBD_REP_ERR_TLS_REQD``
once TLS is active or in NOTLS mode; no negotiated state kept across
STARTTLS), "Metadata querying" and "Block size constraints"
(``NBD_REP_ERR_BLOCK_SIZE_REQD``).

Cost (issue 6: the handshake rate; the measurements are in
:mod:`nbdqcow.nbd.handshake`): the answers to INFO/GO are memoized on the
:class:`~nbdqcow.nbd.answers.ExportInfo` (:meth:`DecisionsMixin._go_answer`:
the INFO replies and ACK, the flags, the negotiated ``ExportState`` and
``ReplyMode`` depend only on the immutable export and a small key), and enum
members are read once at import.

Split from :mod:`nbdqcow.nbd.handshake` (pure move): ``HandshakeMixin``
derives from :class:`DecisionsMixin`, so the methods are found on
``ServerConnection`` as before, through the class's cached method lookup.
"""

from __future__ import annotations

from collections.abc import Iterable

from nbdqcow.nbd import replies
from nbdqcow.nbd.answers import ExportInfo, ExportListing
from nbdqcow.nbd.constants import InfoType, Option, OptionReply, TransmissionFlag
from nbdqcow.nbd.errors import LocalProtocolError
from nbdqcow.nbd.events import (
    ExportListRequested,
    ExportRequested,
    HandshakeEvent,
    MetaContext,
    MetaContextRequested,
)
from nbdqcow.nbd.meta import match_queries
from nbdqcow.nbd.options import (
    block_size_reply,
    block_sizes,
    info_replies,
    meta_context_reply,
    server_reply,
)
from nbdqcow.nbd.settings import TlsMode
from nbdqcow.nbd.state import ConnectionState, Outcome, Phase
from nbdqcow.nbd.validate import ExportState
from nbdqcow.nbd.wire import EXPORT_NAME_REPLY, ZEROES_124, pack_option_reply

__all__ = ["DecisionsMixin"]

# Enum members read once: on Python 3.11 each ``Enum.MEMBER`` lookup costs
# ~0.1 us (a descriptor call), and a handshake did a few dozen.
_LIST = int(Option.LIST)
_OPT_GO, _OPT_EXPORT_NAME = Option.GO, Option.EXPORT_NAME
_TRANSMISSION = Outcome.TRANSMISSION
_PHASE_ERROR, _PHASE_TRANSMISSION = Phase.ERROR, Phase.TRANSMISSION
_ACK = OptionReply.ACK
_BLOCK_SIZE = int(InfoType.BLOCK_SIZE)
#: The answers of one export memoized per key (see _go_answer) at most.
_MEMO_MAX = 32
#: GO/INFO requests listing more info types than this are not memoized.
_MEMO_MAX_REQUESTS = 8


class DecisionsMixin(ConnectionState):
    """Handshake decisions: the application's answers to handshake events."""

    def _take_pending(self, event: HandshakeEvent) -> None:
        if self._phase is _PHASE_ERROR:
            raise LocalProtocolError(f"the connection has already failed: {self._error}")
        if self._pending is None or event is not self._pending:
            raise LocalProtocolError(f"{type(event).__name__} is not the pending handshake event")
        self._pending = None

    def _enter_transmission(
        self, name: str, export: ExportInfo, flags: TransmissionFlag | None = None
    ) -> None:
        structured, extended = self._structured, self._extended
        self._flags = export.transmission_flags(structured) if flags is None else flags
        if self._meta_export != name:
            # Contexts chosen for another export do not apply to this one.
            self._meta_selected = ()
        self._export = export
        # ExportState and ReplyMode are immutable: built once per export and
        # negotiated shape (the export's memo, see _go_answer).
        key = (int(self._flags), structured, extended, len(self._meta_selected))
        memo = export.memo
        entry = memo.get(key)
        if entry is None:
            minimum, _, maximum = block_sizes(export)
            entry = (
                ExportState(
                    size=export.size,
                    flags=key[0],
                    # Enforce exactly what NBD_INFO_BLOCK_SIZE advertises.
                    min_block=minimum,
                    max_payload=maximum,
                    structured=structured,
                    extended=extended,
                    meta_contexts=key[3],
                ),
                replies.ReplyMode(structured, extended),
            )
            if len(memo) < _MEMO_MAX:
                memo[key] = entry
        self._state, self._reply_mode = entry
        self._set_phase(_PHASE_TRANSMISSION)
        self._outcome = _TRANSMISSION

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
            self._ack(opt)
            return
        if opt is _OPT_EXPORT_NAME:
            self._enter_transmission(event.name, export)
            self._out.append(EXPORT_NAME_REPLY.pack(export.size, self._flags))
            if not self._no_zeroes:
                self._out.append(ZEROES_124)
            return
        requests = event.info_requests
        answer = self._go_answer(opt, export, requests)
        if answer is not None:
            # the common case: every client sends the same GO each time
            flags, out = answer
            self._out += out
            if opt is _OPT_GO:
                self._enter_transmission(event.name, export, flags)
            return
        if export.needs_block_size and _BLOCK_SIZE not in requests:
            # "A server sending an NBD_REP_ERR_BLOCK_SIZE_REQD error SHOULD
            # ensure it first sends an NBD_INFO_BLOCK_SIZE information reply
            # in order to help avoid a potentially unnecessary round trip."
            self._out.append(block_size_reply(opt, export))
            self._option_error(
                opt,
                OptionReply.ERR_BLOCK_SIZE_REQD,
                f"export {export.name!r} needs {export.caps.min_block}-byte aligned "
                "requests: request NBD_INFO_BLOCK_SIZE",
            )
            return
        flags = export.transmission_flags(self._structured)
        self._out += info_replies(opt, export, event.info_requests, flags)
        self._ack(opt)
        if opt is Option.GO:
            self._enter_transmission(event.name, export, flags)

    def _go_answer(
        self, opt: Option, export: ExportInfo, requests: tuple[int, ...]
    ) -> tuple[TransmissionFlag, tuple[bytes, ...]] | None:
        """The flags and replies (INFO replies, then ACK) accepting an
        INFO/GO for ``export``; ``None`` when the answer is an error
        (``ERR_BLOCK_SIZE_REQD``) or is not memoized.

        Issue 6 (the handshake rate): the replies depend only on the export
        (immutable), the option, structured replies and the info types
        asked for, so they are built once and kept in the export's memo;
        a client listing many info types is served without it (the key
        would be as long as its list).
        """
        if len(requests) > _MEMO_MAX_REQUESTS:
            return None
        structured = self._structured
        key = (opt, structured, requests)
        memo = export.memo
        answer: tuple[TransmissionFlag, tuple[bytes, ...]] | None = memo.get(key)
        if answer is None:
            if export.needs_block_size and _BLOCK_SIZE not in requests:
                return None
            flags = export.transmission_flags(structured)
            out = info_replies(opt, export, requests, flags)
            out.append(pack_option_reply(opt, _ACK))
            answer = (flags, tuple(out))
            if len(memo) < _MEMO_MAX:
                memo[key] = answer
        return answer

    def list_exports(self, event: ExportListRequested, exports: Iterable[ExportListing]) -> None:
        """Answer ``NBD_OPT_LIST``: one ``NBD_REP_SERVER`` per export, then ACK."""
        if not isinstance(event, ExportListRequested):
            raise LocalProtocolError(f"list_exports() cannot answer {type(event).__name__}")
        self._take_pending(event)
        for e in exports:
            self._out.append(server_reply(Option.LIST, e))
        self._ack(_LIST)

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
                ``ERR_TLS_REQD`` while TLS is active or off, or ``event`` is
                not pending.
        """
        try:
            reply = OptionReply(reply)
        except ValueError:
            raise LocalProtocolError(f"reject(): {reply} is not an option reply") from None
        if not reply.is_error:
            raise LocalProtocolError(f"reject() needs an error reply, not {reply.name}")
        if (
            reply is OptionReply.ERR_TLS_REQD
            and not self._client_fixed
            and self._tls_mode is not TlsMode.OFF
        ):
            # The connection is NOTLS only because the client lacks fixed
            # newstyle, which the application cannot see: ERR_TLS_REQD is
            # forbidden here, and ERR_POLICY says the same thing truthfully.
            reply = OptionReply.ERR_POLICY
        if reply is OptionReply.ERR_TLS_REQD and (
            self._tls_active or self._tls_mode is TlsMode.OFF
        ):
            # proto.md: "MUST NOT send NBD_REP_ERR_TLS_REQD ... if TLS has
            # already been initiated", nor at all in NOTLS mode.
            raise LocalProtocolError(
                "ERR_TLS_REQD is forbidden once TLS is active and when TLS is off"
            )
        self._take_pending(event)
        if isinstance(event, ExportRequested) and event.option is Option.EXPORT_NAME:
            self._outcome = Outcome.TERMINATE
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

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
from collections.abc import Callable, Iterable, Sequence

from nbdqcow.backends.base import Buffer, Extent
from nbdqcow.nbd.answers import ExportInfo, ExportListing, ReadRun
from nbdqcow.nbd.constants import Errno, OptionReply, TransmissionFlag
from nbdqcow.nbd.events import (
    Event,
    ExportListRequested,
    ExportRequested,
    HandshakeEvent,
    MetaContext,
    MetaContextRequested,
)
from nbdqcow.nbd.settings import ProtocolLimits, TlsMode

__all__ = ["Allocator", "Phase", "ServerConnection"]

#: Returns a writable buffer of exactly ``nbytes`` bytes for a WRITE payload.
Allocator = Callable[[int], memoryview]


class Phase(enum.Enum):
    """Where the connection is.  Transitions are listed in ``TRANSITIONS``."""

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
        raise NotImplementedError

    # --- state ----------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The current :class:`Phase`."""
        raise NotImplementedError

    @property
    def tls_active(self) -> bool:
        """True once ``tls_established()`` was called."""
        raise NotImplementedError

    @property
    def structured_replies(self) -> bool:
        """Structured replies (or extended headers) are negotiated."""
        raise NotImplementedError

    @property
    def extended_headers(self) -> bool:
        """Extended headers are negotiated."""
        raise NotImplementedError

    @property
    def export(self) -> ExportInfo | None:
        """The export in use once transmission has started."""
        raise NotImplementedError

    @property
    def transmission_flags(self) -> TransmissionFlag:
        """The flags sent for :attr:`export` (0 before transmission)."""
        raise NotImplementedError

    @property
    def meta_contexts(self) -> tuple[MetaContext, ...]:
        """Contexts selected with SET_META_CONTEXT (for the GO export)."""
        raise NotImplementedError

    @property
    def in_flight(self) -> int:
        """Transmission requests emitted and not yet replied to."""
        raise NotImplementedError

    @property
    def shutting_down(self) -> bool:
        """``shutdown()`` was called."""
        raise NotImplementedError

    # --- input ----------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes received from the client; ``b""`` means EOF.

        The bytes are copied (into the internal buffer, or straight into a
        pending WRITE payload buffer); ``data`` may be reused afterwards.

        Raises:
            LocalProtocolError: in TLS_HANDSHAKE (those bytes are TLS), after
                EOF, or in ERROR.
        """
        raise NotImplementedError

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should be written
        (:meth:`asyncio.BufferedProtocol.get_buffer`).

        While a WRITE payload is being received this is the unfilled tail of
        the application's payload buffer (zero copy); otherwise a region of
        an internal buffer.  Write into it, then call :meth:`buffer_updated`
        before calling anything else on the connection.
        """
        raise NotImplementedError

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last
        :meth:`get_buffer` view (:meth:`asyncio.BufferedProtocol.buffer_updated`).
        Use ``receive_data(b"")`` for EOF."""
        raise NotImplementedError

    def next_event(self) -> Event | None:
        """Parse the next event, or return ``None``.

        ``None`` means more input is needed, a handshake event awaits its
        answer, the TLS handshake is due, or the connection has ended.

        Raises:
            RemoteProtocolError: the client broke the protocol; hard-disconnect.
            LocalProtocolError: the connection is already in ERROR.
        """
        raise NotImplementedError

    # --- output ---------------------------------------------------------------

    def data_to_send(self) -> list[Buffer]:
        """Take everything queued for the client, in order.

        Items are small header ``bytes`` and payload buffers exactly as given
        to ``reply_read`` (never joined).  Send them in one vectored write.
        Returns ``[]`` when nothing is queued.
        """
        raise NotImplementedError

    # --- handshake decisions --------------------------------------------------

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
        raise NotImplementedError

    def list_exports(self, event: ExportListRequested, exports: Iterable[ExportListing]) -> None:
        """Answer ``NBD_OPT_LIST``: one ``NBD_REP_SERVER`` per export, then ACK."""
        raise NotImplementedError

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
        raise NotImplementedError

    def tls_established(self) -> None:
        """The TLS handshake after :class:`StartTLS` succeeded.  Negotiated
        state (structured replies, extended headers, meta contexts) is reset,
        as proto.md requires, and option haggling resumes over TLS."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """The server is shutting down: from now on options get
        ``ERR_SHUTDOWN`` (ABORT still gets ACK) and new requests get
        ``ESHUTDOWN`` (DISC is still honoured).  In-flight requests are the
        application's to finish or to fail with ``ESHUTDOWN``."""
        raise NotImplementedError

    # --- transmission replies -------------------------------------------------

    def reply_ok(self, cookie: int) -> None:
        """Success without payload (WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE).

        A simple reply, or a ``NONE`` chunk with extended headers.

        Raises:
            LocalProtocolError: unknown cookie, or it is a READ/BLOCK_STATUS.
        """
        raise NotImplementedError

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
        raise NotImplementedError

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
        raise NotImplementedError

    def reply_error(self, cookie: int, error: Errno, message: str = "") -> None:
        """Fail a request with an NBD errno (use :func:`to_nbd_errno` for an
        ``OSError``).  With structured replies the message goes to the client
        in an ``ERROR`` chunk; with simple replies it is dropped.

        Raises:
            LocalProtocolError: unknown cookie.
        """
        raise NotImplementedError

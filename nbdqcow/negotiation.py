"""The handshake phase of a connection, as the adapter sees it.

A mixin of :class:`nbdqcow.session.Session` (split out of it by concern,
issue 6): the sans-I/O core parses options and decides what the protocol
allows (``nbdqcow.nbd.handshake``); what it cannot decide alone comes here
as events -- which export a name means and whether this client may have it
(address policy, TLS requirement, per-export client limit: NBD
``proto.md`` "Option types", ``NBD_REP_ERR_POLICY``/``ERR_TLS_REQD``), the
export list, the switch to TLS after ``NBD_OPT_STARTTLS``, and the set-up
of the transmission phase once the core reports ``HandshakeComplete``
(which inline I/O and sendfile paths the backend allows).
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from nbdqcow.backends.base import Buffer, InlineIO
from nbdqcow.backends.raw import RawBackend
from nbdqcow.exports import Export
from nbdqcow.nbd import (
    Aborted,
    Disconnect,
    EndOfStream,
    Event,
    ExportListing,
    ExportListRequested,
    ExportRequested,
    HandshakeComplete,
    MetaContextRequested,
    OptionReply,
    ServerConnection,
    StartTLS,
    Terminated,
)
from nbdqcow.qcow2.image import Qcow2Image
from nbdqcow.stream import PlainStream, Stream, TlsStream

if TYPE_CHECKING:
    from nbdqcow.server import NbdServer

__all__ = ["Negotiation"]

log = logging.getLogger("nbdqcow.server")


class Negotiation:
    """Answers to the core's handshake events for a session."""

    # Provided by Session (see its __init__).
    core: ServerConnection
    server: NbdServer
    stream: Stream
    peer: str
    peer_address: object
    cid: int
    export: Export | None
    in_transmission: bool
    tls: bool
    tls_ctx: ssl.SSLContext | None
    _try_read: Callable[[int, Sequence[memoryview]], bool] | None
    _try_write: Callable[[int, Sequence[Buffer], bool], bool] | None
    _sendfile_fd: int | None
    _sendfile_qcow2: Qcow2Image | None

    if TYPE_CHECKING:  # implemented by Session
        async def flush(self) -> None: ...

    async def _negotiate(self, ev: Event) -> str | None:
        """Act on a handshake event (or the end of the connection); return
        a reason when the connection must end."""
        core = self.core
        if isinstance(ev, ExportRequested | MetaContextRequested):
            self._answer_export(ev)
            return None
        if isinstance(ev, ExportListRequested):
            core.list_exports(ev, [ExportListing(e.name, e.description)
                                   for e in self.server.catalog
                                   if e.allows(self.peer_address)])
            return None
        if isinstance(ev, StartTLS):
            await self._start_tls()
            return None
        if isinstance(ev, HandshakeComplete):
            self.in_transmission = True
            if self.export is None:  # EXPORT_NAME path sets it too; be safe
                self.export = self.server.catalog.lookup(ev.export.name)
            backend = self.export.backend if self.export is not None else None
            # Duck-typed: isinstance() against a runtime-checkable Protocol
            # walks its attributes, ~15 us per connection (issue 6 handshakes).
            inline = getattr(backend, "try_preadv", None)
            if inline is not None and backend is not None:
                typed: InlineIO = backend  # type: ignore[assignment]
                self._try_read = typed.try_preadv
                if not backend.caps.read_only:
                    self._try_write = typed.try_pwritev
            if isinstance(self.stream, PlainStream) and not core.tls_active:
                if isinstance(backend, RawBackend):
                    self._sendfile_fd = backend.host_file.fd
                elif (isinstance(backend, Qcow2Image) and backend.read_only
                      and backend.engine is None):
                    # Only read-only: on a writable image a cluster may be
                    # freed and reused between the mapping and a send that
                    # waits for the socket (no engine API pins it yet).
                    self._sendfile_qcow2 = backend
            log.debug("connection %d from %s opened, serving export %r (%s%s%s)",
                      self.cid, self.peer,
                      ev.export.name,
                      "structured replies" if ev.structured_replies else "simple replies",
                      ", extended headers" if ev.extended_headers else "",
                      ", TLS" if core.tls_active else "")
            return None
        if isinstance(ev, Disconnect):
            return "client disconnected"
        if isinstance(ev, Aborted):
            return "client aborted the handshake"
        if isinstance(ev, Terminated):
            return f"refused: {ev.reason}"
        if isinstance(ev, EndOfStream):
            return "client closed the connection"
        return None

    def _answer_export(self, ev: ExportRequested | MetaContextRequested) -> None:
        """Look the export up and apply its policy (address, TLS, clients)."""
        core = self.core
        catalog = self.server.catalog
        name = ev.name if isinstance(ev, ExportRequested) else ev.export_name
        export = catalog.lookup(name)
        if export is None:
            core.reject(ev, OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
            if isinstance(ev, ExportRequested):  # not again for its meta-context query
                log.info("connection %d %s: asked for unknown export %r", self.cid, self.peer,
                         name)
        elif not export.allows(self.peer_address):
            # LIST hides it, but a client that names it is told plainly that
            # policy refuses it (NBD_REP_ERR_POLICY, as nbd-server does for
            # its authfile), not left guessing at a typo.
            core.reject(ev, OptionReply.ERR_POLICY,
                        f"export {export.name!r} is not available to this client address")
            log.info("connection %d %s: export %r refused to this address", self.cid,
                     self.peer, export.name)
        elif export.require_tls and not core.tls_active:
            if self.tls_ctx is None:  # ERR_TLS_REQD would be a lie: no TLS here
                core.reject(ev, OptionReply.ERR_POLICY,
                            f"export {export.name!r} requires TLS, which this server "
                            "does not offer")
            else:
                core.reject(ev, OptionReply.ERR_TLS_REQD,
                            f"export {export.name!r} requires TLS (NBD_OPT_STARTTLS)")
        elif (isinstance(ev, ExportRequested) and ev.enters_transmission
              and self.export is None and not catalog.enter(export)):
            core.reject(ev, OptionReply.ERR_POLICY,
                        f"export {export.name!r} already has its maximum of "
                        f"{export.max_connections} clients")
        else:
            # The export's one ExportInfo: the core memoizes its GO
            # answers on it (issue 6).
            core.accept_export(ev, export.info())
            if isinstance(ev, ExportRequested) and ev.enters_transmission:
                self.export = export

    async def _start_tls(self) -> None:
        assert self.tls_ctx is not None
        await self.flush()  # the ACK, in clear
        assert isinstance(self.stream, PlainStream)
        tls = TlsStream(self.stream.detach(), self.tls_ctx)
        self.stream = tls
        try:
            await tls.handshake()
        except OSError as e:  # ssl.SSLError is an OSError
            raise ConnectionAbortedError(
                errno.ECONNABORTED, f"TLS handshake failed: {_ssl_reason(e)}") from None
        self.core.tls_established()
        self.tls = True
        log.info("connection %d %s: TLS %s established", self.cid, self.peer, tls.version)


def _ssl_reason(e: OSError) -> str:
    reason = getattr(e, "reason", None)
    return str(reason or e.strerror or e)

"""ExportCatalog: export name -> one shared, already-open block backend.

Every connection that asks for an export gets *the same* backend object
(ARCHITECTURE.md section 8.2).  That is what makes ``NBD_FLAG_CAN_MULTI_CONN``
honest: proto.md requires that once FLUSH (or a FUA write) is answered on one
connection, the writes every other connection saw answered are durable and
visible too; with one backend object per export there is one cache and one
file descriptor, so a flush covers all of them.

Backends are opened once, before the server accepts anything, like nbdkit's
"open as late as possible" turned around: opening an image can fail (bad
header, refused backing file) and the operator must see that at start-up,
not as an error reply to the first client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from nbdqcow.backends.base import BlockBackend
from nbdqcow.nbd.answers import ExportInfo

__all__ = ["MAX_NAME", "Export", "ExportCatalog"]

log = logging.getLogger("nbdqcow.exports")

#: proto.md "Strings": names MUST be at most 4096 bytes of UTF-8.
MAX_NAME = 4096


@dataclass(frozen=True, slots=True)
class Export:
    """One named export.

    Attributes:
        name: the NBD export name (``""`` is a legal name of its own).
        backend: the shared backend serving every connection to it.
        description: optional text for ``NBD_OPT_LIST``/``NBD_INFO_DESCRIPTION``.
    """

    name: str
    backend: BlockBackend
    description: str = ""
    #: Refuse the export (``NBD_REP_ERR_TLS_REQD``) to clients without TLS
    #: (proto.md SELECTIVETLS: TLS-only exports on a server where TLS is
    #: optional).
    require_tls: bool = False
    #: ``allow(peer_address) -> bool``: which clients may use the export;
    #: the address is the socket's peername (a tuple for TCP, a ``str`` for
    #: a Unix socket).  ``None`` allows everyone.  Refused clients do not see
    #: the export in ``NBD_OPT_LIST`` either.
    allow: Callable[[object], bool] | None = None
    #: Clients in transmission on this export at once; ``None``: no limit
    #: besides the server's.
    max_connections: int | None = None
    #: Where the image is and its format, for status displays only.
    image: str = ""
    format: str | None = None
    #: the last :meth:`info` (a list: the dataclass is frozen)
    _info: list[ExportInfo] = field(default_factory=list, init=False, repr=False,
                                    compare=False)

    def allows(self, peer_address: object) -> bool:
        return self.allow is None or self.allow(peer_address)

    def info(self) -> ExportInfo:
        """What the protocol core needs to negotiate this export.

        The same object for every client while the backend's size and
        capabilities stay what they were, because the core memoizes its
        answers on it (:attr:`ExportInfo.memo`: the GO replies and the
        negotiated export state are built once, not per handshake -- issue
        6, ~58 k fewer instructions per libnbd handshake in the core).  A
        new size (a raw file grown under the server) makes a new one.
        """
        b = self.backend
        size, caps = b.size, b.caps
        cached = self._info
        if cached:
            info = cached[0]
            if info.size == size and info.caps is caps:
                return info
        info = ExportInfo(name=self.name, size=size, caps=caps, description=self.description)
        cached[:] = (info,)
        return info


class ExportCatalog:
    """The exports one server offers, looked up by name.

    The empty name is special only when no export is literally called ``""``:
    it then selects the *default* export (the first one added, or the one
    added with ``default=True``), which is what clients that do not care
    about names (``nbd://host``, the kernel's ``nbd-client host``) send.
    """

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}
        self._default: str | None = None
        self._closed = False
        self._users: dict[str, int] = {}
        # Exports taken out by a reload: no new client finds them, but the
        # clients already on them keep their backend until they leave, so it
        # is flushed and closed only when the catalog closes.
        self._retired: list[Export] = []
        #: Called with the name of a removed export once its last client has
        #: left (e.g. to drop its metrics series); not for exports still offered.
        self.on_retired_idle: Callable[[str], None] | None = None

    def add(
        self,
        name: str,
        backend: BlockBackend,
        *,
        description: str = "",
        default: bool = False,
        require_tls: bool = False,
        allow: Callable[[object], bool] | None = None,
        max_connections: int | None = None,
        image: str = "",
        format: str | None = None,
    ) -> Export:
        """Register ``backend`` as export ``name`` (policy fields: see :class:`Export`).

        Raises:
            ValueError: the name is too long, has a NUL, or is taken.
        """
        if "\0" in name:
            raise ValueError(f"export name {name!r} contains a NUL character")
        if len(name.encode("utf-8")) > MAX_NAME:
            raise ValueError(f"export name is longer than {MAX_NAME} bytes")
        if len(description.encode("utf-8")) > MAX_NAME:
            raise ValueError(f"description of export {name!r} is longer than {MAX_NAME} bytes")
        if name in self._exports:
            raise ValueError(f"export {name!r} is defined twice")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"export {name!r}: max_connections must be at least 1")
        export = Export(name, backend, description, require_tls, allow, max_connections,
                        image, format)
        self._exports[name] = export
        if default or self._default is None:
            self._default = name
        return export

    def remove(self, name: str, *, replaced: bool = False) -> Export | None:
        """Stop offering export ``name`` to new clients (SIGHUP reload).

        Clients already in transmission keep using it; its backend is flushed
        and closed with the catalog.  The default export moves to the first
        remaining one if it was this.  ``replaced``: an export of the same name
        is added next, synchronously (a changed export), so the name stays
        the default and is not gone for :attr:`on_retired_idle`.  Returns the export, or ``None``.
        """
        export = self._exports.pop(name, None)
        if export is None:
            return None
        self._retired.append(export)
        if not replaced and self.users(export) == 0 and self.on_retired_idle is not None:
            self.on_retired_idle(name)
        if self._default == name and not replaced:
            self._default = next(iter(self._exports), None)
        return export

    def lookup(self, name: str) -> Export | None:
        """The export a client asking for ``name`` gets, or ``None``."""
        export = self._exports.get(name)
        if export is None and name == "" and self._default is not None:
            export = self._exports[self._default]
        return export

    def enter(self, export: Export) -> bool:
        """Count a client entering transmission on ``export``; ``False`` (and
        no count) if the export's ``max_connections`` is reached."""
        n = self._users.get(export.name, 0)
        if export.max_connections is not None and n >= export.max_connections:
            return False
        self._users[export.name] = n + 1
        return True

    def leave(self, export: Export) -> None:
        """The client counted by :meth:`enter` is gone."""
        n = self._users[export.name] = max(0, self._users.get(export.name, 0) - 1)
        if n == 0 and self.on_retired_idle is not None and export.name not in self._exports:
            self.on_retired_idle(export.name)

    def users(self, export: Export) -> int:
        return self._users.get(export.name, 0)

    @property
    def default(self) -> Export | None:
        return None if self._default is None else self._exports[self._default]

    def __iter__(self) -> Iterator[Export]:
        return iter(self._exports.values())

    def __len__(self) -> int:
        return len(self._exports)

    async def flush_all(self) -> None:
        """Flush every writable export; log (do not raise) failures so that
        one failing image does not keep the others from being flushed."""
        for export in [*self._exports.values(), *self._retired]:
            if export.backend.caps.read_only or not export.backend.caps.flush:
                continue
            try:
                await export.backend.flush()
            except Exception as exc:  # reported, not hidden: the others still flush
                log.error("export %r: flush failed: %s", export.name, exc)

    async def aclose(self) -> None:
        """Flush and close every backend (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self.flush_all()
        closed: set[int] = set()
        for export in [*self._exports.values(), *self._retired]:
            # a reload that only changed policy shares the backend
            if id(export.backend) in closed:
                continue
            closed.add(id(export.backend))
            try:
                await export.backend.aclose()
            except Exception as exc:  # shutdown must still close the rest
                log.error("export %r: close failed: %s", export.name, exc)

    async def __aenter__(self) -> ExportCatalog:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.shield(self.aclose())

"""The exports of ``nbdqcow serve``: opening their images, publishing them in
the :class:`~nbdqcow.exports.ExportCatalog` with their policy (client ACLs,
``require_tls``, per-export connection limit), and applying a SIGHUP reload
of ``--config`` (:class:`_Reloader`; the diff is
:func:`~nbdqcow.config.diff_configs`).

Export names and the error a client gets for one that is gone
(``NBD_REP_ERR_UNKNOWN``) are proto.md, "Option haggling"; the operator's
view of reload is ``docs/operations.md``.

Split from :mod:`nbdqcow.cli.serve` (pure move); the leading underscore keeps
the subcommand discovery of :mod:`nbdqcow.cli` from taking this module for a
subcommand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable

from nbdqcow.backends.base import BlockBackend
from nbdqcow.cli._usage import UsageError
from nbdqcow.config import ExportConfig, ServerConfig, client_allowed, diff_configs, load_config
from nbdqcow.errors import NbdqcowError
from nbdqcow.exports import ExportCatalog
from nbdqcow.server import open_image

__all__: list[str] = []

#: The serve command's logger (its lines keep the name they had in serve.py).
log = logging.getLogger("nbdqcow.serve")

_Opened = list[tuple[ExportConfig, BlockBackend]]


def _same_image(a: ExportConfig, b: ExportConfig) -> bool:
    return (a.image, a.format, a.read_only, a.snapshot) == (b.image, b.format, b.read_only,
                                                            b.snapshot)


async def _open_all(exports: tuple[ExportConfig, ...],
                    reuse: Callable[[ExportConfig], BlockBackend | None]) -> _Opened:
    """Open every export's image (or reuse an open one); all or nothing."""
    opened: _Opened = []
    fresh: list[BlockBackend] = []
    try:
        for e in exports:
            backend = reuse(e)
            if backend is None:
                backend = await open_image(e.image, fmt=e.format, read_only=e.read_only,
                                           snapshot=e.snapshot)
                fresh.append(backend)
            opened.append((e, backend))
    except BaseException:
        for b in fresh:
            with contextlib.suppress(Exception):
                await b.aclose()
        raise
    return opened


def _publish(catalog: ExportCatalog, e: ExportConfig, backend: BlockBackend) -> None:
    # No ACL callable when it would allow everyone: keeps the lookup cheap.
    allow = None
    if e.allow is not None or not e.allow_unix:
        allow = functools.partial(client_allowed, e)
    try:
        catalog.add(e.name, backend, description=e.description, require_tls=e.require_tls,
                    allow=allow, max_connections=e.max_connections, image=e.image,
                    format=e.format)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class _Reloader:
    """SIGHUP: re-read ``--config`` and apply the export changes.

    New exports appear; removed ones leave the catalog (new clients get
    ``NBD_REP_ERR_UNKNOWN``) while connected clients keep their backend until
    they leave; changed ones are replaced, so clients connecting afterwards get
    the new policy.  An image whose path, format, read-only flag and snapshot
    are unchanged keeps its open backend (two engines on one qcow2 file would
    corrupt it).  A config that does not load, or an image that does not open,
    leaves everything as it was and is logged as one line.  ``[server]``
    settings (listeners, TLS, limits, admin) need a restart; that is logged.
    """

    def __init__(self, path: str, cfg: ServerConfig, catalog: ExportCatalog,
                 opened: _Opened) -> None:
        self.path = path
        self.cfg = cfg
        self.catalog = catalog
        self.backends = {e.name: (e, b) for e, b in opened}
        self.task: asyncio.Task[None] | None = None

    def on_sighup(self) -> None:
        if self.task is not None and not self.task.done():
            log.warning("SIGHUP: a reload is still running; ignored")
            return
        self.task = asyncio.create_task(self.reload())

    def _reuse(self, e: ExportConfig) -> BlockBackend | None:
        old = self.backends.get(e.name)
        if old is not None and _same_image(old[0], e):
            return old[1]
        for oe, ob in self.backends.values():  # renamed export, same image
            if _same_image(oe, e):
                return ob
        return None

    async def reload(self) -> None:
        try:
            new = load_config(self.path)
            diff = diff_configs(self.cfg, new)
            todo = tuple(e for e in new.exports
                         if e.name in diff.added or e.name in diff.changed)
            opened = await _open_all(todo, self._reuse)
        except (NbdqcowError, OSError) as exc:
            msg = str(exc) if isinstance(exc, NbdqcowError) else f"{exc.filename}: {exc.strerror}"
            log.error("reload of %s failed, keeping the running configuration: %s",
                      self.path, msg)
            return
        for name in diff.removed:
            self.catalog.remove(name)
            self.backends.pop(name, None)
        for name in diff.changed:
            self.catalog.remove(name, replaced=True)
            self.backends.pop(name, None)
        for e, backend in opened:
            _publish(self.catalog, e, backend)
            self.backends[e.name] = (e, backend)
        self.cfg = dataclasses.replace(new, **{f: getattr(self.cfg, f) for f in
                                               ("listen", "limits", "tls", "admin",
                                                "log_format")})
        log.info("reloaded %s: %s", self.path, diff.describe())

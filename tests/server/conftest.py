"""An in-process server on a Unix socket, over a real raw image file."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from nbdqcow.backends.base import BlockBackend, Buffer, Capabilities, Extent
from nbdqcow.backends.raw import RawBackend
from nbdqcow.exports import ExportCatalog
from nbdqcow.server import NbdServer, ServerOptions

SIZE = 4 * 1024 * 1024


@functools.lru_cache(maxsize=4)
def pattern(size: int = SIZE) -> bytes:
    """Distinct content per 4 KiB block, so misplaced data is noticed."""
    return b"".join(bytes([(i * 7 + 1) & 0xFF]) * 4096 for i in range(size // 4096))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(pattern())
    return p


class Wrapped:
    """A backend that delegates to ``inner`` and lets a test intercept calls."""

    def __init__(self, inner: BlockBackend,
                 before: Callable[[str, int], object] | None = None) -> None:
        self.inner = inner
        self.before = before

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def caps(self) -> Capabilities:
        return self.inner.caps

    async def _hook(self, op: str, offset: int) -> None:
        if self.before is not None:
            r = self.before(op, offset)
            if asyncio.iscoroutine(r):
                await r

    async def preadv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        await self._hook("read", offset)
        await self.inner.preadv(offset, bufs)

    async def pwritev(self, offset: int, bufs: Sequence[Buffer], *, fua: bool = False) -> None:
        await self._hook("write", offset)
        await self.inner.pwritev(offset, bufs, fua=fua)

    async def flush(self) -> None:
        await self._hook("flush", 0)
        await self.inner.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._hook("trim", offset)
        await self.inner.trim(offset, length, fua=fua)

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fast: bool = False, fua: bool = False) -> None:
        await self._hook("zero", offset)
        await self.inner.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def cache(self, offset: int, length: int) -> None:
        await self.inner.cache(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.inner.block_status(offset, length)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Running:
    server: NbdServer
    path: str
    catalog: ExportCatalog


@pytest.fixture
def options(request: pytest.FixtureRequest) -> ServerOptions:
    """Server options; a test overrides them with
    ``@pytest.mark.parametrize("options", [ServerOptions(...)], indirect=True)``."""
    param: ServerOptions | None = getattr(request, "param", None)
    return param if param is not None else ServerOptions(handshake_timeout=5, shutdown_timeout=5)


@pytest.fixture
def hook() -> list[Callable[[str, int], object] | None]:
    """Set ``hook[0]`` in a test to intercept backend calls."""
    return [None]


@contextlib.asynccontextmanager
async def serving(backend: BlockBackend, path: Path,
                  options: ServerOptions | None = None) -> AsyncIterator[Running]:
    """Serve ``backend`` as export "disk" on the Unix socket ``path`` until
    the block ends; then stop the server and close the backend."""
    catalog = ExportCatalog()
    catalog.add("disk", backend)
    server = NbdServer(catalog, options or ServerOptions(handshake_timeout=5,
                                                         shutdown_timeout=5))
    await server.listen_unix(str(path))
    task = asyncio.create_task(server.serve_forever())
    try:
        yield Running(server, str(path), catalog)
    finally:
        server.close()
        await asyncio.wait_for(task, 20)
        await catalog.aclose()


@pytest.fixture
async def running(tmp_path: Path, image: Path, options: ServerOptions,
                  hook: list[Callable[[str, int], object] | None]) -> AsyncIterator[Running]:
    backend = Wrapped(RawBackend(image, read_only=False),
                      lambda op, off: hook[0](op, off) if hook[0] else None)
    async with serving(backend, tmp_path / "nbd.sock", options) as r:
        yield r

"""TableCache (nbdqcow.qcow2.cache) on a real file."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from nbdqcow.backends.base import Buffer
from nbdqcow.errors import CorruptImage
from nbdqcow.io import HostFile
from nbdqcow.qcow2.cache import TableCache

TS = 512  # table size: 64 entries


class RecordingFile(HostFile):
    """A real HostFile that also records what it was asked to do."""

    def __init__(self, path: Path, log: list[tuple[str, int]]) -> None:
        super().__init__(path, writable=True)
        self.log = log

    async def preadv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self.log.append(("read", offset))
        return await super().preadv(offset, bufs)

    async def pwritev(self, offset: int, bufs: Sequence[Buffer]) -> None:
        self.log.append((f"write{self.path[-1]}", offset))
        await super().pwritev(offset, bufs)

    async def fdatasync(self) -> None:
        self.log.append(("sync", 0))
        await super().fdatasync()


@pytest.fixture
def tables(tmp_path: Path) -> Path:
    p = tmp_path / "t1"
    # Table k holds entries k*1000 + i, big-endian.
    p.write_bytes(b"".join(struct.pack(">64Q", *(k * 1000 + i for i in range(64)))
                           for k in range(8)))  # fmt: skip
    return p


async def test_get_decodes_and_lru_evicts(tables: Path) -> None:
    log: list[tuple[str, int]] = []
    c = TableCache(RecordingFile(tables, log), TS, 3)
    for k in range(3):
        async with c.table(k * TS) as t:
            assert t.entries[5] == k * 1000 + 5
    assert c.peek(0) is not None  # 0 is now most recent
    async with c.table(3 * TS):
        pass
    assert len(c) == 3 and c.peek(TS) is None  # table 1 was least recent
    assert c.misses == 4 and [op for op, _ in log] == ["read"] * 4


async def test_pinned_tables_are_not_evicted(tables: Path) -> None:
    c = TableCache(HostFile(tables, writable=False), TS, 2)
    a = await c.get(0)
    b = await c.get(TS)
    async with c.table(2 * TS):
        pass
    assert c.peek(0) is not None and c.peek(TS) is not None
    c.put(a)
    c.put(b)


async def test_concurrent_misses_read_once(tables: Path) -> None:
    log: list[tuple[str, int]] = []
    c = TableCache(RecordingFile(tables, log), TS, 4)
    got = await asyncio.gather(*(c.get(TS) for _ in range(5)))
    assert all(g is got[0] for g in got) and got[0].pins == 5
    assert log == [("read", TS)]


async def test_dirty_tables_written_big_endian_on_eviction_and_flush(tables: Path) -> None:
    log: list[tuple[str, int]] = []
    c = TableCache(RecordingFile(tables, log), TS, 2)
    async with c.table(0) as t:
        t.entries[0] = 0x0102030405060708
        c.mark_dirty(t)
    async with c.table(TS) as t:
        t.entries[1] = 7
        c.mark_dirty(t)
    async with c.table(2 * TS):  # evicts table 0, writing it first
        pass
    assert ("write1", 0) in log
    assert tables.read_bytes()[:8] == bytes.fromhex("0102030405060708")
    await c.flush()
    assert struct.unpack_from(">Q", tables.read_bytes(), TS + 8)[0] == 7
    assert log[-1] == ("sync", 0) and c.dirty_count == 0


async def test_dependency_flushes_the_other_cache_first(tables: Path, tmp_path: Path) -> None:
    other = tmp_path / "t2"
    other.write_bytes(tables.read_bytes())
    log: list[tuple[str, int]] = []
    l2 = TableCache(RecordingFile(tables, log), TS, 4)
    ref = TableCache(RecordingFile(other, log), TS, 4)
    async with ref.table(0) as t:
        t.entries[0] = 1
        ref.mark_dirty(t)
    async with l2.table(TS) as t:
        t.entries[0] = 2
        l2.mark_dirty(t)
    l2.set_dependency(ref)
    await l2.write_back()
    # refcount block written and synced before the L2 table.
    assert log[-3:] == [("write2", 0), ("sync", 0), ("write1", TS)]


async def test_depends_on_flush(tables: Path) -> None:
    log: list[tuple[str, int]] = []
    c = TableCache(RecordingFile(tables, log), TS, 4)
    t = await c.get_empty(4 * TS)
    assert not any(t.entries)
    c.mark_dirty(t)
    c.put(t)
    c.set_depends_on_flush()
    await c.write_back()
    assert log == [("sync", 0), ("write1", 4 * TS)]


async def test_table_beyond_eof_is_corrupt(tables: Path) -> None:
    c = TableCache(HostFile(tables, writable=False), TS, 2)
    with pytest.raises(CorruptImage, match="beyond the end"):
        await c.get(100 * TS)
    assert len(c) == 0


async def test_discard_forgets(tables: Path) -> None:
    c = TableCache(HostFile(tables, writable=False), TS, 2)
    async with c.table(0) as t:
        c.mark_dirty(t)
    c.discard(0)
    assert c.peek(0) is None and c.dirty_count == 0


async def test_the_inline_paths_view_of_the_tables_is_never_stale(tables: Path) -> None:
    """The inline read and write look tables up through ``cache.tables``
    without a call (issue 6): it must stay the very dict every operation
    changes, or they would map guest offsets with forgotten tables (review)."""
    c = TableCache(HostFile(tables, writable=True), TS, 2)
    for k in range(4):  # loads and evictions
        async with c.table(k * TS) as t:
            c.mark_dirty(t)
    await c.get_empty(5 * TS)
    c.put(c.tables[5 * TS])
    c.discard(3 * TS)
    await c.flush()
    c.clear()
    async with c.table(TS):
        pass
    assert c.tables is c._tables
    assert list(c.tables) == [TS] and c.peek(TS) is not None


async def test_miss_during_dirty_eviction_yields_one_table(tables: Path) -> None:
    """While a miss writes back a dirty victim, a second get() of the same
    table waits for the first instead of loading a second copy."""

    class SlowWrites(HostFile):
        async def pwritev(self, offset: int, bufs: Sequence[Buffer]) -> None:
            await asyncio.sleep(0)  # a write that really yields to the loop
            await super().pwritev(offset, bufs)

    c = TableCache(SlowWrites(tables, writable=True), TS, 2)
    for k in (0, 1):
        async with c.table(k * TS) as t:
            c.mark_dirty(t)
    a, b = await asyncio.gather(c.get(5 * TS), c.get(5 * TS))
    assert a is b and a.pins == 2

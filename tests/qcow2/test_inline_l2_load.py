"""The inline read's synchronous L2 load (issue 6, "randread-huge": an
image whose L2 tables overflow the cache made every miss take the async
path, 55 us of server CPU per read against 8.8 us for a cached one).

* an L1 entry the mapper refuses (unaligned, in the header, past the end of
  the file) is never loaded inline: ``try_preadv`` declines with the cache
  untouched and the async read raises the same :class:`CorruptImage`;
* a miss with a full cache evicts the clean least recently used table and
  reads qemu's bytes; the cache never grows past its capacity;
* a full cache whose least recently used table is dirty, a cache whose
  tables are all pinned, and a table an async ``get`` is loading: declines,
  nothing changes.
"""

from __future__ import annotations

import asyncio
import random
import struct
from pathlib import Path

import pytest

from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.cache import CachedTable
from nbdqcow.qcow2.image import Qcow2Image
from tests.qcow2.imagegen import KiB, MiB, create, qemu_io, to_raw


def _poke_l1(path: Path, index: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(40)
        (l1_offset,) = struct.unpack(">Q", f.read(8))
        f.seek(l1_offset + 8 * index)
        f.write(struct.pack(">Q", value))


def _snapshot(img: Qcow2Image) -> tuple[object, ...]:
    c = img.l2_cache
    return list(c._tables), c.hits, c.misses, dict(c._loading)


def _views(n: int = 4096) -> tuple[bytearray, list[memoryview]]:
    b = bytearray(b"\xa5" * n)
    return b, [memoryview(b)]


# -- hostile L1 entries ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ((1 << 63) | (1 << 12) | 0x50000, "not cluster aligned"),
        ((1 << 63) | 0x200, "not cluster aligned"),  # inside the header cluster
        ((1 << 63) | (1 << 40), "beyond the end"),
    ],
)
def test_hostile_l1_entry_is_not_loaded_inline(tmp_path: Path, entry: int, words: str) -> None:
    p = create(tmp_path / "h.qcow2", 4 * MiB)
    qemu_io(p, "write -P 0x5a 0 256k")
    _poke_l1(p, 0, entry)
    img = open_image(p)

    async def go() -> None:
        before = _snapshot(img)
        buf, views = _views()
        # What the server does: the inline read first, then the async one.
        assert not img.try_preadv(0, views)
        assert _snapshot(img) == before and buf == b"\xa5" * 4096
        assert len(img.l2_cache) == 0
        with pytest.raises(CorruptImage, match=words):
            await img.preadv(0, views)
        # Still declines (nothing was cached by the failed load).
        assert not img.try_preadv(0, views) and len(img.l2_cache) == 0
        await img.aclose()

    asyncio.run(go())


# -- eviction, capacity and data -----------------------------------------------------------


@pytest.mark.parametrize(
    "opts", ["cluster_size=4096", "cluster_size=512", "compat=0.10,cluster_size=4096"]
)
def test_misses_with_a_full_cache_load_inline_and_equal_qemu(tmp_path: Path, opts: str) -> None:
    """Random reads over an image of many L2 tables with a two-table cache:
    nearly every read misses, loads inline after evicting a clean table,
    and returns the bytes qemu reads; the cache stays at two tables."""
    p = create(tmp_path / "m.qcow2", 8 * MiB, opts)
    rng = random.Random(6)
    cmds = [f"write -P {i % 250 + 1} {i * 64 * KiB} 64k" for i in range(0, 128, 3)]
    qemu_io(p, *cmds)
    expected = to_raw(p, tmp_path / "m.raw").read_bytes()
    img = open_image(p, l2_cache_bytes=1)  # capacity: the minimum, 2 tables
    cache = img.l2_cache
    assert cache.capacity == 2
    served = 0
    try:
        for _ in range(400):
            off = rng.randrange(0, len(expected) // 512) * 512
            n = min(len(expected) - off, rng.choice([512, 4096]))
            buf, views = _views(n)
            misses = cache.misses
            if img.try_preadv(off, views):
                served += 1
                assert buf == expected[off : off + n]
            else:
                assert buf == b"\xa5" * n
            assert len(cache) <= cache.capacity
            assert cache.misses - misses <= 1
        assert served > 100 and cache.misses > 50
        assert not any(t.pins or t.dirty for t in cache._tables.values())
    finally:
        asyncio.run(img.aclose())


def test_load_now_evicts_the_clean_lru_table(tmp_path: Path) -> None:
    p = create(tmp_path / "e.qcow2", 8 * MiB, "cluster_size=4096")  # 2 MiB per L2 table
    qemu_io(p, *(f"write -P {k + 1} {k * 2 * MiB} 4k" for k in range(4)))
    img = open_image(p, l2_cache_bytes=1)
    cache = img.l2_cache

    def l2(k: int) -> int:
        return img.map.l2_table_offset(k)

    try:
        for k in (0, 1):
            buf, views = _views()
            assert img.try_preadv(k * 2 * MiB, views) and buf == bytes([k + 1]) * 4096
        assert list(cache._tables) == [l2(0), l2(1)]
        buf, views = _views()
        assert img.try_preadv(2 * 2 * MiB, views) and buf == b"\x03" * 4096
        assert list(cache._tables) == [l2(1), l2(2)] and cache.misses == 3
        # load_now on a cached table: a hit, nothing read.
        t = cache.load_now(l2(1))
        assert t is cache._tables[l2(1)] and list(cache._tables) == [l2(2), l2(1)]
        assert cache.misses == 3
    finally:
        asyncio.run(img.aclose())


# -- declines ----------------------------------------------------------------------------


def test_full_cache_with_a_dirty_lru_table_declines(tmp_path: Path) -> None:
    p = create(tmp_path / "d.qcow2", 8 * MiB, "cluster_size=4096")
    qemu_io(p, *(f"write -P {k + 1} {k * 2 * MiB} 4k" for k in range(4)))
    img = open_image(p, read_only=False, l2_cache_bytes=1)
    cache = img.l2_cache

    async def go() -> None:
        await img.pwritev(8192, [b"\x09" * 4096])  # dirties table 0
        t0 = cache.lookup(img.map.l2_table_offset(0))
        assert t0 is not None and t0.dirty
        buf, views = _views()
        assert img.try_preadv(2 * MiB, views) and buf == b"\x02" * 4096  # room: no eviction
        assert len(cache) == 2
        before = _snapshot(img)
        buf, views = _views()
        assert not img.try_preadv(2 * 2 * MiB, views)
        assert _snapshot(img) == before and buf == b"\xa5" * 4096
        assert cache.load_now(img.map.l2_table_offset(2)) is None
        # The async path writes the dirty table back and loads.
        await img.preadv(2 * 2 * MiB, views)
        assert buf == b"\x03" * 4096 and len(cache) <= 2
        await img.aclose()

    asyncio.run(go())


def test_all_pinned_declines(tmp_path: Path) -> None:
    p = create(tmp_path / "p.qcow2", 8 * MiB, "cluster_size=4096")
    qemu_io(p, *(f"write -P {k + 1} {k * 2 * MiB} 4k" for k in range(4)))
    img = open_image(p, l2_cache_bytes=1)
    cache = img.l2_cache

    async def go() -> None:
        pinned = [await cache.get(img.map.l2_table_offset(k)) for k in (0, 1)]
        before = _snapshot(img)
        buf, views = _views()
        assert not img.try_preadv(2 * 2 * MiB, views)
        assert _snapshot(img) == before and len(cache) == 2
        cache.put(pinned[0])
        # One unpinned table: it makes room.
        assert img.try_preadv(2 * 2 * MiB, views) and buf == b"\x03" * 4096
        assert list(cache._tables) == [pinned[1].offset, img.map.l2_table_offset(2)]
        cache.put(pinned[1])
        await img.aclose()

    asyncio.run(go())


def test_table_being_loaded_declines(tmp_path: Path) -> None:
    """An async ``get`` suspended in its read: the inline read of the same
    table declines (no second copy); once the load finishes it is a hit."""
    p = create(tmp_path / "l.qcow2", 4 * MiB)
    qemu_io(p, "write -P 0x33 0 256k")
    img = open_image(p)
    cache = img.l2_cache
    gate = asyncio.Event()
    real_load = cache._load

    async def slow_load(offset: int) -> CachedTable:
        await gate.wait()
        return await real_load(offset)

    cache._load = slow_load  # type: ignore[method-assign]

    async def go() -> None:
        l2 = img.map.l2_table_offset(0)
        task = asyncio.create_task(img.preadv(0, [memoryview(bytearray(4096))]))
        for _ in range(5):
            await asyncio.sleep(0)
        assert l2 in cache._loading and len(cache) == 0
        before = _snapshot(img)
        buf, views = _views()
        assert not img.try_preadv(4096, views)
        assert cache.load_now(l2) is None
        assert _snapshot(img) == before and buf == b"\xa5" * 4096
        gate.set()
        await task
        assert len(cache) == 1 and cache.misses == 1
        assert img.try_preadv(4096, views) and buf == b"\x33" * 4096
        assert len(cache) == 1 and cache.misses == 1
        await img.aclose()

    asyncio.run(go())

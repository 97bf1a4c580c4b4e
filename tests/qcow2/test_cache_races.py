"""The L2 table cache under concurrent readers, writers and flushes with
almost no room (QCOW2.md section 7: a table's changes must reach the disk).

Two races lost guest writes before they were fixed, both through a table
object that had left the cache while someone still used it:

* a task waiting for another's load of the same table (``TableCache.get``)
  pinned the loaded object even when it had been evicted, clean, before the
  waiter ran: a writer then linked new clusters into a table nobody would
  write back (first writes read back as zeroes after a clean close, their
  clusters leaked);
* ``_make_room`` removed its victim by offset after awaiting its
  write-back, so when the victim had been evicted meanwhile and its offset
  loaded again, it dropped the new object, dirty or pinned.

The last test drives real requests -- the inline read and write paths, the
locked writer, async reads and flushes -- through a two-table cache and
checks every read, the image after a clean close, and ``qemu-img check``.
"""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
from pathlib import Path

import pytest
import tools

from nbdqcow.io import HostFile
from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.cache import TableCache

TABLE = 4096


def _table_file(path: Path, tables: int) -> HostFile:
    """A file of ``tables`` tables; entry 0 of table k is 1000 + k."""
    with open(path, "wb") as f:
        for k in range(tables):
            f.write(struct.pack(">Q", 1000 + k) + bytes(TABLE - 8))
    return HostFile(str(path), writable=True)


async def _dirty_then_clean(c: TableCache, dirty: int, value: int, clean: int) -> None:
    """Fill a two-table cache: the table at ``dirty`` with entry 1 set to
    ``value`` (dirty, least recently used), then the one at ``clean``; the
    next write-back awaits a barrier (an fdatasync in a thread), so a task
    that writes the dirty one back really suspends."""
    t = await c.get(dirty)
    t.entries[1] = value
    c.mark_dirty(t)
    c.put(t)
    c.put(await c.get(clean))
    c.set_depends_on_flush()


def test_a_waiter_never_gets_a_table_evicted_before_it_ran(tmp_path: Path) -> None:
    hf = _table_file(tmp_path / "t.bin", 5)
    c = TableCache(hf, TABLE, 2)
    W, U, X, Y = 0, 1 * TABLE, 2 * TABLE, 3 * TABLE

    async def main() -> None:
        await _dirty_then_clean(c, W, 5, U)

        async def loader() -> None:
            t = await c.get(X)  # the miss: makes room (writes W back), wakes the waiter
            c.put(t)
            # Before the waiter runs, inline reads use U (a hit: X is now the
            # least recently used) and load Y, which evicts X (clean, unpinned).
            assert c.load_now(U) is not None
            assert c.load_now(Y) is not None
            assert c.lookup(X) is None

        first = asyncio.create_task(loader())
        await asyncio.sleep(0)  # the loader waits for W's barrier, X registered as loading
        waiter = asyncio.create_task(c.get(X))
        await first
        t = await waiter
        try:
            # The waiter's table is the cached one (loaded again), so what
            # it changes is written back.
            assert c.lookup(X) is t and t.pins == 1
            assert t.entries[0] == 1002
            t.entries[1] = 7
            c.mark_dirty(t)
        finally:
            c.put(t)
        await c.flush()

    asyncio.run(main())
    raw = (tmp_path / "t.bin").read_bytes()
    assert struct.unpack(">2Q", raw[X : X + 16]) == (1002, 7)
    assert struct.unpack(">2Q", raw[W : W + 16]) == (1000, 5)


def test_make_room_does_not_drop_a_reloaded_table(tmp_path: Path) -> None:
    hf = _table_file(tmp_path / "t.bin", 8)
    c = TableCache(hf, TABLE, 2)
    V, A, B, Z = 1 * TABLE, 2 * TABLE, 3 * TABLE, 4 * TABLE

    async def main() -> None:
        await _dirty_then_clean(c, V, 111, A)
        t = c.lookup(V)

        async def flush_then_inline() -> None:
            await c.write_back()  # V written, clean; the other write-back waits
            c.set_depends_on_flush()  # so that one awaits its barrier too
            assert c.load_now(Z) is not None  # evicts V (clean, LRU)
            v2 = c.load_now(V)  # V's table again: another object
            assert v2 is not None and v2 is not t
            v2.entries[2] = 222
            c.mark_dirty(v2)

        f = asyncio.create_task(flush_then_inline())
        await asyncio.sleep(0)  # f holds the write-back, in its barrier
        g = asyncio.create_task(c.get(B))  # a miss: _make_room, its victim V dirty
        await asyncio.sleep(0)
        await f
        c.put(await g)
        await c.flush()

    asyncio.run(main())
    raw = (tmp_path / "t.bin").read_bytes()[V : V + 24]
    assert struct.unpack(">3Q", raw) == (1001, 111, 222)


SIZE = 2 << 20
BLOCK = 512


@pytest.mark.parametrize(("seed", "cluster"), [(1, 512), (2, 512), (3, 4096)])
def test_concurrent_requests_through_a_two_table_cache(
    tmp_path: Path, seed: int, cluster: int
) -> None:
    path = tmp_path / "s.qcow2"
    subprocess.run([tools.require("qemu-img"), "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={cluster}", str(path), str(SIZE)], check=True)
    rng = random.Random(seed)
    model = bytearray(SIZE)
    version = [0] * (SIZE // BLOCK)
    busy = [0] * (SIZE // BLOCK)
    bad: list[tuple[str, int, int]] = []

    def pattern(off: int, n: int) -> bytes:
        out = bytearray(n)
        for k in range(0, n, BLOCK):
            blk = (off + k) // BLOCK
            out[k : k + BLOCK] = bytes([(blk * 7 + version[blk]) % 251 + 1]) * BLOCK
        return bytes(out)

    async def main() -> None:
        img = open_image(path, read_only=False, l2_cache_bytes=1)  # the minimum: 2 tables
        tasks: set[asyncio.Task[None]] = set()

        def spawn(coro: object) -> None:
            t = asyncio.ensure_future(coro)  # type: ignore[arg-type]
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        async def write(off: int, blocks: range) -> None:
            for b in blocks:
                version[b] += 1
            data = pattern(off, len(blocks) * BLOCK)
            try:
                await img.pwritev(off, [data])
            finally:
                for b in blocks:
                    busy[b] -= 1
            model[off : off + len(data)] = data

        async def read(off: int, blocks: range) -> None:
            before = [version[b] for b in blocks]
            was_busy = any(busy[b] for b in blocks)
            buf = bytearray(len(blocks) * BLOCK)
            await img.preadv(off, [memoryview(buf)])
            if not was_busy and not any(busy[b] for b in blocks) \
                    and before == [version[b] for b in blocks] \
                    and buf != model[off : off + len(buf)]:
                bad.append(("read", off, len(buf)))

        for _ in range(2500):
            for _ in range(rng.randrange(1, 6)):
                n = rng.choice([512, 512, 1024, 4096])
                off = rng.randrange(0, (SIZE - n) // BLOCK) * BLOCK
                blocks = range(off // BLOCK, (off + n) // BLOCK)
                op = rng.random()
                if op < 0.45:  # the inline read, as the server's pump calls it
                    buf = bytearray(n)
                    if img.try_preadv(off, [memoryview(buf)]) \
                            and not any(busy[b] for b in blocks) \
                            and buf != model[off : off + n]:
                        bad.append(("inline read", off, n))
                elif op < 0.65:  # a write: inline if it can, else the locked path
                    if any(busy[b] for b in blocks):
                        continue
                    for b in blocks:
                        version[b] += 1
                    data = pattern(off, n)
                    if img.try_pwritev(off, [data], False):
                        model[off : off + n] = data
                    else:
                        for b in blocks:
                            version[b] -= 1
                            busy[b] += 1
                        spawn(write(off, blocks))
                elif op < 0.85:
                    spawn(read(off, blocks))
                else:
                    spawn(img.flush())
            await asyncio.sleep(0)
            if rng.random() < 0.05:
                await asyncio.sleep(0.0005)
        await asyncio.gather(*tasks)
        await img.flush()
        await img.aclose()

    asyncio.run(main())
    assert bad == []

    async def read_back() -> bytes:
        img = open_image(path)
        buf = bytearray(SIZE)
        await img.preadv(0, [memoryview(buf)])
        await img.aclose()
        return bytes(buf)

    data = asyncio.run(read_back())
    lost = [i // BLOCK for i in range(0, SIZE, BLOCK)
            if data[i : i + BLOCK] != model[i : i + BLOCK]]
    assert lost == []
    check = subprocess.run([tools.require("qemu-img"), "check", str(path)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # no leak, no corruption

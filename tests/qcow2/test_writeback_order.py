"""Write-back ordering of the L2 cache under concurrency and failure
(QCOW2.md section 7; found by review in issue 6).

SIGKILL crash tests keep the page cache, so they cannot see a table written
before its refcounts were *durable*.  These tests log every file operation
instead, hold ``fdatasync`` calls open, and build the image an adversarial
disk may keep after a power cut: everything before the last completed sync,
plus any L2 table writes issued after it.  ``qemu-img check`` must find no
corruption in it (leaks are allowed).

* Two write-backs at once (a lock-free reader evicting a dirty table while
  FLUSH writes back) must not let the second write tables while the first
  one's barrier sync is still in flight.
* A dependency flush that fails (refcount block write error) must stay owed:
  the next eviction writes the refcounts before the table.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.image import Qcow2Image
from tests.qcow2.powercut import record, replay
from tests.tools import require

MiB = 1 << 20
#: guest bytes covered by one L2 table of a 64 KiB-cluster image
L2_SPAN = 512 * MiB
OFFSET_MASK = (1 << 56) - 512


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Path]:
    require("qemu-img")
    path = tmp_path / "i.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k",
                    str(path), "2G"], check=True)
    yield path


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)


async def _three_tables(img: Qcow2Image) -> list[int]:
    """Three L2 tables on disk, everything durable; return their offsets."""
    for i in range(3):
        await img.pwritev(i * L2_SPAN, [b"\xaa" * 4096])
    await img.flush()
    return [img.l1[i] & OFFSET_MASK for i in range(3)]


async def test_concurrent_write_backs_keep_the_barrier(
        image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = open_image(image, read_only=False)
    tables = await _three_tables(img)
    base = tmp_path / "base.qcow2"
    shutil.copy(image, base)  # the durable state

    ops = record(monkeypatch, img.file, syncs=False)  # syncs: held_sync below
    gates: list[asyncio.Event] = []
    real_sync = img.file.fdatasync_sync

    async def held_sync() -> None:
        # "In flight" until the test opens the gate.
        ops.append(("s0", len(gates)))
        gate = asyncio.Event()
        gates.append(gate)
        me = len(gates) - 1
        await gate.wait()
        real_sync()
        ops.append(("s1", me))

    monkeypatch.setattr(img.file, "fdatasync", held_sync)
    cache = img.l2_cache
    cache.capacity = 2
    cache._tables.pop(tables[2], None)
    # Inline allocating writes into tables 0 and 1, as the server does.
    assert img.try_pwritev(100 * MiB, [b"\x11" * 4096], False)
    assert img.try_pwritev(L2_SPAN + 100 * MiB, [b"\x22" * 4096], False)
    cache.peek(tables[1])  # table 0 becomes the LRU victim
    # A read of table 2's range misses and evicts dirty table 0 ...
    reader = asyncio.ensure_future(img.preadv(2 * L2_SPAN, [memoryview(bytearray(4096))]))
    for _ in range(20):
        await asyncio.sleep(0)
    # ... and FLUSH arrives while the reader's barrier sync is in flight.
    flush = asyncio.ensure_future(img.flush())
    for _ in range(20):
        await asyncio.sleep(0)

    # Power cut now: keep what was written before the last completed sync
    # began, plus every L2 table write since.
    done = [i for i, o in enumerate(ops) if o[0] == "s1"]
    durable_end = ops.index(("s0", ops[done[-1]][1])) if done else 0
    crash = tmp_path / "crash.qcow2"
    replay(base, [*ops[:durable_end],
                  *(o for o in ops[durable_end:] if o[0] == "w" and o[1] in tables)], crash)
    r = _check(crash)
    assert r.returncode in (0, 3), r.stdout + r.stderr  # 3: leaks only

    while not (reader.done() and flush.done()):
        for g in gates:
            g.set()
        await asyncio.sleep(0.01)
    await asyncio.gather(reader, flush)
    monkeypatch.undo()
    await img.aclose()
    assert _check(image).returncode == 0


async def test_failed_dependency_flush_stays_owed(
        image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = open_image(image, read_only=False)
    tables = await _three_tables(img)
    cache = img.l2_cache
    cache.capacity = 2
    cache._tables.pop(tables[2], None)
    assert img.try_pwritev(100 * MiB, [b"\x11" * 4096], False)  # table 0 dirty
    cache.peek(tables[1])
    engine = img.engine
    assert engine is not None
    refblock = engine.meta.rc.table[0]
    real_pwrite = img.file.pwrite_sync

    def failing(off: int, data: Any) -> None:
        if off == refblock:
            raise OSError(28, "injected ENOSPC writing the refcount block")
        real_pwrite(off, data)

    monkeypatch.setattr(img.file, "pwrite_sync", failing)
    with pytest.raises(OSError):  # the reader's eviction fails
        await img.preadv(2 * L2_SPAN, [memoryview(bytearray(4096))])
    monkeypatch.undo()
    # The next eviction of table 0 must write the refcounts first.
    cache._tables.pop(tables[1], None)
    cache.capacity = 1
    await img.preadv(L2_SPAN, [memoryview(bytearray(4096))])
    # What a process kill leaves: the file as the page cache holds it.
    crash = tmp_path / "crash.qcow2"
    shutil.copy(image, crash)
    r = _check(crash)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    await img.aclose()


@pytest.mark.parametrize("kind", ["fresh", "cow"])
async def test_failed_data_write_leaks_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A data write that fails after its clusters were allocated gives them
    back: ``fresh`` takes the lock-free path, ``cow`` (a partial cluster over
    a backing file) the locked one."""
    require("qemu-img")
    path = tmp_path / "i.qcow2"
    args = ["-o", "cluster_size=64k"]
    if kind == "cow":
        base = tmp_path / "base.raw"
        base.write_bytes(b"\x5a" * (4 * MiB))
        args += ["-b", str(base), "-F", "raw"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(path), "64M"],
                   check=True)
    img = open_image(path, read_only=False)
    await img.pwritev(0, [b"\x01" * 4096])  # the first L2 table exists, cached
    await img.flush()
    fd = img.file.fd
    real_pwritev = os.pwritev
    armed = [True]

    def failing(fd_: int, bufs: Sequence[Any], off: int, *a: Any) -> int:
        if fd_ == fd and armed[0]:
            armed[0] = False
            raise OSError(28, "injected ENOSPC")
        return real_pwritev(fd_, bufs, off, *a)

    monkeypatch.setattr(os, "pwritev", failing)
    with pytest.raises(OSError):
        await img.pwritev(1 * MiB + 512, [b"\x02" * 4096])
    monkeypatch.undo()
    await img.pwritev(2 * MiB, [b"\x03" * 4096])  # the engine carries on
    await img.aclose()
    r = _check(path)
    assert r.returncode == 0, r.stdout + r.stderr  # no corruption and no leak

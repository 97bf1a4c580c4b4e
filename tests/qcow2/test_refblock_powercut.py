"""Power cuts around new refcount blocks (QCOW2.md section 7, rules 1 and 2).

A new refcount block is created in memory; the block is written at the
next refcount flush and its reftable entry only after a sync that follows
(``Refcounts._new_block``, ``Metadata.write_refcounts``; issue 6: the
engine used to sync on the event loop's thread the moment a block was
needed).  This test logs every write, truncate and sync of the image file
during a run that creates several blocks, with inline and locked writes,
L2 evictions and flushes, and then rebuilds what a disk may hold after a
power cut at each sync: everything written before the sync, plus any of
three subsets of the writes issued between it and the next sync (all of
them, all but the refcount block writes, only the block writes).
``qemu-img check`` must find no corruption in any of them (leaks are
allowed).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from nbdqcow.qcow2 import open_image
from tests.tools import require

MiB = 1 << 20
CS = 4096
#: Guest range written: 8 L2 tables of a 4 KiB-cluster image, so that the
#: 6-table cache evicts now and then, not at every write (each eviction of
#: a dirty table is a sync, and every sync is a cut point to check).
GUEST = 16 * MiB


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)


async def test_power_cut_at_every_sync_around_new_refcount_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require("qemu-img")
    path = tmp_path / "i.qcow2"
    # 4 KiB clusters with 64-bit counts: one refcount block covers 512
    # clusters (2 MiB of host space), so a few thousand writes need several.
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "cluster_size=4k,refcount_bits=64", str(path), "64M"], check=True)
    base = tmp_path / "base.qcow2"
    shutil.copy(path, base)
    img = open_image(path, read_only=False)
    engine = img.engine
    assert engine is not None
    rc = engine.meta.rc
    blocks_before = set(rc.block_offsets)
    fd = img.file.fd
    ops: list[tuple[Any, ...]] = []
    real_pwritev, real_ftruncate = os.pwritev, os.ftruncate
    real_sync = img.file._fdatasync_raw

    def pwritev(fd_: int, bufs: Sequence[Any], off: int, *a: Any) -> int:
        n = real_pwritev(fd_, bufs, off, *a)
        if fd_ == fd:
            ops.append(("w", off, b"".join(bytes(b) for b in bufs)[:n]))
        return n

    def ftruncate(fd_: int, size: int) -> None:
        real_ftruncate(fd_, size)
        if fd_ == fd:
            ops.append(("t", size))

    def sync() -> None:
        real_sync()
        ops.append(("s",))

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    monkeypatch.setattr(img.file, "_fdatasync_raw", sync)
    img.l2_cache.capacity = 6  # evictions: the L2 cache's own barrier path
    rnd = random.Random(6)
    for i in range(2000):
        off = rnd.randrange(GUEST // CS) * CS + rnd.choice([0, 512])
        data = bytes([i % 251 + 1]) * rnd.choice([512, 4096])
        if not img.try_pwritev(off, [data], False):
            await img.pwritev(off, [data])
        if i % 400 == 399:
            await img.flush()
    await img.flush()
    monkeypatch.undo()
    new_blocks = rc.block_offsets - blocks_before
    assert len(new_blocks) >= 3, "the run must create refcount blocks"
    # Each new block's entry is written after a sync that follows the
    # block's first write (content before pointer).
    reft = rc.table_offset
    for b in new_blocks:
        ri = rc.table.index(b)
        first_block = next(k for k, o in enumerate(ops) if o[0] == "w" and o[1] == b)
        entry = next(k for k, o in enumerate(ops)
                     if o[0] == "w" and o[1] <= reft + 8 * ri < o[1] + len(o[2]))
        assert any(o[0] == "s" for o in ops[first_block:entry])
    await img.aclose()
    assert _check(path).returncode == 0

    syncs = [k for k, o in enumerate(ops) if o[0] == "s"]
    blocks = rc.block_offsets
    crash = tmp_path / "crash.qcow2"
    checked = 0
    reft_end = reft + rc.table_clusters * CS
    firsts = [next(j for j, o in enumerate(ops) if o[0] == "w" and o[1] == b)
              for b in new_blocks]
    firsts += [j for j, o in enumerate(ops) if o[0] == "w" and reft <= o[1] < reft_end]
    for n, k in enumerate(syncs):
        nxt = syncs[n + 1] if n + 1 < len(syncs) else len(ops)
        later = [o for o in ops[k + 1 : nxt] if o[0] != "s"]
        # The cuts where a new refcount block's first write or a reftable
        # entry is in flight, and every 10th of the others.
        if not any(k < j < nxt for j in firsts) and n % 10:
            continue
        subsets = {
            "all": later,
            "no refcount blocks": [o for o in later if o[0] == "t" or o[1] not in blocks],
            "only refcount blocks": [o for o in later if o[0] == "t" or o[1] in blocks],
        }
        for name, extra in subsets.items():
            shutil.copy(base, crash)
            cfd = os.open(crash, os.O_RDWR)
            try:
                for o in [*ops[:k], *extra]:
                    if o[0] == "w":
                        os.pwrite(cfd, o[2], o[1])
                    elif o[0] == "t":
                        real_ftruncate(cfd, o[1])
            finally:
                os.close(cfd)
            r = _check(crash)
            assert r.returncode in (0, 3), f"cut after sync {n} ({name}):\n{r.stdout}{r.stderr}"
            checked += 1
    assert checked >= 6

"""What one 4 KiB overwrite costs the kernel in the work directory's file
system, measured at the start of every run and printed with the machine.

Why: on Linux 6.16 to at least 6.18 (ext4 large folios, commit 7ac67301e82f0,
"ext4: enable large folio for regular file"), a small buffered overwrite
walks every buffer head of the folio it lands in, so its cost grows with
the folio's size (LKML, June 2026: "ext4: avoid tail walks for cached
large-folio writes", a fix marked for stable 6.16+).  The benchmark's
images are written by qemu-io in 1 MiB requests and warmed by 1 MiB reads,
so they sit in large folios, and every server's 4 KiB random writes pay the
walk.  Measured on the CI machine (kernel 6.18.44, ext4): 16-20 us per 4 KiB
``pwritev`` into such a file, 2.4 us into a file written 4 KiB at a time,
2 us on tmpfs; inside the server under fio, 43 us (cProfile of
``randwrite-prealloc`` on raw: 2.47 s in 57k ``pwritev`` calls).  ext4 also
serialises buffered writes to one file (the inode lock), so no server, with
any number of threads, writes such a file faster than one ``pwritev`` at a
time: the preallocated-write ratios of a run are bounded by the kernel, and
this probe puts the number beside them.  ``--workdir /dev/shm`` measures the
servers without it.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

__all__ = ["write_probe"]

_SIZE = 256 << 20
_MiB = 1 << 20
_BLOCK = 4096


def _fill(path: Path, chunk: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    data = bytes([0x5A]) * chunk
    for off in range(0, _SIZE, chunk):
        os.pwrite(fd, data, off)
    os.fsync(fd)  # clean pages, as after the harness's settle()
    return fd


def _overwrite_us(fd: int, writes: int, seed: int) -> float:
    rng = random.Random(seed)
    offsets = [rng.randrange(_SIZE // _BLOCK) * _BLOCK for _ in range(writes)]
    buf = [memoryview(bytearray(b"\xa5" * _BLOCK))]
    start = time.perf_counter()
    for off in offsets:
        os.pwritev(fd, buf, off)
    return (time.perf_counter() - start) / writes * 1e6


def write_probe(directory: Path, writes: int = 4000) -> dict[str, float]:
    """Microseconds per 4 KiB ``pwritev`` overwrite of a cached file in
    ``directory``: ``large`` for a file written and read in 1 MiB requests
    (how the benchmark's images are made and warmed), ``small`` for one
    written 4 KiB at a time."""
    out: dict[str, float] = {}
    for name, chunk in (("large", _MiB), ("small", _BLOCK)):
        path = directory / f"pagecache-probe-{name}"
        fd = _fill(path, chunk)
        try:
            if chunk == _MiB:
                view = memoryview(bytearray(_MiB))
                for off in range(0, _SIZE, _MiB):
                    os.preadv(fd, [view], off)
            out[name] = round(_overwrite_us(fd, writes, seed=len(name)), 1)
        finally:
            os.close(fd)
            path.unlink()
    return out

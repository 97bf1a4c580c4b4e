"""In-process micro-benchmark of the qcow2 engine's inline write (issue 6).

``python tests/qcow2/bench_inline.py [alloc] [prealloc]`` times
``Qcow2Image.try_pwritev`` -- the server's synchronous write path -- on
tmpfs (``/dev/shm``): 16 384 random 4 KiB writes on warm L2 tables into
a 16 GiB sparse image (``alloc``: nearly every write allocates) or a
256 MiB filled one (``prealloc``: in place), and prints the best chunk
of 1024 calls in microseconds per call, beside ``RawBackend.try_pwritev``
on a raw file given the same offsets.  ``STUB=1`` replaces ``os.pwritev``
by a stub, so that only Python is timed (the engine's own cost; the
images are then not checked).  Otherwise both images pass ``qemu-img
check``/are closed normally.  Run it with ``PYTHONPATH=<tree>`` to measure
a snapshot.  The figures in :mod:`nbdqcow.qcow2.inline_write` come from it.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from nbdqcow.backends.raw import RawBackend
from nbdqcow.qcow2 import open_image

N = 16384
CHUNK = 1024
STUB = bool(os.environ.get("STUB"))


def _best(call: Callable[[int, Sequence[memoryview], bool], bool], offs: list[int],
          view: memoryview) -> float:
    best = float("inf")
    for c in range(0, len(offs), CHUNK):
        chunk = offs[c : c + CHUNK]
        t = time.perf_counter()
        for off in chunk:
            call(off, [view], False)
        best = min(best, time.perf_counter() - t)
    return best / CHUNK * 1e6


def _stub(fd: int, bufs: Sequence[object], offset: int, flags: int = 0) -> int:
    return 4096


async def _one(kind: str, d: str) -> None:
    size = 16 << 30 if kind == "alloc" else 256 << 20
    q, r = os.path.join(d, f"{kind}.qcow2"), os.path.join(d, f"{kind}.raw")
    for path, fmt in ((q, "qcow2"), (r, "raw")):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)], check=True)
        if kind != "alloc":
            subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P 1 0 {size}", path],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    img = open_image(q, read_only=False)
    raw = RawBackend(r, read_only=False)
    view = memoryview(bytearray(b"x" * 4096))
    # Warm: every L2 table allocated (alloc) and cached.
    for off in range(0, size, 512 << 20):
        await img.pwritev(off + 7 * 65536, [view])
    for off in range(0, size, 1 << 20):
        await img.preadv(off, [memoryview(bytearray(4096))])
    rnd = random.Random(1)
    offs = [rnd.randrange(size // 4096) * 4096 for _ in range(N)]
    real = os.pwritev
    if STUB:
        os.pwritev = _stub  # type: ignore[assignment]
    try:
        a = _best(img.try_pwritev, offs, view)
        b = _best(raw.try_pwritev, offs, view)
    finally:
        os.pwritev = real
    print(f"{kind:8s} qcow2 {a:5.2f} us  raw {b:5.2f} us  (qcow2 - raw {a - b:5.2f} us)"
          f"{'  [pwritev stubbed]' if STUB else ''}")
    if STUB:
        img.close_files()
        return
    await img.aclose()
    await raw.aclose()
    subprocess.run(["qemu-img", "check", "-q", q], check=True)


async def main(which: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        for kind in which:
            await _one(kind, d)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:] or ["alloc", "prealloc"]))

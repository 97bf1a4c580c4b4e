"""In-process benchmark of the qcow2 engine (no server, no socket).

``python tests/qcow2/bench_engine.py [alloc] [prealloc] [read] [read1]``
drives ``Qcow2Image.pwritev``/``preadv`` with 32 concurrent tasks (``read1``:
one) of 4 KiB requests at random offsets over a real file made by
``qemu-img`` in a temporary directory, prints IOPS and runs ``qemu-img check``
afterwards.  ``N=20000`` sets the request count; ``PROF=1`` runs it under
cProfile and prints the top functions by own time; ``INLINE=1`` offers
every request to ``try_pwritev``/``try_preadv`` first (the server's
synchronous fast path, issue 6) and prints how many they served.  Run it
with ``PYTHONPATH=<tree>`` to measure a snapshot (an editable install
otherwise wins).  The numbers quoted in
``nbdqcow/qcow2/write.py`` come from this script.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time

from nbdqcow.qcow2 import open_image

N = int(os.environ.get("N", "20000"))
SPARSE = 16 << 30
FILLED = 1 << 30


def _make(d: str, name: str, *, prealloc: bool) -> tuple[str, int]:
    path = os.path.join(d, f"{name}.qcow2")
    size = FILLED if prealloc else SPARSE
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    if prealloc:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 1 0 {size}", path],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return path, size


async def _run(path: str, size: int, kind: str, qd: int = 32) -> None:
    img = open_image(path, read_only=kind == "read")
    rnd = random.Random(1)
    it = iter([rnd.randrange(size // 4096) * 4096 for _ in range(N)])

    inline = bool(os.environ.get("INLINE"))
    served = [0]

    async def worker() -> None:
        view = memoryview(bytearray(4096))
        for off in it:
            if kind == "read":
                if inline and img.try_preadv(off, [view]):
                    served[0] += 1
                    await asyncio.sleep(0)  # let the other tasks run, as the server would
                    continue
                await img.preadv(off, [view])
            else:
                if inline and img.try_pwritev(off, [view], False):
                    served[0] += 1
                    await asyncio.sleep(0)
                    continue
                await img.pwritev(off, [view])

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(qd)))
    if kind != "read":
        await img.flush()
    dt = time.perf_counter() - t
    await img.aclose()
    extra = f"  ({served[0]} inline)" if inline else ""
    print(f"{kind:6s} qd{qd:<3d} {os.path.basename(path)}: {N / dt:9.0f} IOPS{extra}")


async def main(which: list[str], d: str) -> None:
    filled: tuple[str, int] | None = None
    for w in which:
        if w == "alloc":
            path, size = _make(d, "alloc", prealloc=False)
            await _run(path, size, "write")
        else:
            if filled is None:
                filled = _make(d, "filled", prealloc=True)
            path, size = filled
            if w == "prealloc":
                await _run(path, size, "write")
            else:
                await _run(path, size, "read", qd=1 if w == "read1" else 32)
        subprocess.run(["qemu-img", "check", "-q", path], check=True)


if __name__ == "__main__":
    which = sys.argv[1:] or ["alloc", "prealloc", "read", "read1"]
    with tempfile.TemporaryDirectory() as d:
        if os.environ.get("PROF"):
            prof = cProfile.Profile()
            prof.runcall(asyncio.run, main(which, d))
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        else:
            asyncio.run(main(which, d))

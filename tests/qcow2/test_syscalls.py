"""Regression guard for the engine's hot paths that is not a timed test
(issue 6): the system calls made per 4 KiB request on a warm cache, counted
with ``strace`` around a child process that drives the engine directly.

* an in-place write to a COPIED cluster: one ``pwritev``;
* a 4 KiB read of an allocated cluster: one ``preadv``;
* an allocating 4 KiB write past the end of the file: one ``pwritev`` of
  the guest data only -- no zero fill, no ``fstat`` (freshness comes from
  the refcount high-water mark), no ``ftruncate`` (the file is extended
  once, before the next barrier), no metadata I/O, no sync (those wait for
  the next flush, batched for all the requests before it).  It was
  ``fstat`` + ``pwritev`` + ``ftruncate`` before.

The same three through the synchronous ``InlineIO`` methods
(``try_pwritev``/``try_preadv``), which must serve every one of them
inline: one ``pwritev`` or one ``preadv2`` each.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import tools

N = 200

_CHILD = r"""
import asyncio, os, sys
from nbdqcow.qcow2 import open_image

def mark(name):
    try:
        os.stat("/nbdqcow-mark-" + name)
    except FileNotFoundError:
        pass

async def main(path, n):
    img = open_image(path, read_only=False)
    buf = bytes(4096)
    view = memoryview(bytearray(4096))
    step = 2 * 65536
    await img.pwritev(0, [buf])      # loads the L2 table and refcount block
    await img.flush()
    mark("alloc")
    for i in range(1, n + 1):
        await img.pwritev(i * step, [buf])
    mark("inplace")
    for i in range(1, n + 1):
        await img.pwritev(i * step + 8192, [buf])
    mark("read")
    for i in range(1, n + 1):
        await img.preadv(i * step, [view])
    base = (n + 1) * step
    mark("try-alloc")
    for i in range(n):
        assert img.try_pwritev(base + i * step, [buf], False)
    mark("try-inplace")
    for i in range(n):
        assert img.try_pwritev(base + i * step + 8192, [buf], False)
    mark("try-read")
    for i in range(n):
        assert img.try_preadv(base + i * step, [view])
    mark("end")
    await img.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _phases(trace: str) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    phase: str | None = None
    for line in trace.splitlines():
        if "/nbdqcow-mark-" in line:
            phase = line.split("/nbdqcow-mark-", 1)[1].split('"', 1)[0]
            out[phase] = Counter()
            continue
        if phase is None or "(" not in line:
            continue
        name = line.split("(", 1)[0].strip().split()[-1]
        # pwritev/pwritev2, preadv/preadv2: the libc or Python version decides.
        out[phase][name.rstrip("2") if name in ("pwritev2", "preadv2") else name] += 1
    return out


def test_syscalls_per_request(tmp_path: Path) -> None:
    strace = tools.require("strace")
    img = tmp_path / "s.qcow2"
    subprocess.run(
        [tools.require("qemu-img"), "create", "-q", "-f", "qcow2", str(img), "1G"], check=True
    )
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    log = tmp_path / "trace"
    subprocess.run(
        [strace, "-o", str(log), sys.executable, str(script), str(img), str(N)],
        check=True, capture_output=True,
    )  # fmt: skip
    calls = _phases(log.read_text())
    alloc, inplace, read = calls["alloc"], calls["inplace"], calls["read"]
    assert alloc["pwritev"] == N and sum(alloc.values()) == N, alloc
    assert inplace["pwritev"] == N and sum(inplace.values()) == N, inplace
    assert read["preadv"] == N and sum(read.values()) == N, read
    for phase in ("try-alloc", "try-inplace"):
        assert calls[phase]["pwritev"] == N and sum(calls[phase].values()) == N, calls[phase]
    assert calls["try-read"]["preadv"] == N and sum(calls["try-read"].values()) == N, calls
    # No zero fill: each allocated cluster holds 8 KiB of written data (the
    # allocating and the in-place write), the rest of its 64 KiB is a hole.
    assert img.stat().st_blocks * 512 < 2 * N * 32 * 1024
    r = subprocess.run([tools.require("qemu-img"), "check", str(img)], capture_output=True)
    assert r.returncode == 0, r.stdout

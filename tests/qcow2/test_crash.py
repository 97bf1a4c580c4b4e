"""Crash consistency: a child process writes through the engine with
periodic flushes and is SIGKILLed at a random moment.  Afterwards
``qemu-img check`` must report no corruption (leaks are allowed), and every
byte written before the last completed flush, and not touched by any later
request, must read back as it was written (read by qemu, not by us)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tools

SIZE = 2 << 20

#: The request sequence, shared by the child (which executes it) and the
#: parent (which rebuilds the expected contents).
PLAN = r"""
import random

def plan(seed, count, size):
    rng = random.Random(seed)
    ops = []
    for _ in range(count):
        off = rng.randrange(0, size - 1)
        n = min(size - off, rng.choice([1, 4096, 65536, rng.randrange(1, 150000)]))
        r = rng.random()
        kind = "write" if r < 0.7 else "zero" if r < 0.85 else "trim"
        ops.append((kind, off, n, rng.randrange(1, 256), rng.random() < 0.5))
    return ops
"""

CHILD = PLAN + r"""
import asyncio, os, sys
from nbdqcow.qcow2 import open_image

path, log, seed, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
concurrent = sys.argv[5] == "1"
inline = sys.argv[6] == "1"

async def done():
    pass

def request(img, kind, off, n, byte, flag):
    if kind == "write":
        data = bytes([byte]) * n
        # The server's synchronous fast path first (InlineIO, issue 6).
        if inline and img.try_pwritev(off, [data], False):
            return done()
        return img.pwritev(off, [data])
    if kind == "zero":
        return img.zero(off, n, may_trim=flag)
    return img.trim(off, n)

async def main():
    img = open_image(path, read_only=False)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"0\n")  # open: the parent starts its clock now
    group, tasks = [], []
    for i, (kind, off, n, byte, flag) in enumerate(plan(seed, 100000, size)):
        if not concurrent:
            await request(img, kind, off, n, byte, flag)
        else:
            # Requests on disjoint bytes run at once (same result in any
            # order); an overlapping one waits for the group before it.
            if any(off < o + m and o < off + n for o, m in group):
                await asyncio.gather(*tasks)
                group, tasks = [], []
            group.append((off, n))
            tasks.append(asyncio.ensure_future(request(img, kind, off, n, byte, flag)))
        if i % 5 == 4:
            if concurrent:
                await asyncio.gather(*tasks)
                group, tasks = [], []
            await img.flush()
            # Logged only once the flush has returned.
            os.write(fd, b"%d\n" % (i + 1))

asyncio.run(main())
"""

_ns: dict[str, object] = {}
exec(PLAN, _ns)
plan = _ns["plan"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools.require(args[0]), *args[1:]], capture_output=True, text=True)


KINDS = {
    "4k": ("cluster_size=4k", None),
    "64k-rc2": ("cluster_size=64k,refcount_bits=2", None),
    "backing": ("cluster_size=16k", "qcow2"),
    # Writes copy out of clusters (and L2 tables) shared with a snapshot.
    "snapshot": ("cluster_size=8k", "snapshot"),
    # Tiny refcount blocks: new blocks and reftable growth all the time.
    "512-rc64": ("cluster_size=512,refcount_bits=64", None),
    # Requests on disjoint bytes in flight together: the lock-free fast
    # path beside the locked path (COW from the backing file, new tables).
    "4k-concurrent": ("cluster_size=4k", None),
    "backing-concurrent": ("cluster_size=16k", "qcow2"),
    # Writes offered to try_pwritev first, as the server does: inline
    # in-place and allocating writes (no fstat/ftruncate, file extended at
    # the barrier; new L2 tables linked at the flush), alone and beside
    # the locked path.
    "64k-inline": ("cluster_size=64k", None),
    "4k-inline-concurrent": ("cluster_size=4k", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_leaves_consistent_image(tmp_path: Path, kind: str) -> None:
    opts, backing = KINDS[kind]
    base_bytes = bytearray(SIZE)
    rng = random.Random(kind)
    runs = 8
    flushed = []
    for attempt in range(runs):
        d = tmp_path / str(attempt)
        d.mkdir()
        img = d / "img.qcow2"
        extra: list[str] = []
        if backing == "qcow2":
            base = d / "base.qcow2"
            assert run("qemu-img", "create", "-f", "qcow2", str(base), str(SIZE)).returncode == 0
            assert run("qemu-io", "-c", "write -P 77 0 1M", str(base)).returncode == 0
            base_bytes[: 1 << 20] = b"\x4d" * (1 << 20)
            extra = ["-b", base.name, "-F", "qcow2"]
        r = run("qemu-img", "create", "-f", "qcow2", "-o", opts, *extra, str(img), str(SIZE))
        assert r.returncode == 0, r.stderr
        if backing == "snapshot":
            assert run("qemu-io", "-c", "write -P 77 0 1M", str(img)).returncode == 0
            assert run("qemu-img", "snapshot", "-c", "s", str(img)).returncode == 0
            base_bytes[: 1 << 20] = b"\x4d" * (1 << 20)
        log = d / "log"
        log.write_bytes(b"")
        seed = rng.randrange(1 << 30)
        conc = "1" if kind.endswith("-concurrent") else "0"
        inline = "1" if "-inline" in kind else "0"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(img), str(log), str(seed), str(SIZE), conc, inline],
            stderr=subprocess.PIPE,
        )
        # Start timing once the child is writing (interpreter start-up and
        # open take a variable time on a loaded machine).  Every other run
        # also waits for a first completed flush, so that the durability
        # check below always has acknowledged data to verify however slow
        # the machine is; the others may be killed before any flush.
        need = 2 if attempt % 2 else 1
        deadline = time.monotonic() + 60
        while (
            len(log.read_bytes().split()) < need
            and child.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5) if attempt % 2 else rng.uniform(0.1, 1.0))
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate()
        assert child.returncode == -signal.SIGKILL, err.decode()
        lines = log.read_bytes().split()
        durable = int(lines[-1]) if lines else 0
        flushed.append(durable)
        # Consistency, judged by qemu: leaks are allowed after a crash.
        r = run("qemu-img", "check", "--output=json", str(img))
        report = json.loads(r.stdout)
        assert report.get("corruptions", 0) == 0, r.stdout + r.stderr
        assert r.returncode in (0, 3), r.stdout + r.stderr
        # Durability: the model after `durable` requests; bytes touched by
        # a later request (which may have been in flight) are not judged.
        ops = plan(seed, durable + 200, SIZE)  # type: ignore[operator]
        model = bytearray(base_bytes)
        for k, off, n, byte, _flag in ops[:durable]:
            if k == "write":
                model[off : off + n] = bytes([byte]) * n
            elif k == "zero":
                model[off : off + n] = bytes(n)
            else:
                # Trim releases whole clusters only; they then read as zero
                # (v3: zero flag over a backing file, or unallocated).
                text = opts.split("cluster_size=")[1].split(",")[0]
                cs = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
                a, b = -(-off // cs) * cs, (off + n) // cs * cs
                if off + n == SIZE:
                    b = SIZE
                if a < b:
                    model[a:b] = bytes(b - a)
        judged = bytearray(b"\1" * SIZE)
        for _k, off, n, _b, _f in ops[durable:]:
            judged[off : off + n] = bytes(n)
        raw = d / "img.raw"
        assert run("qemu-img", "convert", "-O", "raw", str(img), str(raw)).returncode == 0
        got = raw.read_bytes()
        if backing == "snapshot":
            snap = d / "snap.raw"
            r = run("qemu-img", "convert", "-l", "snapshot.name=s", "-O", "raw", str(img),
                    str(snap))  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert snap.read_bytes() == b"\x4d" * (1 << 20) + bytes(SIZE - (1 << 20))
        bad = [j for j in range(SIZE) if judged[j] and got[j] != model[j]]
        assert not bad, f"run {attempt}: {len(bad)} bytes differ (first {bad[0]}) after {durable}"
        print(f"run {attempt}: {durable} requests durable, check exit {r.returncode}")
    # The kills must have landed mid-stream, after real work.
    assert sum(1 for n in flushed if n > 0) >= runs // 2, flushed

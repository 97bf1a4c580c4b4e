"""Concurrent requests through the write engine (QCOW2.md section 7 rule 10).

Many writes, write-zeroes, flushes and reads are started at once with
``asyncio.gather``, so the engine's lock-free fast path (in-place writes,
simple allocations) runs between the suspension points of the locked path
(COW reads from a backing file, new L2 tables, flushes).  The requests touch
disjoint byte ranges that share clusters and L2 tables, so every completion
order must give the same image: the serial model.  Every run ends with the
image read back through the engine and through qemu (``qemu-img convert``),
``qemu-img check`` and our own check.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from pathlib import Path

import tools
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdqcow.io import HostFile
from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.check import check_image
from nbdqcow.qcow2.image import Qcow2Image

KiB = 1024
SIZE = 3 * 1024 * KiB


def _run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([tools.require(args[0]), *args[1:]], capture_output=True)


def _ok(*args: str) -> None:
    r = _run(*args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)


def _image(d: Path, cluster: int, backing: bool, prefill: bool) -> tuple[Path, bytearray]:
    """A fresh image, and what it reads as (built with qemu-io)."""
    model = bytearray(SIZE)
    img = d / "top.qcow2"
    if backing:
        base = d / "base.qcow2"
        _ok("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE))
        # Backing data in every other 48 KiB stripe.
        cmds = [f"write -P 0x5a {o} {48 * KiB}" for o in range(0, SIZE, 96 * KiB)]
        _ok("qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], str(base))
        for o in range(0, SIZE, 96 * KiB):
            model[o : o + 48 * KiB] = b"\x5a" * (48 * KiB)
        _ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
            "-b", str(base), "-F", "qcow2", str(img))  # fmt: skip
    else:
        _ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
            str(img), str(SIZE))  # fmt: skip
    if prefill:
        # Allocated clusters for the in-place path, a zeroed (preallocated)
        # one for the fill path.
        _ok("qemu-io", "-f", "qcow2", "-c", f"write -P 0x33 {64 * KiB} {512 * KiB}",
            "-c", f"write -z {1024 * KiB} {cluster}", str(img))  # fmt: skip
        model[64 * KiB : 576 * KiB] = b"\x33" * (512 * KiB)
        model[1024 * KiB : 1024 * KiB + cluster] = bytes(cluster)
    return img, model


# (kind, offset, length); kinds: write, zero, zero+unmap, read, and the
# server's synchronous fast path (InlineIO, issue 6): "inline" (try_pwritev,
# else pwritev) and "iread" (try_preadv, else preadv), called when their
# task first runs, i.e. between the suspension points of the others.
_KINDS = ["write", "write", "write", "zero", "unmap", "read", "inline", "inline", "iread"]
_req = st.tuples(
    st.sampled_from(_KINDS),
    st.integers(0, SIZE // 512 - 1).map(lambda s: s * 512),
    st.integers(1, 160).map(lambda s: s * 512),
)


def _disjoint(reqs: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for kind, off, n in reqs:
        n = min(n, SIZE - off)
        if all(off + n <= o or o + m <= off for _, o, m in out):
            out.append((kind, off, n))
    return out


async def _inline_write(img: Qcow2Image, off: int, data: bytes) -> None:
    if not img.try_pwritev(off, [memoryview(data)], False):
        await img.pwritev(off, [memoryview(data)])


async def _inline_read(img: Qcow2Image, off: int, buf: bytearray) -> None:
    if not img.try_preadv(off, [memoryview(buf)]):
        await img.preadv(off, [memoryview(buf)])


def _yielding(f: HostFile) -> None:
    """Make every async read of ``f`` suspend once (as a page-cache miss
    handed to a thread would), so locked writers suspend in their COW reads
    and table loads, and the fast paths run in between."""
    real = f.preadv

    async def preadv(offset: int, bufs: Sequence[memoryview]) -> int:
        await asyncio.sleep(0)
        return await real(offset, bufs)

    f.preadv = preadv  # type: ignore[method-assign]


async def _apply(img_path: Path, reqs: list[tuple[str, int, int]], model: bytearray,
                 flushes: int, yields: bool = False) -> None:  # fmt: skip
    img = open_image(img_path, read_only=False)
    if yields:
        b: object = img
        while isinstance(b, Qcow2Image):
            _yielding(b.file)
            b = b.backing
    initial = bytes(model)
    try:
        jobs = []
        reads: list[tuple[int, bytearray]] = []
        for i, (kind, off, n) in enumerate(reqs):
            if kind == "inline":
                data = bytes([(i % 250) + 1]) * n
                model[off : off + n] = data
                jobs.append(_inline_write(img, off, data))
            elif kind == "iread":
                buf = bytearray(n)
                reads.append((off, buf))
                jobs.append(_inline_read(img, off, buf))
            elif kind == "write":
                data = bytes([(i % 250) + 1]) * n
                model[off : off + n] = data
                jobs.append(img.pwritev(off, [memoryview(data)], fua=i % 7 == 0))
            elif kind in ("zero", "unmap"):
                model[off : off + n] = bytes(n)
                jobs.append(img.zero(off, n, may_trim=kind == "unmap"))
            else:
                buf = bytearray(n)
                reads.append((off, buf))
                jobs.append(img.preadv(off, [memoryview(buf)]))
            if flushes and i % flushes == flushes - 1:
                jobs.append(img.flush())
        await asyncio.gather(*jobs)
        # A read overlapping nothing else reads what was there before.
        for off, buf in reads:
            assert buf == initial[off : off + len(buf)], f"concurrent read at {off:#x}"
        got = bytearray(SIZE)
        await img.preadv(0, [memoryview(got)])
        assert got == model, "engine read-back differs from the serial model"
    finally:
        await img.aclose()


@settings(max_examples=60, deadline=None)
@given(
    reqs=st.lists(_req, min_size=1, max_size=60),
    cluster=st.sampled_from([4 * KiB, 64 * KiB]),
    backing=st.booleans(),
    prefill=st.booleans(),
    flushes=st.sampled_from([0, 5, 13]),
    yields=st.booleans(),
)
def test_concurrent_requests_equal_serial_model(
    reqs: list[tuple[str, int, int]], cluster: int, backing: bool,
    prefill: bool, flushes: int, yields: bool,
) -> None:  # fmt: skip
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        img, model = _image(d, cluster, backing, prefill)
        asyncio.run(_apply(img, _disjoint(reqs), model, flushes, yields))
        r = _run("qemu-img", "check", str(img))
        assert r.returncode == 0, r.stdout + r.stderr
        assert check_image(str(img)).exit_code == 0
        raw = d / "out.raw"
        _ok("qemu-img", "convert", "-O", "raw", str(img), str(raw))
        assert raw.read_bytes() == bytes(model), "qemu reads something else"


async def test_many_tasks_same_cluster_all_land(tmp_path: Path) -> None:
    """32 tasks write disjoint 512-byte pieces of the same few unallocated
    clusters at once (the fast path must not allocate a cluster twice, nor
    race the locked path's COW): every piece lands, one host cluster each."""
    img_path, model = _image(tmp_path, 64 * KiB, backing=True, prefill=False)
    img = open_image(img_path, read_only=False)
    try:
        jobs = []
        for k in range(4 * 128):
            off = (k % 4) * 64 * KiB + (k // 4) * 512
            data = bytes([k % 251 + 1]) * 512
            model[off : off + 512] = data
            jobs.append(img.pwritev(off, [data]))
        await asyncio.gather(*jobs)
        await img.flush()
    finally:
        await img.aclose()
    raw = tmp_path / "out.raw"
    _ok("qemu-img", "convert", "-O", "raw", str(img_path), str(raw))
    assert raw.read_bytes() == bytes(model)
    # Exit code 0: neither corruption nor leaks (a cluster allocated twice
    # for one guest cluster would leak one of them).
    r = _run("qemu-img", "check", str(img_path))
    assert r.returncode == 0, r.stdout
    assert check_image(str(img_path)).exit_code == 0


async def test_fast_path_waits_for_a_suspended_cow_of_the_same_cluster(tmp_path: Path) -> None:
    """A locked write whose COW source is a large compressed cluster is
    suspended while the cluster is decompressed in a thread; the same
    request also allocates the next (unallocated) cluster.  A lock-free
    write into that next cluster meanwhile must not allocate it a second
    time (rule 10): both writes land and nothing leaks."""
    cs = 256 * KiB
    img_path = tmp_path / "c.qcow2"
    _ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}",
        str(img_path), str(4 * cs))  # fmt: skip
    _ok("qemu-io", "-f", "qcow2", "-c", f"write -c -P 0x44 0 {cs}", str(img_path))
    model = bytearray(4 * cs)
    model[:cs] = b"\x44" * cs
    img = open_image(img_path, read_only=False)
    try:
        # Warm the second cluster's L2 table (the fast path needs it cached).
        await img.preadv(cs, [memoryview(bytearray(512))])
        a = b"\x01" * (64 * KiB)
        b = b"\x02" * 4096
        model[cs - 32 * KiB : cs + 32 * KiB] = a
        model[cs + 128 * KiB : cs + 128 * KiB + 4096] = b
        # Same host run: the locked request plans [compressed, unallocated]
        # as one allocation, then suspends reading the compressed head.
        await asyncio.gather(
            img.pwritev(cs - 32 * KiB, [a]),
            img.pwritev(cs + 128 * KiB, [b]),
        )
        got = bytearray(4 * cs)
        await img.preadv(0, [memoryview(got)])
        assert got == model
    finally:
        await img.aclose()
    r = _run("qemu-img", "check", str(img_path))
    assert r.returncode == 0, r.stdout
    assert check_image(str(img_path)).exit_code == 0
    raw = tmp_path / "out.raw"
    _ok("qemu-img", "convert", "-O", "raw", str(img_path), str(raw))
    assert raw.read_bytes() == bytes(model)

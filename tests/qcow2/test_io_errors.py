"""Write errors in the middle of allocating writes (QCOW2.md section 7: an
ENOSPC or EIO must leave metadata consistent -- the cluster may leak -- and
must never hand the same cluster out twice later).

The errors are real: the process's file-size limit (``RLIMIT_FSIZE``, with
``SIGXFSZ`` ignored) makes the kernel fail every write past a chosen file
offset with ``EFBIG``, exactly where a full disk would fail with ``ENOSPC``.
The limit is lifted again, the failed requests are retried, and the image
must read back as the model and pass ``qemu-img check`` (leaks allowed).
"""

from __future__ import annotations

import contextlib
import random
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import tools

from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.check import check_image

KiB = 1024
MiB = 1024 * KiB


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _qemu_img(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([tools.require("qemu-img"), *args], capture_output=True)


@pytest.mark.parametrize("refcount_bits", [16, 1])
@pytest.mark.parametrize("where", [256 * KiB, 8 * MiB])
async def test_failed_allocations_leave_a_consistent_image(
    tmp_path: Path, refcount_bits: int, where: int
) -> None:
    # 4 KiB clusters: one refcount block covers 8 MiB (16-bit counts) or
    # 128 MiB (1-bit counts) of host file, one L2 table 2 MiB of guest.
    # Failing at ~8 MiB hits the creation of the second refcount block;
    # at 256 KiB the data and L2 writes.
    img_path = tmp_path / "e.qcow2"
    opts = f"cluster_size=4k,refcount_bits={refcount_bits}"
    r = _qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(img_path), "64M")
    assert r.returncode == 0, r.stderr
    size = 64 * MiB
    model = bytearray(size)
    rnd = random.Random(where + refcount_bits)
    # Enough allocating writes to grow the file well past ``where``.
    offs = rnd.sample(range(size // 4096), (where + 2 * MiB) // 4096)
    img = open_image(img_path, read_only=False)
    failed: list[int] = []
    try:
        with _file_size_limit(where):
            for k, c in enumerate(offs):
                data = bytes([k % 251 + 1]) * 4096
                try:
                    await img.pwritev(c * 4096, [data])
                except OSError:
                    failed.append(c)
                    continue
                model[c * 4096 : (c + 1) * 4096] = data
            with contextlib.suppress(OSError):
                await img.flush()
        assert failed, "the limit never bit: the test does not test anything"
        # The disk has room again: the failed writes go through now.
        for c in failed:
            data = bytes([c % 251 + 1]) * 4096
            await img.pwritev(c * 4096, [data])
            model[c * 4096 : (c + 1) * 4096] = data
        await img.flush()
        got = bytearray(size)
        await img.preadv(0, [memoryview(got)])
        assert got == model
    finally:
        await img.aclose()
    r = _qemu_img("check", str(img_path))
    assert r.returncode in (0, 3), r.stdout + r.stderr  # leaks allowed, no corruption
    assert check_image(str(img_path)).exit_code in (0, 3)
    raw = tmp_path / "out.raw"
    r = _qemu_img("convert", "-O", "raw", str(img_path), str(raw))
    assert r.returncode == 0, r.stderr
    assert raw.read_bytes() == bytes(model)


@pytest.mark.parametrize(
    ("opts", "size", "every", "requests"),
    [
        # 512-byte clusters with 64-bit counts: a refcount block covers
        # 32 KiB of host file and the first reftable 2 MiB, so the run
        # also crosses refcount-table growth (twice), under the limit.
        ("cluster_size=512,refcount_bits=64", 8 * MiB, 1, 4000),
        ("cluster_size=4k", 32 * MiB, 3, 1500),
    ],
)
async def test_errors_at_every_kind_of_allocation(
    tmp_path: Path, opts: str, size: int, every: int, requests: int
) -> None:
    """Every few requests the file may grow by only 0..3 clusters: the
    failure lands in turn on data, COW fills, new L2 tables, new refcount
    blocks and reftable growth.  Failed requests are retried without the
    limit; the image must stay consistent throughout."""
    cs = 512 if "cluster_size=512" in opts else 4096
    img_path = tmp_path / "e.qcow2"
    r = _qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(img_path), str(size))
    assert r.returncode == 0, r.stderr
    model = bytearray(size)
    rnd = random.Random(size)
    img = open_image(img_path, read_only=False)
    failures = 0
    try:
        for k in range(requests):
            off = rnd.randrange(size // 512) * 512
            n = min(size - off, rnd.choice([512, 4096, 3 * cs + 512]))
            data = bytes([k % 251 + 1]) * n
            if k % every == 0:
                failed = False
                with _file_size_limit(img_path.stat().st_size + rnd.randrange(4) * cs):
                    try:
                        await img.pwritev(off, [data])
                    except OSError:
                        failed = True
                if failed:
                    failures += 1
                    await img.pwritev(off, [data])  # the limit is lifted now
            else:
                await img.pwritev(off, [data])
            model[off : off + n] = data
            if k % 50 == 0:
                with _file_size_limit(img_path.stat().st_size), contextlib.suppress(OSError):
                    await img.flush()
        await img.flush()
        got = bytearray(size)
        await img.preadv(0, [memoryview(got)])
        assert got == model
    finally:
        await img.aclose()
    assert failures > 20, f"only {failures} requests failed: the test tests too little"
    r = _qemu_img("check", str(img_path))
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert check_image(str(img_path)).exit_code in (0, 3)
    raw = tmp_path / "out.raw"
    r = _qemu_img("convert", "-O", "raw", str(img_path), str(raw))
    assert r.returncode == 0, r.stderr
    assert raw.read_bytes() == bytes(model)

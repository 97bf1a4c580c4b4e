"""A failed ``fdatasync`` is sticky, and fatal for writes to a qcow2 image.

After writeback fails the kernel may have dropped the dirty pages and
marked them clean, so a later ``fdatasync`` can succeed although data
acknowledged earlier never reached the disk (PostgreSQL's "fsyncgate",
2018).  :class:`HostFile` therefore fails every sync after the first
failure, and the write engine refuses writes, zeroes, trims and flushes
from then on -- reads continue -- without writing anything more.

Why the failure is injected: a real ``EIO`` from ``fdatasync`` needs a
block device that fails writes (device-mapper ``error``/``flakey`` targets,
a loop device on a failing file), and an unprivileged container here has
neither device-mapper nor loop devices; ``RLIMIT_FSIZE`` (used by
test_io_errors.py) fails ``write``, not ``fdatasync``.  So the one syscall
is replaced: :meth:`HostFile._fdatasync_raw` raises once.  Everything
above it -- the sticky bookkeeping, the engine, the real file, qemu-img
check of the result -- is real.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
import tools

from nbdqcow.io import HostFile
from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.image import Qcow2Image

KiB = 1024
CS = 64 * KiB
SIZE = 1024 * 1024 * KiB  # sparse; two L2 tables' worth


class _FailOnce(HostFile):
    """A host file whose next ``fdatasync`` fails with ``err``."""

    def __init__(self, path: Path, err: int) -> None:
        super().__init__(path, writable=True)
        self.err = err
        self.calls = 0

    def _fdatasync_raw(self) -> None:
        self.calls += 1
        if self.calls == 1:
            raise OSError(self.err, "injected writeback failure")
        super()._fdatasync_raw()


def _qemu_img(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([tools.require("qemu-img"), *args], capture_output=True)


async def test_hostfile_sync_failure_is_sticky(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 4096)
    f = _FailOnce(p, errno.EIO)
    try:
        with pytest.raises(OSError) as first:
            f.fdatasync_sync()
        assert first.value.errno == errno.EIO
        # The syscall would succeed now; the file must still refuse, sync
        # and async alike, without even trying.
        for _ in range(2):
            with pytest.raises(OSError) as later:
                f.fdatasync_sync()
            assert later.value.errno == errno.EIO
            assert "earlier fdatasync failed" in str(later.value)
            with pytest.raises(OSError) as later_async:
                await f.fdatasync()
            assert later_async.value.errno == errno.EIO
        assert f.calls == 1
    finally:
        f.close()


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EBADF])
async def test_hostfile_errors_without_writeback_are_not_sticky(tmp_path: Path, err: int) -> None:
    # EINVAL/EBADF: no writeback was attempted, nothing can have been lost.
    p = tmp_path / "f"
    p.write_bytes(b"x")
    f = _FailOnce(p, err)
    try:
        with pytest.raises(OSError):
            await f.fdatasync()
        await f.fdatasync()
        assert f.sync_error is None and f.calls == 2
    finally:
        f.close()


def _fail_next_sync(img: Qcow2Image) -> list[int]:
    """Make the image file's next fdatasync fail with EIO; count calls."""
    calls: list[int] = []
    real = img.file._fdatasync_raw

    def raw() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected writeback failure")
        real()

    img.file._fdatasync_raw = raw  # type: ignore[method-assign]
    return calls


async def _refuses_writes(img: Qcow2Image) -> None:
    for op in (
        img.pwritev(0, [b"w" * 4096]),  # in place: the lock-free fast path
        img.pwritev(5 * CS, [b"w" * 4096]),  # allocating
        img.zero(0, CS),
        img.trim(CS, CS),
        img.flush(),
        img.pwritev(0, [b"w" * 512], fua=True),
    ):
        with pytest.raises(OSError) as exc:
            await op
        assert exc.value.errno == errno.EIO
        assert "fdatasync" in str(exc.value)


@pytest.mark.parametrize("where", ["flush", "new-l2-table"])
async def test_failed_sync_makes_the_image_refuse_writes(tmp_path: Path, where: str) -> None:
    path = tmp_path / "s.qcow2"
    r = _qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(path), str(SIZE))
    assert r.returncode == 0, r.stderr
    model = bytearray(2 * CS)
    img = open_image(path, read_only=False)
    try:
        await img.pwritev(0, [b"A" * (2 * CS)])
        model[0 : 2 * CS] = b"A" * (2 * CS)
        await img.flush()
        calls = _fail_next_sync(img)
        # Data written after the last good flush, acknowledged by the write
        # but not by a flush: this is what the failed sync may have lost.
        await img.pwritev(CS, [b"B" * 4096])
        model[CS : CS + 4096] = b"B" * 4096
        tail_model = bytes(CS)
        if where == "new-l2-table":
            # 64 KiB clusters: one L2 table maps 512 MiB, so this write
            # needs a new table.  It is linked in memory without a sync of
            # its own; the flush syncs it before writing its L1 entry.
            await img.pwritev(SIZE - CS, [b"C" * 512])
            tail_model = b"C" * 512 + bytes(CS - 512)
            assert len(calls) == 0
        with pytest.raises(OSError) as exc:
            await img.flush()
        assert exc.value.errno == errno.EIO
        assert len(calls) == 1
        await _refuses_writes(img)
        assert len(calls) == 1  # nothing tried to sync again
        # Reads continue, and see every acknowledged write.
        out = bytearray(2 * CS)
        await img.preadv(0, [memoryview(out)])
        assert out == model[: 2 * CS]
        tail = bytearray(CS)
        await img.preadv(SIZE - CS, [memoryview(tail)])
        assert tail == tail_model
    finally:
        await img.aclose()  # no flush is attempted, no error raised
    assert len(calls) == 1
    # The metadata never got ahead of a failed barrier: leaks at most.
    r = _qemu_img("check", "-f", "qcow2", str(path))
    assert r.returncode in (0, 3), r.stdout + r.stderr
    # The image is usable again once reopened (the operator's decision).
    img = open_image(path, read_only=False)
    try:
        await img.pwritev(3 * CS, [b"D" * 4096])
        await img.flush()
    finally:
        await img.aclose()
    r = _qemu_img("check", "-f", "qcow2", str(path))
    assert r.returncode in (0, 3), r.stdout + r.stderr

"""Images on tmpfs: reads stay on the event loop (nbdqcow.io, "Memory file
systems").

tmpfs refuses ``preadv(..., RWF_NOWAIT)`` with ``EOPNOTSUPP``; before
:attr:`HostFile.inline_read_flags`, every read of an image in ``/dev/shm``
went through the thread pool.  These tests use a real tmpfs file and count
the real thread pool's submissions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nbdqcow.backends.raw import RawBackend
from nbdqcow.io import HostFile, memory_backed
from nbdqcow.qcow2 import open_image
from nbdqcow.sendfile import page_cached, resident
from tests.server.conftest import serving
from tests.tools import require

T = TypeVar("T")
SIZE = 4 << 20


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory on tmpfs (``/dev/shm`` on Linux)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    d = Path(tempfile.mkdtemp(prefix="nbdqcow-test-", dir="/dev/shm"))
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            if not memory_backed(fd):
                pytest.skip("/dev/shm is not tmpfs here")
        finally:
            os.close(fd)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor, counting what is handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Callable[..., T], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[T]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


def _raw(path: Path) -> Path:
    path.write_bytes(_pattern(SIZE))
    return path


def _qcow2(path: Path) -> Path:
    qemu_img, qemu_io = require("qemu-img"), require("qemu-io")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), str(SIZE)], check=True)
    subprocess.run([qemu_io, "-f", "qcow2", "-c", f"write -q -P 0x5a 0 {SIZE // 2}",
                    str(path)], check=True)
    return path


def test_host_file_reads_tmpfs_inline_and_disk_with_nowait(shm: Path, tmp_path: Path) -> None:
    mem = HostFile(_raw(shm / "a.raw"), writable=False)
    disk = HostFile(_raw(tmp_path / "a.raw"), writable=False)
    try:
        assert mem.inline_read_flags == 0
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            on_tmpfs = memory_backed(fd)
        finally:
            os.close(fd)
        expected = 0 if on_tmpfs else getattr(os, "RWF_NOWAIT", None)
        assert disk.inline_read_flags == expected
    finally:
        mem.close()
        disk.close()


def test_sendfile_probes_say_cached_on_tmpfs(shm: Path) -> None:
    path = _raw(shm / "a.raw")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert resident(fd, 0) and resident(fd, SIZE - 1)
        assert not resident(fd, SIZE)  # past the end: the copying path pads
        assert page_cached(fd, 4096, 65536, bytearray(1))
        assert not page_cached(fd, SIZE - 4096, 8192, bytearray(1))
    finally:
        os.close(fd)


async def test_raw_reads_on_tmpfs_never_use_a_thread(shm: Path) -> None:
    loop = asyncio.get_running_loop()
    pool = CountingExecutor()
    loop.set_default_executor(pool)
    b = RawBackend(_raw(shm / "a.raw"), read_only=True)
    try:
        buf = bytearray(8192)
        assert b.try_preadv(12288, [memoryview(buf)])
        assert bytes(buf) == _pattern(SIZE)[12288:20480]
        await b.preadv(SIZE - 4096, [memoryview(buf)])  # 4 KiB past the end: zeroes
        assert bytes(buf) == _pattern(SIZE)[-4096:] + bytes(4096)
        assert pool.submitted == 0
    finally:
        await b.aclose()


async def test_qcow2_reads_on_tmpfs_never_use_a_thread(shm: Path) -> None:
    loop = asyncio.get_running_loop()
    pool = CountingExecutor()
    loop.set_default_executor(pool)
    img = open_image(_qcow2(shm / "a.qcow2"))
    try:
        buf = bytearray(65536)
        await img.preadv(0, [memoryview(buf)])  # loads the L2 table
        assert bytes(buf) == b"\x5a" * 65536
        assert img.try_preadv(SIZE // 2 - 4096, [memoryview(buf)[:4096]])
        assert bytes(buf[:4096]) == b"\x5a" * 4096
        assert img.try_preadv(SIZE // 2, [memoryview(buf)])  # unallocated: zeroes
        assert bytes(buf) == bytes(65536)
        assert pool.submitted == 0
    finally:
        await img.aclose()


async def test_served_from_tmpfs_to_qemu_io_without_threads(shm: Path) -> None:
    """A real client reads a qcow2 image kept in tmpfs: right bytes, and the
    server never hands a read to a thread."""
    qemu_io = require("qemu-io")
    loop = asyncio.get_running_loop()
    pool = CountingExecutor()
    loop.set_default_executor(pool)
    img = open_image(_qcow2(shm / "a.qcow2"))
    sock = shm / "nbd.sock"
    async with serving(img, sock):
        proc = await asyncio.create_subprocess_exec(
            qemu_io, "-f", "raw", "-r",
            "-c", f"read -P 0x5a 0 {SIZE // 2}",
            "-c", f"read -P 0 {SIZE // 2} {SIZE // 2}",
            "-c", "read -P 0x5a 4096 4096",
            f"nbd+unix:///disk?socket={sock}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "Pattern verification failed" not in text
    assert text.count("read ") == 3, text
    assert pool.submitted == 0

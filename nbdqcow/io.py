"""HostFile: positional, vectored I/O on one host file, friendly to asyncio.

Reads try ``os.preadv(..., os.RWF_NOWAIT)`` inline first: when the data is in
the page cache (the common case for a busy server) this costs one syscall and
no thread hop; when it is not, the kernel answers ``EAGAIN`` at once and the
read is handed to the loop's thread pool, so one cold read never stalls every
other connection (the lesson recorded in issue 6).  Writes go inline: buffered
writes land in the page cache; ``fdatasync`` always runs in a thread because
it waits for the disk.

A failed ``fdatasync`` is sticky (:meth:`HostFile.fdatasync`): once the
kernel has reported a writeback error it may have dropped the dirty pages
and marked them clean, so a later ``fdatasync`` can succeed although data
written before it never reached the disk (the 2018 "fsyncgate" lesson of
PostgreSQL; qemu likewise stops trusting an image after one).  Every later
sync of that file therefore fails with ``EIO`` too.

Memory file systems (tmpfs, ramfs) refuse ``RWF_NOWAIT`` reads with
``EOPNOTSUPP`` (measured on Linux 6.18: every read of an image in
``/dev/shm`` went to the thread pool, 8.6k random 4 KiB reads/s at queue
depth 32 against 100k from ext4).  Their pages never wait for a device, so
:attr:`HostFile.inline_read_flags` is ``0`` there: a plain ``preadv`` is
already the non-blocking read (a swapped-out page is the one exception, as
for any memory access of the server).  Network boot labs keep images in
tmpfs, which is why this is worth a ``fstatfs`` at open.

Short reads past the end of the file are not an error here: callers that read
a region which may extend beyond EOF (a raw file shorter than its export, the
last compressed cluster of a qcow2 image) get the byte count and zero-fill.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import platform
import sys
from collections.abc import Sequence

from nbdqcow.backends.base import Buffer

__all__ = ["HostFile", "inline_read_flags", "memory_backed"]

# fallocate(2) modes (linux/falloc.h).  Python's os module has no wrapper for
# punching holes, so we call libc directly.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        lib.fallocate.restype = ctypes.c_int
        lib.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
        lib.fstatfs.restype = ctypes.c_int
        _libc = lib
    return _libc


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _lib().fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_HAVE_NOWAIT = hasattr(os, "RWF_NOWAIT")

# statfs(2) f_type of file systems whose pages live in memory only
# (linux/magic.h): TMPFS_MAGIC, RAMFS_MAGIC.
_MEMORY_FS = frozenset({0x01021994, 0x858458F6})


def _fs_type(fd: int) -> int | None:
    """The ``f_type`` of ``fstatfs(fd)``, or None where it cannot be read.

    ``f_type`` is the first field of ``struct statfs``, a ``long`` on every
    64-bit Linux ABI but s390x (an unsigned int there), which is left out.
    """
    if not sys.platform.startswith("linux") or platform.machine().startswith("s390"):
        return None
    buf = ctypes.create_string_buffer(256)  # sizeof(struct statfs) is 120
    if _lib().fstatfs(fd, buf) != 0:
        return None
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def memory_backed(fd: int) -> bool:
    """Does ``fd`` live on tmpfs or ramfs (reads never wait for a disk)?"""
    return _fs_type(fd) in _MEMORY_FS


def inline_read_flags(fd: int) -> int | None:
    """The ``preadv`` flags of a read that may run on the event loop: ``0``
    on a memory file system, ``RWF_NOWAIT`` where the kernel has it (the
    read fails with ``EAGAIN`` instead of waiting for the disk), else None:
    no read of this file may run inline."""
    if memory_backed(fd):
        return 0
    return os.RWF_NOWAIT if _HAVE_NOWAIT else None


def _views(bufs: Sequence[Buffer]) -> list[memoryview]:
    return [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of a buffer list (after a short transfer)."""
    out: list[memoryview] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out


class HostFile:
    """An open host file.  Not thread-safe for ``close``; I/O calls are."""

    def __init__(self, path: str | os.PathLike[str], *, writable: bool) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self.fd: int = os.open(self.path, flags)
        self._closed = False
        #: Flags for a ``preadv`` that must not block the event loop, or
        #: None when no read of this file can be made non-blocking (see
        #: :func:`inline_read_flags`); a file system that turns out to refuse
        #: ``RWF_NOWAIT`` at the first read is remembered as None.
        self.inline_read_flags: int | None = inline_read_flags(self.fd)
        #: The first writeback error ``fdatasync`` reported (see the module
        #: docstring); once set, every later sync fails.
        self.sync_error: OSError | None = None

    # -- metadata -------------------------------------------------------
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    # -- synchronous primitives (metadata paths, CLI tools) ---------------
    def preadv_sync(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Read into ``bufs`` until full or EOF; return the bytes read."""
        views = list(bufs)
        total = 0
        while views:
            n = os.preadv(self.fd, views, offset + total)
            if n == 0:
                break
            total += n
            views = _advance(views, n)
        return total

    def pread_sync(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes (short only at EOF)."""
        buf = bytearray(length)
        n = self.preadv_sync(offset, [memoryview(buf)])
        return bytes(buf[:n])

    def pwritev_sync(self, offset: int, bufs: Sequence[Buffer]) -> None:
        views = _views(bufs)
        done = 0
        while views:
            n = os.pwritev(self.fd, views, offset + done)
            done += n
            views = _advance(views, n)

    def pwrite_sync(self, offset: int, data: Buffer) -> None:
        self.pwritev_sync(offset, [data])

    def fdatasync_sync(self) -> None:
        """``fdatasync`` the file; after one failure, fail every time."""
        failed = self.sync_error
        if failed is not None:
            raise OSError(
                errno.EIO,
                f"{self.path}: an earlier fdatasync failed ({failed.strerror}); "
                "data written before it may be lost, so no later sync can succeed",
            )
        try:
            self._fdatasync_raw()
        except OSError as e:
            # EBADF/EINVAL mean no writeback was even attempted (a closed
            # fd, a file that cannot be synced): nothing was lost.  Any
            # other error (EIO, ENOSPC, EDQUOT) may have cost dirty pages.
            if e.errno not in (errno.EBADF, errno.EINVAL):
                self.sync_error = e
            raise

    def _fdatasync_raw(self) -> None:
        # The one place the syscall is made (tests inject failures here:
        # no failing block device -- dm-error, a loop device -- exists in
        # an unprivileged container).
        os.fdatasync(self.fd)

    # -- asynchronous primitives (data path) ------------------------------
    async def preadv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Like :meth:`preadv_sync`, without blocking the event loop on a
        page-cache miss."""
        views = list(bufs)
        total = 0
        flags = self.inline_read_flags
        if flags is not None:
            try:
                while views:
                    n = os.preadv(self.fd, views, offset + total, flags)
                    if n == 0:
                        return total
                    total += n
                    views = _advance(views, n)
                return total
            except BlockingIOError:
                pass
            except OSError as e:
                # Some file systems refuse RWF_NOWAIT outright: stop asking.
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL) or not flags:
                    raise
                self.inline_read_flags = None
        if not views:
            return total
        loop = asyncio.get_running_loop()
        rest = await loop.run_in_executor(None, self.preadv_sync, offset + total, views)
        return total + rest

    async def pwritev(self, offset: int, bufs: Sequence[Buffer]) -> None:
        self.pwritev_sync(offset, bufs)

    async def fdatasync(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.fdatasync_sync)

    # -- space management -------------------------------------------------
    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate host space; the range then reads as zeroes."""
        _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        """Make the range read as zeroes, keeping it allocated."""
        _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def seek_data(self, offset: int) -> int:
        """Next data offset at or after ``offset`` (``ENXIO`` past the last)."""
        return os.lseek(self.fd, offset, os.SEEK_DATA)

    def seek_hole(self, offset: int) -> int:
        return os.lseek(self.fd, offset, os.SEEK_HOLE)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

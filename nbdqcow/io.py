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
from collections.abc import Sequence

from nbdqcow.backends.base import Buffer

__all__ = ["HostFile"]

# fallocate(2) modes (linux/falloc.h).  Python's os module has no wrapper for
# punching holes, so we call libc directly.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_HAVE_NOWAIT = hasattr(os, "RWF_NOWAIT")


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
        if _HAVE_NOWAIT:
            try:
                while views:
                    n = os.preadv(self.fd, views, offset + total, os.RWF_NOWAIT)
                    if n == 0:
                        return total
                    total += n
                    views = _advance(views, n)
                return total
            except BlockingIOError:
                pass
            except OSError as e:
                # Some file systems refuse RWF_NOWAIT outright.
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
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

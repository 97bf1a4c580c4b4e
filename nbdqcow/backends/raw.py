"""RawBackend: a plain file (or a fixed-size window of one) as a virtual disk.

Mirrors nbdkit's ``file`` plugin: reads and writes are positional vectored
syscalls through :class:`nbdqcow.io.HostFile`; TRIM punches holes; zeroing
uses ``FALLOC_FL_ZERO_RANGE`` (or a punch when trimming is allowed), which is
what makes ``FAST_ZERO`` honest; block status comes from ``SEEK_DATA`` /
``SEEK_HOLE``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from nbdqcow.backends.base import Buffer, Capabilities, Extent, ExtentFlag
from nbdqcow.io import HostFile

__all__ = ["RawBackend"]

_ZERO_CHUNK = bytes(1024 * 1024)


class RawBackend:
    """A raw image file.

    Args:
        path: the file.
        read_only: open ``O_RDONLY`` and refuse writes.
        size: the virtual size; defaults to the file size.  Bytes past the end
            of a shorter file read as zeroes (a backing file shorter than its
            overlay).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, read_only: bool = True, size: int | None = None
    ) -> None:
        self._file = HostFile(path, writable=not read_only)
        self._size = self._file.size() if size is None else size
        self._caps = Capabilities(
            read_only=read_only,
            flush=not read_only,
            fua=not read_only,
            trim=not read_only,
            zero=not read_only,
            fast_zero=not read_only,
            cache=True,
            extents=True,
            multi_conn=True,
        )
        self._fast_zero_ok = True

    @property
    def path(self) -> str:
        return self._file.path

    @property
    def host_file(self) -> HostFile:
        """The open file (the server sends read replies straight from it
        with ``sendfile``)."""
        return self._file

    @property
    def size(self) -> int:
        return self._size

    @property
    def caps(self) -> Capabilities:
        return self._caps

    async def preadv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        want = sum(len(b) for b in bufs)
        got = await self._file.preadv(offset, bufs)
        if got < want:
            _zero_from(bufs, got)

    def try_preadv(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        """:class:`~nbdqcow.backends.base.InlineIO`: one ``RWF_NOWAIT``
        ``preadv`` (a plain one on tmpfs: :attr:`HostFile.inline_read_flags`);
        anything short of a complete read declines (page-cache miss, partly
        cached range, end of file: the async path sorts those out)."""
        f = self._file
        flags = f.inline_read_flags
        if flags is None:
            return False
        want = len(bufs[0]) if len(bufs) == 1 else sum(map(len, bufs))
        try:
            # (issue 6: no bool() call around a comparison that is one)
            return os.preadv(f.fd, bufs, offset, flags) == want
        except OSError:  # BlockingIOError, or no RWF_NOWAIT on this file system
            return False

    def try_pwritev(self, offset: int, bufs: Sequence[Buffer], fua: bool) -> bool:
        """:class:`~nbdqcow.backends.base.InlineIO`: the buffered write the
        async path does inline anyway; FUA needs a sync, so it declines."""
        if fua:
            return False
        f = self._file
        if len(bufs) == 1:
            # The common case (one payload buffer) without pwritev_sync's
            # list and loop; a short write, which a regular file gives only
            # at ENOSPC's edge, finishes (or raises) through it.
            b = bufs[0]
            n = os.pwritev(f.fd, bufs, offset)
            size = b.nbytes if type(b) is memoryview else len(b)
            if n != size:
                f.pwritev_sync(offset + n, [memoryview(b).cast("B")[n:]])
            return True
        f.pwritev_sync(offset, bufs)
        return True

    async def pwritev(self, offset: int, bufs: Sequence[Buffer], *, fua: bool = False) -> None:
        await self._file.pwritev(offset, bufs)
        if fua:
            await self._file.fdatasync()

    async def flush(self) -> None:
        await self._file.fdatasync()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        try:
            self._file.punch_hole(offset, length)
        except OSError as e:
            # TRIM is advisory: a file system without hole punching simply
            # keeps the data.
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        if fua:
            await self._file.fdatasync()

    async def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        done = False
        if self._fast_zero_ok:
            try:
                if may_trim:
                    self._file.punch_hole(offset, length)
                else:
                    self._file.zero_range(offset, length)
                done = True
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._fast_zero_ok = False
        if not done:
            if fast:
                raise OSError(errno.ENOTSUP, "zeroing would need data writes")
            pos, end = offset, offset + length
            while pos < end:
                n = min(len(_ZERO_CHUNK), end - pos)
                await self._file.pwritev(pos, [memoryview(_ZERO_CHUNK)[:n]])
                pos += n
        if fua:
            await self._file.fdatasync()

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._file.fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        fsize = min(self._file.size(), self._size)
        out: list[Extent] = []
        pos = offset
        while pos < end:
            if pos >= fsize:
                out.append(Extent(pos, end - pos, ExtentFlag.HOLE | ExtentFlag.ZERO))
                break
            try:
                data = self._file.seek_data(pos)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = fsize
            if data > pos:
                stop = min(data, end)
                out.append(Extent(pos, stop - pos, ExtentFlag.HOLE | ExtentFlag.ZERO))
                pos = stop
                continue
            hole = min(self._file.seek_hole(pos), fsize)
            stop = min(hole, end)
            out.append(Extent(pos, stop - pos, ExtentFlag.DATA, host_offset=pos))
            pos = stop
        return out

    async def aclose(self) -> None:
        self._file.close()


def _zero_from(bufs: Sequence[memoryview], start: int) -> None:
    """Zero every byte of ``bufs`` from logical position ``start`` on."""
    pos = 0
    for b in bufs:
        n = len(b)
        if pos + n > start:
            lo = max(0, start - pos)
            b[lo:] = bytes(n - lo)
        pos += n

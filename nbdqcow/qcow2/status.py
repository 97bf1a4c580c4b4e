"""Block status and CACHE of :class:`~nbdqcow.qcow2.image.Qcow2Image`
(qemu ``qcow2_co_block_status``), as the :class:`BlockStatus` mixin.

Maps a range through :mod:`~nbdqcow.qcow2.cluster` (qcow2.txt "Cluster
mapping", extended L2 subclusters included) and reports NBD extents:
allocated clusters as ``DATA`` (``ZERO`` where the host file has a hole:
metadata preallocation), zero and unallocated-without-backing clusters as
``HOLE | ZERO``, and unallocated clusters with a backing file as what the
backing file reports one level deeper.  ``NBD_CMD_CACHE`` loads the range's
L2 tables and reads its data ahead.
"""

from __future__ import annotations

import errno
import os

from nbdqcow.backends.base import BlockBackend, Extent, ExtentFlag
from nbdqcow.errors import CorruptImage
from nbdqcow.io import HostFile
from nbdqcow.qcow2.cluster import ClusterMap, Run
from nbdqcow.qcow2.entries import SubclusterType
from nbdqcow.qcow2.geometry import Geometry

__all__ = ["BLOCK_STATUS_CLUSTERS", "BLOCK_STATUS_TABLES", "BlockStatus"]

#: block_status describes at most this many L2 tables' worth per call ...
BLOCK_STATUS_TABLES = 64
#: ... and at most this many clusters (each allocated L2 entry is visited).
BLOCK_STATUS_CLUSTERS = 1 << 17


class BlockStatus:
    """Block status of a qcow2 image; mixed into
    :class:`~nbdqcow.qcow2.image.Qcow2Image`, whose ``__init__`` sets the
    attributes declared here."""

    data: HostFile
    geo: Geometry
    map: ClusterMap
    backing: BlockBackend | None
    _size: int

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        assert offset >= 0 and offset + length <= self._size and length > 0
        # Bound the work per call; callers loop for the rest.
        span = min(
            BLOCK_STATUS_TABLES * self.geo.bytes_per_l2,
            BLOCK_STATUS_CLUSTERS << self.geo.cluster_bits,
        )
        length = min(length, span - offset % span)
        out: list[Extent] = []
        for run in await self.map.runs(offset, length):
            typ = run.type
            host = run.host if run.host >= 0 and typ is not SubclusterType.COMPRESSED else None
            if typ is SubclusterType.NORMAL:
                self._data_status(out, run)
            elif typ is SubclusterType.COMPRESSED:
                _add(out, Extent(run.guest, run.length, ExtentFlag.DATA, 1, None))
            elif typ.reads_zero:
                _add(out, Extent(run.guest, run.length, ExtentFlag.HOLE | ExtentFlag.ZERO, 1, host))
            else:
                await self._backing_status(out, run.guest, run.length)
        return out

    def _data_status(self, out: list[Extent], run: Run) -> None:
        """Extents of a run of allocated clusters: ``DATA``, except where the
        host file has a hole (metadata preallocation), which reads as zeroes
        and is reported ``ZERO`` -- what qemu-img map says for such images,
        and what lets NBD clients and ``convert`` skip it.  Two ``lseek``
        calls per run."""
        h, hend, g = run.host, run.host + run.length, run.guest
        while h < hend:
            try:
                d = self.data.seek_data(h)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: only holes up to EOF
                    raise
                d = hend
            if d > h:
                n = min(d, hend) - h
                _add(out, Extent(g, n, ExtentFlag.ZERO, 1, h))
            else:
                n = min(self.data.seek_hole(h), hend) - h
                _add(out, Extent(g, n, ExtentFlag.DATA, 1, h))
            h += n
            g += n

    async def _backing_status(self, out: list[Extent], guest: int, length: int) -> None:
        b = self.backing
        end = guest + length
        pos = guest
        if b is not None:
            stop = min(end, b.size)
            while pos < stop:
                exts = await b.block_status(pos, stop - pos)
                if not exts:
                    raise CorruptImage("backing file returned no block status")
                for e in exts:
                    d = e.depth + 1 if e.depth else 0
                    _add(out, Extent(e.offset, e.length, e.flags, d, e.host_offset))
                pos = exts[-1].end
        if pos < end:
            _add(out, Extent(pos, end - pos, ExtentFlag.HOLE | ExtentFlag.ZERO, 0, None))

    async def cache(self, offset: int, length: int) -> None:
        """``NBD_CMD_CACHE`` (advisory): load the range's L2 tables into the
        table cache and ask the kernel to read its data clusters ahead
        (``POSIX_FADV_WILLNEED``, as the raw backend does for the whole
        range); ranges that read through go to the backing file's own
        cache.  Compressed and zero runs need nothing.  The next READ of the
        range then finds its mapping and data cached (the inline path)."""
        fd = self.data.fd
        for run in await self.map.runs(offset, length):
            typ = run.type
            if typ is SubclusterType.NORMAL:
                os.posix_fadvise(fd, run.host, run.length, os.POSIX_FADV_WILLNEED)
            elif typ.reads_backing and self.backing is not None and run.guest < self.backing.size:
                await self.backing.cache(run.guest,
                                         min(run.length, self.backing.size - run.guest))


def _add(out: list[Extent], e: Extent) -> None:
    if out:
        last = out[-1]
        if (
            last.flags == e.flags
            and last.depth == e.depth
            and last.end == e.offset
            and (
                (last.host_offset is None and e.host_offset is None)
                or (
                    last.host_offset is not None
                    and e.host_offset is not None
                    and last.host_offset + last.length == e.host_offset
                )
            )
        ):
            n = last.length + e.length
            out[-1] = Extent(last.offset, n, e.flags, e.depth, last.host_offset)
            return
    out.append(e)


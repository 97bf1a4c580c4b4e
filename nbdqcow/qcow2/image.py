"""Qcow2Image: a qcow2 image as a :class:`~nbdqcow.backends.base.BlockBackend`
(qemu ``block/qcow2.c``), split by concern:

* this module -- the image object: its state (header, L1, L2 cache, cluster
  map, backing chain), the L2 cache sized like qemu's (enough tables to
  cover the whole virtual disk, capped at 32 MiB by default), the
  :class:`~nbdqcow.backends.base.InlineIO` write entry and the mutating
  calls, which delegate to the write engine (:mod:`~nbdqcow.qcow2.write`);
* :mod:`~nbdqcow.qcow2.readpath` -- reads (qcow2.txt cluster mapping,
  compressed clusters, backing files) and read epochs;
* :mod:`~nbdqcow.qcow2.status` -- block status and CACHE;
* :mod:`~nbdqcow.qcow2.opening` -- :func:`open_image` and
  :func:`read_header` (qcow2.txt "Header"), re-exported here.

The server first offers small reads and writes to the synchronous
:class:`~nbdqcow.backends.base.InlineIO` methods :meth:`Qcow2Image.try_preadv`
(one cached L2 table, plain clusters contiguous on the host, one
``preadv(..., RWF_NOWAIT)``; unallocated ranges as zeroes or through the
backing file's own inline read) and :meth:`Qcow2Image.try_pwritev` (the
write engine's lock-free fast path, called without a coroutine).  Measured
in-process on a warm 16 GiB sparse image, 20 000 random 4 KiB requests on
one task (``/tmp`` script, same tree): ``try_preadv`` 3.6 us per read
against 5.0-6.5 us for ``await preadv``; ``try_pwritev`` 11 us per
allocating write (was 22.8 us through ``_write_now`` before the
allocation changes of issue 6, of which ~6-8 us is the extending
``pwritev`` itself) and 9.4 us in place (kernel-bound: a 4 KiB overwrite
of a cached page is 2 us, of a hole in a fresh cluster ~7 us).

Extension points for the write engine:

* ``Qcow2Image.lock`` -- the metadata ``asyncio.Lock`` (qemu ``s->lock``).
  The read path takes it around mapping only when the image is writable, so
  a read never sees a half-updated L2 table; data I/O runs outside it.
* ``Qcow2Image.file`` / ``Qcow2Image.data`` -- the metadata file and the
  file holding data clusters (the same object without an external data file).
* ``Qcow2Image.map`` (:class:`ClusterMap`), ``Qcow2Image.l2_cache``
  (:class:`TableCache` with dirty/dependency support) and ``Qcow2Image.l1``.
* ``Qcow2Image.header`` is replaced (frozen dataclass) when rewritten.
* ``Qcow2Image.close_read_epoch`` / ``reads_in_epoch`` -- every
  :meth:`Qcow2Image.preadv` counts itself in the current read epoch, so the
  engine can hold freed clusters back from reuse while a read that may
  have mapped them is still in flight (``alloc.py`` rule 5).
* :func:`open_image` refuses ``read_only=False`` until the write engine
  provides ``_open_writable``; the hook is the ``writer`` class attribute.
"""

from __future__ import annotations

import asyncio
import errno
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from nbdqcow.backends.base import BlockBackend, Buffer, Capabilities
from nbdqcow.io import HostFile
from nbdqcow.qcow2.cache import TableCache
from nbdqcow.qcow2.cluster import ClusterMap
from nbdqcow.qcow2.geometry import Geometry, div_round_up
from nbdqcow.qcow2.layout import Header
from nbdqcow.qcow2.readpath import DECOMPRESSED_CACHE as DECOMPRESSED_CACHE  # moved
from nbdqcow.qcow2.readpath import ReadPath
from nbdqcow.qcow2.snapshot import SnapshotEntry
from nbdqcow.qcow2.status import BLOCK_STATUS_CLUSTERS as BLOCK_STATUS_CLUSTERS  # moved
from nbdqcow.qcow2.status import BLOCK_STATUS_TABLES as BLOCK_STATUS_TABLES  # moved
from nbdqcow.qcow2.status import BlockStatus

if TYPE_CHECKING:
    from nbdqcow.qcow2.write import WriteEngine

__all__ = ["DEFAULT_L2_CACHE_BYTES", "Qcow2Image", "open_image", "read_header"]

#: qemu's default maximum L2 cache on Linux.
DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024


class Qcow2Image(ReadPath, BlockStatus):
    """An open qcow2 image (read-only).  Create with :func:`open_image`."""

    #: Set by the write engine: ``writer(image)`` finishes a writable open.
    writer: ClassVar[Callable[[Qcow2Image], None] | None] = None

    def __init__(
        self,
        path: str,
        file: HostFile,
        header: Header,
        *,
        read_only: bool,
        l1: array,  # type: ignore[type-arg]
        size: int,
        snapshots: list[SnapshotEntry],
        snapshot: SnapshotEntry | None,
        data: HostFile,
        backing: BlockBackend | None,
        l2_cache_bytes: int | None,
    ) -> None:
        self.path = path
        self.file = file
        self.data = data
        self.header = header
        self.geo = Geometry.from_header(header)
        self.read_only = read_only
        self.l1 = l1
        self._size = size
        self.snapshots = snapshots
        self.snapshot = snapshot
        self.backing = backing
        self.lock = asyncio.Lock()
        cap = DEFAULT_L2_CACHE_BYTES if l2_cache_bytes is None else l2_cache_bytes
        need = max(1, div_round_up(size, self.geo.bytes_per_l2))
        self.l2_cache = TableCache(
            file, self.geo.cluster_size, min(need, max(2, cap // self.geo.cluster_size))
        )
        self.map = ClusterMap(
            self.geo, l1, self.l2_cache, version=header.version, data_file=data is not file
        )
        self._decompressed: OrderedDict[int, bytes] = OrderedDict()
        self._caps = Capabilities(
            read_only=True,
            flush=False,
            fua=False,
            cache=True,
            extents=True,
            multi_conn=True,
            preferred_block=max(4096, self.geo.cluster_size),
        )
        self._closed = False
        #: Read epochs (see :meth:`close_read_epoch`): the current epoch and,
        #: per epoch, the number of reads started in it and still running.
        self._epoch = 0
        self._reading: dict[int, int] = {}
        # Read fast path (see preadv): precomputed shifts and masks.
        self._fast_read = not self.geo.extended_l2
        self._cbits = self.geo.cluster_bits
        self._l1_shift = self.geo.cluster_bits + self.geo.l2_bits
        self._l2_mask = self.geo.l2_entries - 1
        self._cmask = self.geo.cluster_mask
        #: The write engine (:mod:`nbdqcow.qcow2.write`) of a writable image;
        #: the mutating BlockBackend calls delegate to it.
        self.engine: WriteEngine | None = None

    # -- BlockBackend --------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def caps(self) -> Capabilities:
        return self._caps

    @property
    def depth(self) -> int:
        """Number of images in the chain (this one included)."""
        b = self.backing
        if b is None:
            return 1
        return 1 + (b.depth if isinstance(b, Qcow2Image) else 1)


    def try_pwritev(self, offset: int, bufs: Sequence[Buffer], fua: bool) -> bool:
        """:class:`~nbdqcow.backends.base.InlineIO` write: the write engine's
        :meth:`~nbdqcow.qcow2.inline_write.InlineWrites.try_pwritev` (an
        in-place write into COPIED plain clusters, or an allocating write
        into unallocated clusters of a cached L2 table, synchronous, or a
        decline having changed nothing); declines on a read-only image.  A
        writable open binds the engine's method over this one on the
        instance (``writable.attach``), so the server's call reaches it
        without this frame."""
        engine = self.engine
        return engine is not None and engine.try_pwritev(offset, bufs, fua)

    async def pwritev(self, offset: int, bufs: Sequence[Buffer], *, fua: bool = False) -> None:
        if self.engine is None:
            raise OSError(errno.EROFS, "qcow2 image is open read-only")
        await self.engine.pwritev(offset, bufs, fua=fua)

    async def flush(self) -> None:
        if self.engine is not None:
            await self.engine.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self.engine is None:
            raise OSError(errno.EROFS, "qcow2 image is open read-only")
        await self.engine.trim(offset, length, fua=fua)

    async def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        if self.engine is None:
            raise OSError(errno.EROFS, "qcow2 image is open read-only")
        await self.engine.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.engine is not None:
                await self.engine.close()
        finally:
            self.close_files()
        if self.backing is not None:
            await self.backing.aclose()

    def close_files(self) -> None:
        if self.data is not self.file:
            self.data.close()
        self.file.close()



# The open path lives in its own module, which needs Qcow2Image: imported
# last (the package __init__ imports this module first, so the cycle
# always resolves here).
from nbdqcow.qcow2.opening import open_image, read_header  # noqa: E402

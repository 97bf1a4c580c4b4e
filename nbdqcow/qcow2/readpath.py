"""The read path of :class:`~nbdqcow.qcow2.image.Qcow2Image` (qemu
``qcow2_co_preadv_part``), as the :class:`ReadPath` mixin.

Implements qcow2.txt "Host cluster management" / "Cluster mapping" for
reads, through :mod:`~nbdqcow.qcow2.cluster`: the request is mapped to
runs and each run is served with one vectored read straight into slices of
the caller's buffers; zero runs are filled in place; unallocated runs
recurse into the backing backend (zeroes past its end); compressed
clusters (qcow2.txt "Compressed Clusters Descriptor") are decompressed
through a small cache of recent clusters.

Also here: the synchronous :class:`~nbdqcow.backends.base.InlineIO` read
(:meth:`ReadPath.try_preadv`, issue 6) and the read epochs that keep freed
clusters from being reused under a read in flight (QCOW2.md section 7,
rule 5; ``alloc.py``).
"""

from __future__ import annotations

import asyncio
import os
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from nbdqcow.backends.base import BlockBackend
from nbdqcow.backends.raw import RawBackend
from nbdqcow.errors import CorruptImage
from nbdqcow.io import HostFile
from nbdqcow.qcow2.cache import CachedTable, TableCache
from nbdqcow.qcow2.cluster import ClusterMap, Run
from nbdqcow.qcow2.compress import decompress_cluster
from nbdqcow.qcow2.entries import SubclusterType
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.layout import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COPIED, Header

__all__ = ["DECOMPRESSED_CACHE", "ReadPath"]

#: Decompressed clusters kept (sequential reads of a compressed cluster in
#: small requests decompress it once).
DECOMPRESSED_CACHE = 4
#: Decompress in a worker thread from this cluster size on.
_THREAD_DECOMPRESS = 256 * 1024

_ZEROS = memoryview(bytes(1024 * 1024))
#: Bits that make an L2 entry anything but a plain standard cluster.
_NOT_PLAIN = 0xFFFF_FFFF_FFFF_FFFF & ~(L2E_OFFSET_MASK | OFLAG_COPIED)
#: Per cluster size (indexed by cluster bits): the bits that make an L2
#: entry anything but a plain standard cluster at an aligned host offset
#: (``_NOT_PLAIN`` plus the offset bits inside a cluster), for
#: ``try_preadv``'s one test.
_REJECT = tuple(_NOT_PLAIN | (L2E_OFFSET_MASK & ((1 << b) - 1)) for b in range(64))


def _zero(views: Sequence[memoryview], start: int = 0) -> None:
    """Zero ``views`` from logical position ``start`` on, without allocating."""
    pos = 0
    for v in views:
        n = len(v)
        lo = max(0, start - pos)
        while lo < n:
            k = min(n - lo, len(_ZEROS))
            v[lo : lo + k] = _ZEROS[:k]
            lo += k
        pos += n


class _Slicer:
    """Hands out consecutive slices of a list of buffers."""

    __slots__ = ("_bufs", "_i", "_off")

    def __init__(self, bufs: Sequence[memoryview]) -> None:
        self._bufs = bufs
        self._i = 0
        self._off = 0

    def take(self, n: int) -> list[memoryview]:
        out: list[memoryview] = []
        while n > 0:
            b = self._bufs[self._i]
            avail = len(b) - self._off
            if avail == 0:
                self._i += 1
                self._off = 0
                continue
            k = min(avail, n)
            out.append(b[self._off : self._off + k] if k != len(b) else b)
            self._off += k
            n -= k
        return out



class ReadPath:
    """Reads of a qcow2 image; mixed into :class:`~nbdqcow.qcow2.image.Qcow2Image`,
    whose ``__init__`` sets the attributes declared here."""

    data: HostFile
    header: Header
    geo: Geometry
    l1: array  # type: ignore[type-arg]
    l2_cache: TableCache
    map: ClusterMap
    backing: BlockBackend | None
    _size: int
    _decompressed: OrderedDict[int, bytes]
    _epoch: int
    _reading: dict[int, int]
    _fast_read: bool
    _cbits: int
    _l1_shift: int
    _l2_mask: int
    _cmask: int

    async def _runs(self, offset: int, length: int) -> list[Run]:
        # No metadata lock, even on a writable image: the mapper reads each
        # L2 table's entries without suspending, and writers change entries
        # only between their own suspension points, after the data they
        # point at is written; freed clusters are released only at a flush,
        # and not while a read that may have mapped them runs (read epochs).
        return await self.map.runs(offset, length)

    async def preadv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in bufs)
        if total == 0:
            return
        assert offset >= 0 and offset + total <= self._size
        # Register in the current read epoch for the whole read, mapping
        # included (see :meth:`close_read_epoch`): two dict operations, no
        # lock.
        epoch = self._epoch
        reading = self._reading
        reading[epoch] = reading.get(epoch, 0) + 1
        try:
            cbits = self._cbits
            if self._fast_read and offset >> cbits == (offset + total - 1) >> cbits:
                # One cluster whose L2 table is cached and whose entry is a
                # plain standard cluster (no flag but COPIED, no reserved
                # bit, aligned): one positional read, no run list.  Anything
                # else -- and every validation error -- takes the general
                # path below.
                l2off = self.map.l2_table_offset(offset >> self._l1_shift)
                entries = self.l2_cache.peek(l2off) if l2off else None
                if entries is not None:
                    e = entries[(offset >> cbits) & self._l2_mask]
                    host = e & L2E_OFFSET_MASK
                    if host and not e & _NOT_PLAIN and not host & self._cmask:
                        got = await self.data.preadv(host + (offset & self._cmask), bufs)
                        if got < total:
                            _zero(bufs, got)  # past the end of the file: zeroes, as qemu
                        return
            await self.read_runs(await self._runs(offset, total), bufs)
        finally:
            left = reading[epoch] - 1
            if left:
                reading[epoch] = left
            else:
                del reading[epoch]

    # -- InlineIO (issue 6): the synchronous fast path ------------------------------
    def try_preadv(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        """:class:`~nbdqcow.backends.base.InlineIO` read: guest bytes that map
        to one run of plain standard clusters (host clusters following each
        other) inside one cached L2 table, read with one ``preadv(...,
        RWF_NOWAIT)`` (plain on tmpfs: ``HostFile.inline_read_flags``); or
        to unallocated clusters with no backing file (zeroes).  An uncached
        table is loaded inline when the page cache has it and the cache
        has room without a write-back (:meth:`_load_l2_now`).  Anything
        else -- a table that cannot be, compressed, zero-flag or backing
        clusters, an entry the general path would reject, a page-cache miss
        (``BlockingIOError``), a short read (past the end of the file, or
        only partly cached) -- declines, and the async :meth:`preadv` sorts
        it out.

        No read-epoch registration (:meth:`close_read_epoch`): epochs exist
        for reads that map clusters and then *suspend* before their data
        arrives, during which a flush could release a cluster they mapped
        and an allocating write reuse it.  This method maps and reads in
        one synchronous step on the event-loop thread, with no ``await``:
        every cluster release and reuse also happens on that thread
        (``Metadata.release_parked`` and the engine's writes), so none can
        fall between the mapping and the read.  Nor does it take
        :attr:`lock`: writers change L2 entries only between their own
        suspension points and after the data the new entry points at is
        written, so a synchronous look sees either the old mapping (old
        data still there, since nothing is reused while it is linked or
        parked) or the new one (new data written).
        """
        # Issue 6: ordered for a 4 KiB read inside one cached cluster --
        # one shift for the cluster index, TableCache.peek's steps inline,
        # one mask test for the entry.  callgrind, 100k calls on a cached
        # 256 MiB image (tmpfs) minus the calling loop: 11.3k -> 9.7k
        # instructions per call (the raw backend's: 3.1k, 1.7k of them
        # the preadv call itself).
        if len(bufs) == 1:
            total = len(bufs[0])
        else:
            total = 0
            for b in bufs:
                total += len(b)
        if total == 0:
            return True
        data = self.data
        flags = data.inline_read_flags
        if flags is None or not self._fast_read:
            return False
        cbits = self._cbits
        ci = offset >> cbits  # the first guest cluster
        n = ((offset + total - 1) >> cbits) - ci  # clusters after it
        l1_shift = self._l1_shift
        l1i = offset >> l1_shift
        if n and (offset + total - 1) >> l1_shift != l1i:
            return False  # across two L2 tables
        l1 = self.l1
        # ClusterMap.l2_table_offset without its checks: a table offset is
        # only ever cached after they passed (the mapper validates before
        # it loads, the engine allocates aligned tables), so a hit in the
        # cache is a valid table; a miss runs them (_load_l2_now) before it
        # reads anything.
        l2off = l1[l1i] & L1E_OFFSET_MASK if l1i < len(l1) else 0
        if not l2off:
            return self._try_below(offset, total, bufs)
        # TableCache.peek without its call (the LRU refresh and the hit
        # count included).
        cache = self.l2_cache
        tables = cache.tables
        t = tables.get(l2off)
        if t is None:
            t = self._load_l2_now(l1i, l2off)
            if t is None:
                return False
        else:
            tables.move_to_end(l2off)
            cache.hits += 1
        entries = t.entries
        i = ci & self._l2_mask
        e = entries[i]
        # One mask for "a plain standard cluster, aligned": no flag but
        # COPIED, no reserved bit, no offset bit inside the cluster (the
        # three tests of the general path's entry checks, fused).
        if e & _REJECT[cbits]:
            return False
        host = e & L2E_OFFSET_MASK
        if not host:
            if e:
                return False  # COPIED without an offset: the general path's to judge
            for k in range(1, n + 1):
                if entries[i + k] != 0:
                    return False
            return self._try_below(offset, total, bufs)
        if n:
            # Later clusters must simply continue the run: the same flags
            # (COPIED or not) and the next host cluster (whose offset must
            # not carry into the reserved bits).
            csize = 1 << cbits
            if host + (n + 1) * csize > L2E_OFFSET_MASK + 1:
                return False
            for k in range(1, n + 1):
                if entries[i + k] != e + k * csize:
                    return False
        try:
            got = os.preadv(data.fd, bufs, host + (offset & self._cmask), flags)
        except OSError:  # BlockingIOError; EOPNOTSUPP/EINVAL: no RWF_NOWAIT here
            return False
        return got == total

    def _load_l2_now(self, l1i: int, l2off: int) -> CachedTable | None:
        """:meth:`try_preadv`'s L2 miss: the table at ``l2off`` (L1 entry
        ``l1i``) loaded synchronously by :meth:`TableCache.load_now`, or
        ``None`` (decline).

        Issue 6: on "randread-huge" (a 1 TiB image, 128 MiB of L2 tables, a
        32 MiB cache) most reads miss, and declining sent each of them
        through a task and the async load: 55 us of server CPU per read
        against 8.8 us for a cached one.  The L1 entry first passes the
        mapper's own checks (:meth:`ClusterMap.l2_table_offset`, the very
        function, not a copy): an entry it would refuse declines here, so
        the async path raises the same :class:`CorruptImage` as before.  A
        table past the end of the file reads short and declines too (the
        async load reports it).
        """
        try:
            if self.map.l2_table_offset(l1i) != l2off:
                return None
        except CorruptImage:
            return None
        return self.l2_cache.load_now(l2off)

    def _try_below(self, offset: int, total: int, bufs: Sequence[memoryview]) -> bool:
        """Unallocated guest range: zeroes without a backing file, else the
        backing file's own inline read when the range lies inside it (a
        backing file is read-only, so it has no epochs to honour either)."""
        b = self.backing
        if b is None:
            _zero(bufs)
            return True
        if offset + total > b.size or not isinstance(b, ReadPath | RawBackend):
            return False
        return b.try_preadv(offset, bufs)


    # -- read epochs (freed clusters vs reads in flight) -------------------------
    def close_read_epoch(self) -> int:
        """End the current read epoch and return its number.

        A read maps guest offsets to host clusters and then awaits its data
        (possibly in a thread, on a page-cache miss).  The write engine
        unlinks a cluster from the L2 tables and, at the next flush, drops
        its refcount -- after which an allocating write may reuse it.  A
        read that mapped the cluster before the unlink would then return
        another guest offset's data.  qemu prevents this by serialising
        requests; here the engine closes an epoch when it is about to free
        clusters and frees them only once :meth:`reads_in_epoch` says no
        read that started in that epoch or before is still in flight.
        Reads that start later cannot reach the clusters: the unlink came
        first.
        """
        epoch = self._epoch
        self._epoch = epoch + 1
        return epoch

    def reads_in_epoch(self, epoch: int) -> bool:
        """True while a read that started in ``epoch`` or earlier is in
        flight (the dict holds one key per epoch with reads: a handful)."""
        return any(e <= epoch for e in self._reading)

    async def read_runs(self, runs: list[Run], bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` from already mapped ``runs`` (the write engine calls
        this for copy-on-write reads while it holds :attr:`lock`)."""
        slicer = _Slicer(bufs)
        for run in runs:
            views = slicer.take(run.length)
            typ = run.type
            if typ is SubclusterType.NORMAL:
                got = await self.data.preadv(run.host, views)
                if got < run.length:
                    # Past the end of the file: qemu reads zeroes there too.
                    _zero(views, got)
            elif typ is SubclusterType.COMPRESSED:
                data = await self._decompress(run.host, run.guest)
                at = run.guest & self.geo.cluster_mask
                src = memoryview(data)
                for v in views:
                    v[:] = src[at : at + len(v)]
                    at += len(v)
            elif typ.reads_backing:
                await self._read_backing(run.guest, run.length, views)
            else:
                _zero(views)

    async def _read_backing(self, guest: int, length: int, views: list[memoryview]) -> None:
        b = self.backing
        if b is None or guest >= b.size:
            _zero(views)
            return
        inside = min(length, b.size - guest)
        if inside == length:
            await b.preadv(guest, views)
            return
        # A backing file shorter than this image: zeroes past its end.
        sl = _Slicer(views)
        await b.preadv(guest, sl.take(inside))
        _zero(sl.take(length - inside))

    async def _decompress(self, entry: int, guest: int) -> bytes:
        hit = self._decompressed.get(entry)
        if hit is not None:
            self._decompressed.move_to_end(entry)
            return hit
        host, nbytes = self.geo.compressed_range(entry)
        fsize = self.data.size()
        where = f" at guest offset {guest & ~self.geo.cluster_mask:#x} (host {host:#x})"
        if host < self.geo.cluster_size or host >= fsize:
            raise CorruptImage(f"compressed cluster{where} lies outside the image file")
        buf = bytearray(min(nbytes, fsize - host))
        got = await self.data.preadv(host, [memoryview(buf)])
        cs, ctype = self.geo.cluster_size, self.header.compression_type
        src = memoryview(buf)[:got]
        if cs >= _THREAD_DECOMPRESS:
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(
                None, lambda: decompress_cluster(src, cs, ctype, where=where)
            )
        else:
            out = decompress_cluster(src, cs, ctype, where=where)
        self._decompressed[entry] = out
        if len(self._decompressed) > DECOMPRESSED_CACHE:
            self._decompressed.popitem(last=False)
        return out


"""Write-zeroes and trim of the qcow2 write engine (:class:`Zeroing`):
qemu's ``qcow2_co_pwrite_zeroes``/``qcow2_co_pdiscard`` and
``zero_in_l2_slice``, ``zero_l2_subclusters``, ``discard_in_l2_slice``, on
qcow2.txt "Cluster mapping" (the zero flag of v3 standard L2 entries, the
zero bits of extended L2 subcluster bitmaps), with the release rules of
QCOW2.md section 7 (rule 4: unlink, sync, then decrement).

Write-zeroes on v3 is metadata-only for whole clusters (zero flag, or all
subcluster zero bits; the host cluster is kept as ZERO_ALLOC unless the
client allows unmapping) and, with extended L2 entries, for whole
subclusters of a cluster that is neither compressed nor shared (zero bits
set, allocation bits cleared); the rest is written as zeroes, and a
FAST_ZERO request that would need such data writes fails with ``ENOTSUP``
before changing anything.  v2 has no zero flag: whole clusters can only be
unallocated, which reads as zeroes only without a backing file.  Trim
releases whole clusters (reads as zeroes afterwards on v3; on v2 the backing
file shows through, which NBD allows since reads stay stable).
"""

from __future__ import annotations

import errno

from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2.data_write import DataWrites
from nbdqcow.qcow2.engine import HOSTED
from nbdqcow.qcow2.entries import L2_BITMAP_ALL_ALLOC, L2_BITMAP_ALL_ZERO, ClusterType, classify
from nbdqcow.qcow2.iovecs import Split, zero_views
from nbdqcow.qcow2.layout import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO

__all__ = ["Zeroing"]


class Zeroing(DataWrites):
    """Write-zeroes and trim (data fallbacks through :class:`DataWrites`)."""

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:  # fmt: skip
        assert offset >= 0 and offset + length <= self.img.size
        if length == 0:
            return
        async with self.img.lock:
            self._usable()
            try:
                await self._zero_locked(offset, length, may_trim=may_trim, fast=fast)
                if fua:
                    await self.meta.flush()
            except CorruptImage as exc:
                self._fail(exc)
                raise

    def _whole(self, offset: int, end: int) -> tuple[int, int]:
        """The whole clusters of ``[offset, end)``; the last cluster of the
        disk counts as whole when the range reaches the end of the disk."""
        cs = self.cs
        a = -(-offset // cs) * cs
        b = (end // cs) * cs
        if end == self.img.size:
            b = -(-end // cs) * cs
        return a, max(a, b)

    def _v2_can_unmap(self, a: int, b: int, may_trim: bool) -> bool:
        return may_trim and not any(self._backing_visible(c) for c in range(a, b, self.cs))

    async def _zero_locked(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        end = offset + length
        a, b = self._whole(offset, end)
        partial = [(offset, min(a, end))] if offset < a else []
        if b < end and b >= a:
            partial.append((b, end))
        if a >= b and not partial:
            partial = [(offset, end)]
        metadata_only = self.v3 or self._v2_can_unmap(a, b, may_trim)
        # With extended L2 the subcluster-aligned middle of a partial
        # cluster can be zeroed through its bitmap (qemu
        # ``zero_l2_subclusters``); only the unaligned edges need data.
        data: list[tuple[int, int]] = []
        subs: list[tuple[int, int]] = []
        for lo, hi in partial:
            if self.ext:
                sc = self.geo.subcluster_size
                lo_sc = -(-lo // sc) * sc
                hi_sc = -(-hi // sc) * sc if hi == self.img.size else hi // sc * sc
                if lo_sc < hi_sc:
                    data += [(x, y) for x, y in ((lo, lo_sc), (hi_sc, hi)) if x < y]
                    subs.append((lo_sc, hi_sc))
                    continue
            data.append((lo, hi))
        if fast:
            if data or (a < b and not metadata_only):
                raise OSError(errno.ENOTSUP, "zeroing this range needs data writes (not fast)")
            for lo, _hi in subs:
                if not await self._bitmap_zero_possible(lo):
                    raise OSError(errno.ENOTSUP, "zeroing part of a shared or compressed "
                                  "cluster needs data writes (not fast)")  # fmt: skip
        for lo, hi in data:
            await self._write_zeroes(lo, hi)
        for lo, hi in subs:
            if not await self._zero_subclusters(lo, hi):
                await self._write_zeroes(lo, min(hi, self.img.size))
        if a >= b:
            return
        if not metadata_only:
            await self._write_zeroes(a, min(b, self.img.size))
            return
        for c in range(a, b, self.cs):
            await self._zero_cluster(c, keep=not may_trim, trim=False)

    def _bitmap_zero_ok(self, e: int) -> bool:
        """Can subclusters of the cluster with entry ``e`` be zeroed through
        the bitmap?  Not when compressed (no bitmap) or shared (the zero
        bits would change what a snapshot reads)."""
        ctype = classify(e, extended_l2=True)
        if ctype is ClusterType.COMPRESSED:
            return False
        return not (e & L2E_OFFSET_MASK) or bool(e & OFLAG_COPIED)

    async def _bitmap_zero_possible(self, guest: int) -> bool:
        l1i = self.geo.l1_index(guest)
        l2 = self.img.map.l2_table_offset(l1i)
        if not l2:
            return True
        # A table shared with a snapshot is copied before the change; its
        # entries then say whether their clusters are shared (no COPIED).
        async with self.img.l2_cache.table(l2) as t:
            return self._bitmap_zero_ok(t.entries[self._slot(self.geo.l2_index(guest))])

    async def _zero_subclusters(self, lo: int, hi: int) -> bool:
        """Set the zero bits (and clear the allocation bits) of the
        subclusters in ``[lo, hi)``, inside one cluster.  False when the
        cluster cannot take it (see :meth:`_bitmap_zero_ok`)."""
        geo = self.geo
        cstart = lo & ~geo.cluster_mask
        if not await self._bitmap_zero_possible(lo):
            return False
        if not self.img.map.l2_table_offset(geo.l1_index(lo)) and not self._backing_visible(lo):
            return True  # nothing mapped and nothing below: reads zeroes already
        t = await self.meta.writable_l2(geo.l1_index(lo))
        try:
            slot = self._slot(geo.l2_index(lo))
            e, bitmap = t.entries[slot], t.entries[slot + 1]
            self._check_entry(e, cstart)
            bits = geo.subcluster_bits
            first, last = (lo - cstart) >> bits, ((hi - 1 - cstart) >> bits)
            mask = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
            new = (bitmap & ~mask & L2_BITMAP_ALL_ALLOC) | (bitmap & L2_BITMAP_ALL_ZERO)
            new |= mask << 32
            if new != bitmap:
                t.entries[slot + 1] = new
                self.meta.dirty(t)
            return True
        finally:
            self.img.l2_cache.put(t)

    async def _write_zeroes(self, lo: int, hi: int) -> None:
        await self._write_range(lo, hi, Split(zero_views(hi - lo)))

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        assert offset >= 0 and offset + length <= self.img.size
        async with self.img.lock:
            self._usable()
            try:
                if not self.v3 and self.img.backing is not None:
                    # v2 cannot say "zero"; releasing would let the backing
                    # file show through.  qemu ignores such discards too.
                    return
                a, b = self._whole(offset, offset + length)
                for c in range(a, b, self.cs):
                    await self._zero_cluster(c, keep=False, trim=True)
                if fua:
                    await self.meta.flush()
            except CorruptImage as exc:
                self._fail(exc)
                raise

    async def _zero_cluster(self, cstart: int, *, keep: bool, trim: bool) -> None:
        """Make one whole cluster read as zeroes (or, for trim, release it)
        by changing its L2 entry only."""
        geo = self.geo
        l1i, l2i = geo.l1_index(cstart), geo.l2_index(cstart)
        backing = self._backing_visible(cstart)
        if not self.img.l1[l1i] & L1E_OFFSET_MASK and not backing:
            return  # no L2 table and nothing below: reads zeroes already
        cache = self.img.l2_cache
        t = await self.meta.writable_l2(l1i)
        try:
            slot = self._slot(l2i)
            e = t.entries[slot]
            bitmap = t.entries[slot + 1] if self.ext else 0
            self._check_entry(e, cstart)
            ctype = classify(e, extended_l2=self.ext)
            host = e & L2E_OFFSET_MASK
            own = ctype in HOSTED and bool(e & OFLAG_COPIED) and host != 0
            keep = keep and own and not trim
            if keep:
                new = host | OFLAG_COPIED | (0 if self.ext else OFLAG_ZERO)
                new_bitmap = L2_BITMAP_ALL_ZERO
            elif trim and not (self.v3 and backing):
                new, new_bitmap = 0, 0
            elif self.v3:
                new = 0 if self.ext else OFLAG_ZERO
                new_bitmap = L2_BITMAP_ALL_ZERO
            else:
                new, new_bitmap = 0, 0  # v2 without backing data: unallocated reads zero
            if new == e and (not self.ext or new_bitmap == bitmap):
                return
            t.entries[slot] = new
            if self.ext:
                t.entries[slot + 1] = new_bitmap
            if not keep and (host or ctype is ClusterType.COMPRESSED):
                self.meta.free_entry(e)
            self.meta.dirty(t)
        finally:
            cache.put(t)

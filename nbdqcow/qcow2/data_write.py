"""The locked data path of the qcow2 write engine (:class:`DataWrites`):
every guest write the lock-free fast path (:mod:`~nbdqcow.qcow2.inline_write`)
declines, one L2 table at a time, under ``Qcow2Image.lock``.

Mirrors qemu's ``block/qcow2-cluster.c`` (``handle_copied``,
``handle_alloc``, ``perform_cow``, ``qcow2_alloc_cluster_link_l2``) on
qcow2.txt "Cluster mapping" (standard and extended L2 entries, COPIED,
compressed and zero clusters), following the ordering rules of QCOW2.md
section 7 (:mod:`~nbdqcow.qcow2.alloc`): data before the L2 entry that
points at it, old clusters released only through ``pending_free``.

Per guest cluster a write is one of:

* **in place** -- a standard cluster with COPIED (refcount 1): one
  ``pwritev`` of the caller's buffers at the host offset, no metadata change
  and no sync (the plain data path);
* **materialise** -- the cluster must keep reading what it read outside the
  written bytes: a ZERO_ALLOC cluster, an extended-L2 cluster whose touched
  subclusters are not all allocated, or anything needing a new cluster
  (unallocated, zero, compressed, shared with a snapshot).  The rest of the
  cluster is read through the image's own read path *before* anything
  changes (backing file, zeroes, decompressed or shared data: the COW
  head and tail), and head + guest buffers + tail go out as one vectored
  write; then the L2 entry is updated (``offset | COPIED``, all subclusters
  allocated) and the old cluster is queued for release.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdqcow.qcow2.cache import CachedTable
from nbdqcow.qcow2.engine import HOSTED, EngineBase
from nbdqcow.qcow2.entries import L2_BITMAP_ALL_ALLOC, ClusterType, classify
from nbdqcow.qcow2.iovecs import Split, all_zero, zero_views
from nbdqcow.qcow2.layout import L2E_OFFSET_MASK, OFLAG_COPIED

__all__ = ["DataWrites"]

#: How a cluster is written (see the module docstring).
_IN_PLACE, _FILL, _ALLOC = "in-place", "fill", "alloc"


@dataclass(slots=True)
class _Step:
    kind: str
    cstart: int
    off_in: int
    n: int
    slot: int
    entry: int
    ctype: ClusterType


class DataWrites(EngineBase):
    """Locked guest writes (COW, fills, allocation) of the write engine."""

    def _subclusters_allocated(self, bitmap: int, off_in: int, n: int) -> bool:
        bits = self.geo.subcluster_bits
        first, last = off_in >> bits, (off_in + n - 1) >> bits
        want = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
        return bitmap & want == want

    async def _write_range(self, pos: int, end: int, split: Split) -> None:
        """Write guest ``[pos, end)`` from ``split``, one L2 table at a time."""
        geo = self.geo
        while pos < end:
            l1i = geo.l1_index(pos)
            stop = min(end, (l1i + 1) * geo.bytes_per_l2)
            t = await self.meta.writable_l2(l1i)
            try:
                await self._write_in_table(t, pos, stop, split)
            finally:
                self.img.l2_cache.put(t)
            pos = stop

    def _plan(self, t: CachedTable, pos: int, stop: int) -> list[list[_Step]]:
        """Classify each cluster of ``[pos, stop)`` (one L2 table) and group
        neighbours that can share one vectored write: in-place clusters
        whose host clusters follow each other, and clusters to allocate
        (which get one contiguous host run: qemu's ``handle_alloc``)."""
        groups: list[list[_Step]] = []
        cs = self.cs
        while pos < stop:
            cstart = pos & ~self.geo.cluster_mask
            cend = min(stop, cstart + cs)
            slot = self._slot(self.geo.l2_index(cstart))
            e = t.entries[slot]
            bitmap = t.entries[slot + 1] if self.ext else 0
            self._check_entry(e, cstart)
            ctype = classify(e, extended_l2=self.ext)
            host = e & L2E_OFFSET_MASK
            off_in, n = pos - cstart, cend - pos
            if ctype in HOSTED and e & OFLAG_COPIED and host:
                self.meta.check_data_cluster(host, cstart)
                plain = ctype is ClusterType.NORMAL and (
                    not self.ext or self._subclusters_allocated(bitmap, off_in, n)
                )
                kind = _IN_PLACE if plain else _FILL
            else:
                kind = _ALLOC
            step = _Step(kind, cstart, off_in, n, slot, e, ctype)
            last = groups[-1][-1] if groups else None
            if last is not None and last.kind == kind and kind != _FILL and (
                kind == _ALLOC
                or (last.entry & L2E_OFFSET_MASK) + cs == host
            ):
                groups[-1].append(step)
            else:
                groups.append([step])
            pos = cend
        return groups

    async def _write_in_table(self, t: CachedTable, pos: int, stop: int, split: Split) -> None:
        groups = self._plan(t, pos, stop)
        # Clusters this request allocates or fills are off limits to the
        # lock-free fast path until they are linked (rule 10): the plan
        # below stays valid across the awaits of the COW reads.
        mine = [s.cstart for g in groups for s in g if s.kind != _IN_PLACE]
        busy = self._busy
        for c in mine:
            busy[c] = busy.get(c, 0) + 1
        try:
            await self._write_groups(t, groups, split)
        finally:
            for c in mine:
                if busy[c] == 1:
                    del busy[c]
                else:
                    busy[c] -= 1

    async def _write_groups(self, t: CachedTable, groups: list[list[_Step]], split: Split) -> None:
        file = self.img.file
        cs = self.cs
        for group in groups:
            first, last = group[0], group[-1]
            views = split.take(sum(s.n for s in group))
            if first.kind == _IN_PLACE:
                # The plain data path: no metadata, no sync.
                await file.pwritev((first.entry & L2E_OFFSET_MASK) + first.off_in, views)
                continue
            # Read what must survive around the new data *before* any
            # entry changes (COW head of the first cluster, tail of the last).
            head = await self._old(first.cstart, 0, first.off_in)
            tail = await self._old(last.cstart, last.off_in + last.n, cs)
            if first.kind == _FILL:
                target = first.entry & L2E_OFFSET_MASK
                await file.pwritev(target, [*head, *views, *tail])
            else:
                meta = self.meta
                target, fresh = meta.alloc_fresh(len(group))
                try:
                    await self._write_new(target, fresh, head, views, tail, first.off_in,
                                          len(group))
                except BaseException:
                    # Not linked yet: give the clusters back (a failed data
                    # write must not leak them).
                    meta.rc.update_range(target, len(group) * cs, -1)
                    raise
            for k, st in enumerate(group):
                t.entries[st.slot] = (target + k * cs) | OFLAG_COPIED
                if self.ext:
                    t.entries[st.slot + 1] = L2_BITMAP_ALL_ALLOC
                if st.kind == _ALLOC and (
                    st.entry & L2E_OFFSET_MASK or st.ctype is ClusterType.COMPRESSED
                ):
                    self.meta.free_entry(st.entry)
            self.meta.dirty(t)

    async def _write_new(self, target: int, fresh: bool, head: list[memoryview],
                         views: list[memoryview], tail: list[memoryview], off_in: int,
                         count: int) -> None:
        """Write the data of ``count`` newly allocated clusters at ``target``."""
        if fresh and all_zero(head) and all_zero(tail):
            # A fresh run already reads as zeroes (qemu avoids writing zero
            # COW with ``handle_alloc_space``): write the guest data only;
            # the file is extended over the whole run, so every referenced
            # cluster lies inside it, before the fdatasync that must precede
            # the L2 update (rule 3; Metadata.extend_file).
            await self.img.file.pwritev(target + off_in, views)
            if tail:
                meta = self.meta
                meta.want_eof = max(meta.want_eof, target + count * self.img.geo.cluster_size)
        else:
            await self.img.file.pwritev(target, [*head, *views, *tail])

    async def _old(self, cstart: int, lo: int, hi: int) -> list[memoryview]:
        """What guest ``[cstart+lo, cstart+hi)`` reads now (COW source)."""
        if hi <= lo:
            return []
        size = self.img.size
        start, stop = cstart + lo, min(cstart + hi, size)
        if stop <= start:
            return zero_views(hi - lo)
        runs = await self.img.map.runs(start, stop - start)
        if all(
            r.type.reads_zero or (r.type.reads_backing and not self._backing_visible(r.guest))
            for r in runs
        ):
            return zero_views(hi - lo)
        buf = bytearray(stop - start)
        await self.img.read_runs(runs, [memoryview(buf)])
        return [memoryview(buf), *zero_views(cstart + hi - stop)]

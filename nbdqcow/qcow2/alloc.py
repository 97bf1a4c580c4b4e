"""Metadata side of the write engine: refcounts, deferred frees, writable
L2 tables, header rewrites, overlap checks and the flush order.

Mirrors the allocation half of qemu's ``block/qcow2-cluster.c``
(``l2_allocate``, ``qcow2_alloc_cluster_link_l2``, ``free_any_cluster``) and
``qcow2_write_caches``/``qcow2_flush_caches``, with the rules of QCOW2.md
section 7:

1. *Refcount before reference*: refcount changes stay in memory (dirty
   blocks); a dirty L2 table carries a dependency on them
   (``TableCache.set_dependency``, qemu's
   ``qcow2_cache_set_dependency(l2_table_cache, refcount_block_cache)``) and
   an ``fdatasync`` barrier (``set_depends_on_flush``), so whenever the L2
   cache writes a table -- at flush or on eviction -- the refcount blocks are
   written and synced first.
2. *Content before pointer*: a new L2 table is written and synced before
   the L1 entry that points at it.  A brand-new (all-zero) table is linked
   in memory only and marked dirty; :meth:`Metadata.flush` writes it
   (behind rules 1 and 3), syncs, and only then writes its L1 entry
   (:attr:`Metadata.l1_dirty`), so allocating a table costs no sync of
   its own (a table copied from a snapshot's is still written, synced and
   linked at once).  A new refcount block is handled the same way: written
   with the dirty blocks, its reftable entry after a sync
   (:meth:`Metadata.write_refcounts`), and before any L2 table or L1 entry
   that refers to a cluster it counts.
3. *COW data before L2*: the same ``depends_on_flush`` covers data written
   into a new cluster.
4. *Unlink before decrement*: a cluster (or L2 table) dropped from the
   metadata is only queued (:attr:`Metadata.pending_free`); its refcount is
   decremented after the L2/L1 change is on disk and synced, at
   :meth:`Metadata.flush`.  Until then it keeps its count, so the allocator
   cannot hand it out again (rules 5 and 6).
5. *No reuse under a reader*: a read maps guest offsets to host clusters,
   then awaits the data.  Clusters released at a flush are parked with the
   read epoch the flush closes (:meth:`Qcow2Image.close_read_epoch`) and
   decremented only when no read from that epoch or before is in flight
   -- at that flush if possible, else at a later allocation or flush -- so
   an in-flight read never sees a reused cluster's new data.  qemu gets
   the same guarantee from request serialisation; this costs the read
   path two dict operations and no lock.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import replace

from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2.cache import CachedTable, TableCache
from nbdqcow.qcow2.image import Qcow2Image
from nbdqcow.qcow2.layout import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    Header,
    IncompatFeature,
)
from nbdqcow.qcow2.refcount import Refcounts

__all__ = ["Metadata"]

_U64 = struct.Struct(">Q")
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


class _RefcountFlusher(TableCache):
    """Presents the refcount blocks to the L2 cache as the cache it depends
    on: the L2 cache calls :meth:`flush` before writing any dirty table."""

    def __init__(self, meta: Metadata) -> None:
        super().__init__(meta.f, meta.cs, 2, name="refcount block")
        self.meta = meta

    async def write_back(self) -> None:
        await self.meta.write_refcounts()

    async def flush(self) -> None:
        # No sync after it: the L2 cache's depends_on_flush barrier follows.
        await self.meta.write_refcounts()


class Metadata:
    """Mutable metadata state of one writable image (used under its lock)."""

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img
        self.f = img.file
        #: held by :meth:`write_refcounts` from its first write to its last
        self._refcount_writer = asyncio.Lock()
        self.geo = img.geo
        self.cs = img.geo.cluster_size
        self.ext = img.geo.extended_l2
        h = img.header
        self.rc = Refcounts(
            img.file,
            cluster_bits=h.cluster_bits,
            refcount_order=h.refcount_order,
            table_offset=h.refcount_table_offset,
            table_clusters=h.refcount_table_clusters,
            switch_table=self._switch_reftable,
        )
        #: (host offset, bytes) whose clusters lose one reference once the
        #: unlinking metadata is durable.
        self.pending_free: list[tuple[int, int]] = []
        #: Released (durably unlinked) batches waiting for the reads of
        #: their epoch to finish: (epoch, [(host offset, bytes), ...]).
        self.parked: list[tuple[int, list[tuple[int, int]]]] = []
        #: L1 indexes whose (new) L2 table is linked in memory only; the
        #: next :meth:`flush` writes them after syncing the tables.
        self.l1_dirty: set[int] = set()
        #: The file must reach at least this size before the next barrier
        #: (see :meth:`extend_file`).
        self.want_eof = 0
        #: The refcount blocks as the L2 cache's dependency (rule 1).
        self.rc_flusher: TableCache = _RefcountFlusher(self)
        self._ranges_of: Header | None = None
        self._ranges = (0, 0, 0, 0, 0, 0)
        #: host offsets of the active L2 tables (overlap checks).
        self.l2_tables = {e & L1E_OFFSET_MASK for e in img.l1 if e & L1E_OFFSET_MASK}

    # -- header ---------------------------------------------------------------
    def write_header(self, h: Header) -> None:
        """Rewrite the header in one write and sync it (a pointer switch)."""
        self.rc.plain.clear()  # tables may move (see Refcounts.plain)
        self.f.pwrite_sync(0, h.pack())
        self.f.fdatasync_sync()
        self.img.header = h.layout()

    def _switch_reftable(self, offset: int, clusters: int) -> None:
        self.write_header(
            replace(self.img.header, refcount_table_offset=offset, refcount_table_clusters=clusters)
        )

    def mark_corrupt(self) -> None:
        """Set the corrupt bit (qemu ``qcow2_signal_corruption``)."""
        h = self.img.header
        if h.version >= 3 and not h.corrupt:
            self.write_header(
                replace(h, incompatible_features=h.incompatible_features | IncompatFeature.CORRUPT)
            )

    # -- allocation -------------------------------------------------------------
    def alloc(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters (counts dirty in memory until an
        L2 write or flush needs them on disk)."""
        if self.parked:
            # Reuse what the reads have let go of since the last flush.  The
            # decrements stay in memory: they reach the disk with the next
            # refcount write, and losing them in a crash only leaks.
            self.release_parked()
        return self.rc.alloc(n)

    def alloc_fresh(self, n: int = 1) -> tuple[int, bool]:
        """:meth:`alloc`, and whether the clusters read as zeroes already
        (:attr:`Refcounts.fresh_from`), so a write into them needs no
        zero COW fill."""
        if self.parked:
            self.release_parked()
        return self.rc.alloc_fresh(n)

    async def write_refcounts(self) -> None:
        """Write the dirty refcount blocks and extend the file
        (:meth:`extend_file`); if new blocks were among them, sync (off the
        event loop) and write their reftable entries
        (``Refcounts._new_block``: content before pointer).  No sync after
        that: the caller's barrier makes it all durable before the
        references that need it (rule 1)."""
        # One at a time (review): ``link`` takes an entry written by
        # another caller as durable, which it is only once a sync that
        # started after that write has ended -- a FLUSH and an L2 eviction
        # by a lock-free reader could otherwise interleave across their
        # syncs and write a chained block's entry before its home's was
        # on disk.
        async with self._refcount_writer:
            rc = self.rc
            owed = rc.write_blocks()
            self.extend_file()
            while owed:  # one round per sync for a chain of new blocks (link)
                await self.f.fdatasync()
                owed = rc.link(owed)

    def extend_file(self) -> None:
        """Extend the file over :attr:`want_eof` if it is shorter.

        A fresh cluster written only in part (a 4 KiB write into a 64 KiB
        cluster past the end of the file) leaves the file ending inside
        it.  Reads there see zeroes either way (past EOF, the read paths
        zero-fill), but every cluster an L2 entry on disk points at must
        lie inside the file.  So instead of an ``ftruncate`` per allocating
        write the engine records the wanted size, and this runs in the
        refcount dependency of the L2 cache -- after the refcount blocks,
        *before* the ``fdatasync`` barrier that precedes every L2 table
        write (rules 1 and 3) -- and at :meth:`flush`: the new size is as
        durable as the data before any pointer to it is written.  One
        ``fstat`` per barrier instead of ``fstat`` + ``ftruncate`` per
        write.
        """
        want = self.want_eof
        if want and self.f.size() < want:
            self.f.truncate(want)
        self.want_eof = 0

    def release_parked(self, *, force: bool = False) -> bool:
        """Decrement the parked batches no in-flight read can still see
        (all of them with ``force``, at close); True if any was."""
        img = self.img
        released = False
        cache = img.l2_cache
        # Epochs only grow, so the ready batches are a prefix.
        while self.parked and (force or not img.reads_in_epoch(self.parked[0][0])):
            _, batch = self.parked.pop(0)
            released = True
            for off, n in batch:
                self.rc.update_range(off, n, -1)
                if n == self.cs and self.rc.get_offset(off) == 0:
                    # A freed L2 table must not be served from the cache if
                    # the cluster is reused for something else.
                    cache.discard(off)
        return released

    def defer_free(self, offset: int, nbytes: int) -> None:
        self.pending_free.append((offset, nbytes))

    def free_entry(self, entry: int) -> None:
        """Queue the release of what an L2 entry word points at."""
        if entry & OFLAG_COMPRESSED:
            host, n = self.geo.compressed_range(entry)
            start = host - host % 512
            self.defer_free(start, n + host % 512)
            return
        host = entry & L2E_OFFSET_MASK
        if host:
            self.defer_free(host, self.cs)

    # -- overlap checks -----------------------------------------------------------
    def is_metadata(self, host: int) -> bool:
        """Does the cluster at ``host`` hold metadata?  The cheap form of
        the overlap part of :meth:`check_data_cluster` for the engine's
        fast path (which declines on True and lets the locked path report
        it): the header's table ranges are recomputed only when the header
        object is replaced."""
        h = self.img.header
        if h is not self._ranges_of:
            cs = self.cs
            self._ranges = (
                h.l1_table_offset, h.l1_table_offset + h.l1_size * 8,
                h.refcount_table_offset, h.refcount_table_offset + h.refcount_table_clusters * cs,
                h.snapshots_offset if h.nb_snapshots else 0,
                h.snapshots_offset + cs if h.nb_snapshots else 0,
            )  # fmt: skip
            self._ranges_of = h
        l1a, l1b, rta, rtb, sna, snb = self._ranges
        return (
            host < self.cs
            or host in self.l2_tables
            or l1a <= host < l1b
            or rta <= host < rtb
            or host in self.rc.block_offsets
            or sna <= host < snb
        )

    def check_data_cluster(self, host: int, guest: int) -> None:
        """Refuse to write guest data over metadata (qemu's overlap check)."""
        h = self.img.header
        cs = self.cs
        c = host // cs
        what = None
        if c == 0:
            what = "the header"
        elif host in self.l2_tables:
            what = "an active L2 table"
        elif _inside(host, h.l1_table_offset, h.l1_size * 8):
            what = "the L1 table"
        elif _inside(host, h.refcount_table_offset, h.refcount_table_clusters * cs):
            what = "the refcount table"
        elif host in self.rc.block_offsets:
            what = "a refcount block"
        elif h.nb_snapshots and _inside(host, h.snapshots_offset, cs):
            what = "the snapshot table"
        if what is None and self.rc.get(c) != 1:
            what = f"a cluster with refcount {self.rc.get(c)} (the L2 entry says COPIED)"
        if what is not None:
            raise CorruptImage(
                f"write to guest offset {guest:#x} would land on {what} "
                f"(host offset {host:#x}); image marked corrupt"
            )

    # -- L2 tables --------------------------------------------------------------------
    async def writable_l2(self, l1_index: int) -> CachedTable:
        """The active L2 table for ``l1_index``, pinned, owned by the active
        L1 alone (allocated, or copied away from a snapshot, if needed)."""
        img = self.img
        cache = img.l2_cache
        old = img.map.l2_table_offset(l1_index)
        e = img.l1[l1_index]
        if old and e & OFLAG_COPIED:
            return await cache.get(old)
        new = self.alloc(1)
        t = await cache.get_empty(new)
        if not old:
            # A brand-new table (all zeroes): no write and no sync now.  It
            # is published in memory at once and goes to disk like any
            # dirty table (refcounts first, behind the fdatasync barrier);
            # its L1 entry is written by the next flush, after a sync that
            # makes the table durable (rule 2: content before pointer).
            # qemu's l2_allocate writes and flushes at once, which makes
            # the first write into every 512 MiB of a fresh image wait for
            # every byte written before it to reach the disk.
            self.dirty(t)
            img.l1[l1_index] = new | OFLAG_COPIED
            self.rc.plain.clear()  # see Refcounts.plain
            self.l2_tables.add(new)
            self.l1_dirty.add(l1_index)
            return t
        try:
            if old:
                src = await cache.get(old)
                try:
                    t.entries[:] = src.entries
                finally:
                    cache.put(src)
                # The old table stays with the snapshots that share it, and
                # so do its data clusters: none of them is COPIED here.
                step = 2 if self.ext else 1
                for i in range(0, len(t.entries), step):
                    t.entries[i] &= ~OFLAG_COPIED & _MASK64
            # Content (and the refcount written by alloc) durable before
            # the L1 entry that publishes the table; a new refcount block's
            # sync off the event loop (review).
            await self.write_refcounts()
            await self.f.pwritev(new, [t.to_bytes()])
            await self.f.fdatasync()
            self.set_l1(l1_index, new | OFLAG_COPIED)
        except BaseException:
            cache.put(t)
            raise
        if old:
            self.defer_free(old, self.cs)
        return t

    def _write_l1(self) -> None:
        """Write the L1 entries of the tables created since the last flush
        (only from :meth:`flush`, after the sync that follows their
        tables)."""
        img = self.img
        base = img.header.l1_table_offset
        dirty, self.l1_dirty = self.l1_dirty, set()
        try:
            for i in sorted(dirty):
                self.f.pwrite_sync(base + 8 * i, _U64.pack(img.l1[i]))
        except BaseException:
            self.l1_dirty |= dirty
            raise

    def set_l1(self, l1_index: int, entry: int) -> None:
        img = self.img
        old = img.l1[l1_index] & L1E_OFFSET_MASK
        self.rc.plain.clear()  # see Refcounts.plain
        self.l2_tables.discard(old)
        img.l1[l1_index] = entry
        if entry & L1E_OFFSET_MASK:
            self.l2_tables.add(entry & L1E_OFFSET_MASK)
        self.f.pwrite_sync(img.header.l1_table_offset + 8 * l1_index, _U64.pack(entry))

    def dirty(self, t: CachedTable) -> None:
        """Mark an L2 table changed; its write waits for a sync (rules 1, 3)."""
        self.img.l2_cache.mark_dirty_ordered(t, self.rc_flusher)

    # -- flush ----------------------------------------------------------------------------
    async def flush(self, *, final: bool = False) -> None:
        """Make everything durable in dependency order, then release the
        clusters unlinked since the last flush (rule 5: once no read that
        may have mapped them is in flight; ``final`` at close releases all,
        since nothing is allocated after it)."""
        await self.write_refcounts()
        await self.img.l2_cache.write_back()
        if self.l1_dirty:
            # Every table written above is durable before an L1 entry
            # points at it (rule 2); the entries follow, and the sync
            # below makes them durable.
            await self.f.fdatasync()
            self._write_l1()
        await self.f.fdatasync()
        if self.pending_free:
            pending, self.pending_free = self.pending_free, []
            self.parked.append((self.img.close_read_epoch(), pending))
        if not self.parked or not self.release_parked(force=final):
            return
        self.rc.flush()
        await self.f.fdatasync()


def _inside(x: int, start: int, nbytes: int) -> bool:
    return nbytes > 0 and start <= x < start + nbytes

"""Refcount changes: count updates, allocation, growth of the refcount
structure (:class:`Refcounts`).  Lookup, the free-cluster search and write
back are :mod:`~nbdqcow.qcow2.refstore` (:class:`RefcountStore`, the base
class); the block codec and limits are :mod:`~nbdqcow.qcow2.refblock`,
re-exported here.

Mirrors the "Host cluster management" section of qemu's
``docs/interop/qcow2.txt`` and the concerns of ``block/qcow2-refcount.c``.

Layout (qcow2.txt): a two-level structure.  The *refcount table* (reftable)
is ``refcount_table_clusters`` contiguous clusters of big-endian u64 entries,
each the host offset of a *refcount block* (bits 9-63; 0 = not allocated,
every count in its range is 0).  A refcount block is one cluster holding
``cluster_size * 8 >> refcount_order`` entries of ``1 << refcount_order``
bits.  Widths below a byte (1, 2, 4 bits) are packed least-significant-bit
first inside each byte; widths of 8..64 bits are big-endian integers.

Allocation policy (QCOW2.md section 6, rules of section 7):

* the free-cluster search starts at the lowest index that may be free and
  takes the first run of ``n`` clusters whose refcount is 0, so space freed
  by discards and replaced tables is reused (qemu's ``free_cluster_index``);
* a missing refcount block is placed inside the range it describes, so it
  counts itself and allocation never recurses without bound;
* a reftable that is too small is replaced by a complete new, self-covering
  table written and synced *before* the header is switched to it in one
  synced write (the ``switch_table`` callback), and the old table is freed
  only after the switch;
* new refcount blocks are written and synced before the reftable entry that
  points at them ("content before pointer");
* count changes are kept in memory (dirty blocks) until :meth:`flush`; the
  caller orders that flush before any L2/L1 write that references a newly
  allocated cluster ("refcount before reference").

This module is synchronous: metadata I/O goes through the ``*_sync`` calls of
:class:`~nbdqcow.io.HostFile`.  The async image engine calls it under its
metadata lock.
"""

from __future__ import annotations

import errno
import struct

from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2.refblock import MAX_HOST_OFFSET as MAX_HOST_OFFSET  # moved
from nbdqcow.qcow2.refblock import (
    MAX_REFTABLE_BYTES,
    RefBlock,
    RefcountOverflow,
    decode_block,
    encode_block,
    entries_per_block,
)
from nbdqcow.qcow2.refblock import REFT_OFFSET_MASK as REFT_OFFSET_MASK  # moved
from nbdqcow.qcow2.refstore import RefcountStore, SwitchTable, WouldBlock

__all__ = [
    "MAX_REFTABLE_BYTES",
    "RefBlock",
    "RefcountOverflow",
    "RefcountStore",
    "Refcounts",
    "SwitchTable",
    "decode_block",
    "encode_block",
    "entries_per_block",
]

_U64 = struct.Struct(">Q")


class Refcounts(RefcountStore):
    """The refcount structure of one open image, writable: count changes,
    allocation and growth on top of :class:`RefcountStore` (its
    constructor arguments)."""

    # -- mutation ---------------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "image is open read-only")

    def update(self, cluster: int, delta: int, *, reserved: range = range(0)) -> int:
        """Add ``delta`` to a cluster's refcount; return the new count.

        Raises:
            RefcountOverflow: the count would exceed the width's maximum.
            CorruptImage: the count would drop below zero.
        """
        self._require_writable()
        ri = cluster >> self.rb_shift
        blk = self._block(ri)
        if blk is None:
            if delta < 0:
                raise CorruptImage(
                    f"refcount of cluster {cluster} would drop below zero "
                    "(no refcount block covers it)"
                )
            blk = self._new_block(ri, reserved)
        i = cluster & (self.rb_entries - 1)
        old = blk.get(i)
        new = old + delta
        self.plain.discard(cluster << self.cluster_bits)
        if new < 0:
            raise CorruptImage(
                f"refcount of cluster {cluster} would drop below zero ({old}{delta:+})"
            )
        blk.set(i, new)
        self._dirty.add(ri)
        if cluster >= self.fresh_from:
            self.fresh_from = cluster + 1
        if new == 0 and cluster < self.free_index:
            self.free_index = cluster
        return new

    def update_range(self, offset: int, length: int, delta: int) -> None:
        """Change the refcount of every cluster touching ``[offset, offset+length)``."""
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        done: list[int] = []
        try:
            for c in range(first, last + 1):
                self.update(c, delta)
                done.append(c)
        except BaseException:
            # Leave no half-applied range behind: undo what was applied.
            for c in done:
                self.update(c, -delta)
            raise

    def alloc(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters with refcount 1; return the
        host byte offset of the first.  Freed space is reused first."""
        return self.alloc_fresh(n)[0]

    def alloc_fresh(self, n: int = 1) -> tuple[int, bool]:
        """:meth:`alloc`, and whether every allocated cluster was *fresh*
        (reads as zeroes: see :attr:`fresh_from`)."""
        fresh = self.fresh_from
        start = self.alloc_cached(n)
        if start < 0:
            # New refcount blocks or a new reftable that the general path
            # may create lie outside the run it returns, so the mark read
            # above still tells whether the run is fresh.
            start = self._alloc_slow(n)
        return start << self.cluster_bits, start >= fresh

    def alloc_nowait(self, n: int = 1) -> tuple[int, bool] | None:
        """:meth:`alloc_fresh` if it needs no file I/O (every refcount block
        it looks at is in memory, no new block or reftable), else ``None``
        with nothing changed but, at worst, a lower :attr:`free_index` and a
        higher :attr:`fresh_from` (both only make later choices more
        conservative).  The write engine's synchronous paths use it: they
        must not block on the disk."""
        fresh = self.fresh_from
        start = self.alloc_cached(n)
        if start < 0:
            self._no_io = True
            try:
                start = self._alloc_slow(n)
            except WouldBlock:
                return None
            finally:
                self._no_io = False
        return start << self.cluster_bits, start >= fresh

    def alloc_cached(self, n: int = 1) -> int:
        """The common allocation without Python-level loops over clusters:
        the ``n`` clusters at :attr:`free_index` are free and described by
        one cached refcount block of a byte-aligned width.  Returns the
        first cluster index, or -1 (nothing changed) for the general path.
        Whether the run is fresh is ``start >= fresh_from`` read *before*
        the call (the call moves the mark past the run).  The write
        engine's fast path calls it directly (one call, no tuple).

        Same result as :meth:`_alloc_slow` in that case: ``_find_free``
        would return ``free_index`` (its first cluster is free and the run
        is long enough) and move the mark to ``free_index + n``; each
        ``update(c, 1)`` sets a zero count to 1 (big-endian: the last byte
        of the entry) and dirties the block.
        """
        c = self.free_index
        ri = c >> self.rb_shift
        blk = self._blocks.get(ri)
        nb = self._entry_bytes
        if blk is None or not nb or n <= 0 or not self.writable:
            return -1
        i = c & self._rb_mask
        end = c + n
        if i + n > self.rb_entries or end > self._max_clusters:
            return -1
        data = blk.data
        lo = i * nb
        if n == 1 and nb == 2:
            # The default width, one cluster: two byte tests and one store
            # (bytearray.count alone costs ~140 ns here).
            if data[lo] or data[lo + 1]:
                return -1
            data[lo + 1] = 1
        else:
            hi = lo + n * nb
            if data.count(0, lo, hi) != hi - lo:
                return -1
            # Count 1 in each entry: its last (least significant) byte.
            data[lo + nb - 1 : hi : nb] = b"\x01" * n
        self._dirty.add(ri)
        self.free_index = end
        if end > self.fresh_from:
            self.fresh_from = end
        return c

    def _alloc_slow(self, n: int) -> int:
        self._require_writable()
        if n <= 0:
            raise ValueError("cluster count must be positive")
        start = self._find_free(n, self.free_index)
        run = range(start, start + n)
        done = 0
        try:
            for c in run:
                self.update(c, 1, reserved=run)
                done += 1
        except BaseException:
            for c in run[:done]:
                self.update(c, -1)
            raise
        return start

    def free(self, offset: int, n: int = 1) -> None:
        """Drop one reference from ``n`` clusters starting at ``offset``."""
        self.update_range(offset, n << self.cluster_bits, -1)

    def _new_block(self, ri: int, reserved: range) -> RefBlock:
        """Create the refcount block for range ``ri``, inside that range,
        in memory only: dirty, with its reftable entry owed
        (:attr:`unlinked`).

        The block is written with the other dirty blocks at the next
        refcount flush, and its entry only after a sync that follows
        (:meth:`flush`; ``Metadata.write_refcounts`` does it with an
        asynchronous sync): the pointer never names an unwritten block
        ("content before pointer").  Every reference to a cluster it
        counts (an L2 table, the L1 entry of a new table) is written after
        a refcount flush and a further sync (rule 1), so no reference can
        reach the disk before the entry does; until then, after a crash
        the range simply has no block on disk (all counts 0, and nothing
        on disk refers to it).

        issue 6: this wrote the block, ran ``fdatasync`` on the event
        loop's thread and wrote the entry, all at once -- every 2 GiB of
        host growth with 64 KiB clusters the whole server stopped for as
        long as the sync took to write back every dirty page of the image.
        ``randwrite-alloc`` as in the full benchmark (256 MiB of 4 KiB
        writes into a 16 GiB sparse image; the file passes 2 GiB half-way)
        on ext4: fio's IOPS log (500 ms buckets) fell to 7.5 k, then
        nothing for 1.5 s.  Deferred, the run has no sync at all:
        ``benchmarks.run --quick --formats qcow2 --workloads
        randwrite-alloc --alloc-io 256M --reps 3`` 24.6 k -> 34.1 k IOPS
        (qemu-nbd 12.0 k), and the server's system time per write 12.5-13.4
        -> 8.4 us (the sync's writeback ran in our thread).
        """
        if self._no_io:
            raise WouldBlock
        self.plain.clear()  # rare; new counts (see plain)
        if ri >= len(self.table):
            self._grow_table(ri + 1, reserved)
            grown = self._block(ri)
            if grown is not None:
                return grown
        base = ri << self.rb_shift
        cand = base
        while cand in reserved:
            cand = reserved.stop
        blk = RefBlock(bytearray(self.cluster_size), self.order)
        if cand < base + self.rb_entries:
            blk.set(cand - base, 1)
            self.fresh_from = max(self.fresh_from, cand + 1)
        else:
            # The reserved run covers the whole range: account the block in
            # the next range, and reserve it so that the next range's own
            # new block (if any) goes elsewhere.  Recursion is bounded by
            # the run length.
            cand = self._find_free(1, reserved.stop)
            self.update(cand, 1, reserved=range(reserved.start, cand + 1))
        off = cand << self.cluster_bits
        # In memory at once (the table entry too: _write_block writes
        # through it); on disk at the next flush, pointer last.  Cached only
        # now, with its entry: if placing it failed above (ENOSPC growing
        # the table, EIO), no block without an entry is left behind for
        # later counts to land in (review).
        self._blocks[ri] = blk
        self.table[ri] = off
        self.block_offsets.add(off)
        self._dirty.add(ri)
        self.unlinked.add(ri)
        return blk

    def _grow_table(self, min_entries: int, reserved: range) -> None:
        """Replace the reftable by a bigger one that covers itself.

        The new table and any refcount blocks it needs are placed after
        everything in use (and after ``reserved``), written with their
        counts, synced, and only then does the header switch to them.
        """
        if self._switch is None:
            raise OSError(errno.ENOSPC, "the refcount table is full and cannot grow here")
        cs = self.cluster_size
        # Flush pending counts first: the new blocks are built from the
        # in-memory state, and the old ones must be current on disk too.
        self.flush()
        end = max(self._highest_used() + 1, reserved.stop, (self.f.size() + cs - 1) // cs)
        entries = max(min_entries, len(self.table) * 2)
        while True:
            tclusters = (entries * 8 + cs - 1) // cs
            entries = tclusters * cs // 8
            if tclusters * cs > MAX_REFTABLE_BYTES:
                raise OSError(errno.ENOSPC, "the refcount table would exceed 8 MiB")
            # Ranges of the new area [end, end + blocks + table) that have
            # no refcount block yet need one, placed in the area itself;
            # iterate to a fixed point since blocks lengthen the area.
            nblocks = 0
            while True:
                first_ri = end >> self.rb_shift
                last_ri = (end + nblocks + tclusters - 1) >> self.rb_shift
                missing = [
                    ri
                    for ri in range(first_ri, last_ri + 1)
                    if ri >= len(self.table) or self.table[ri] == 0
                ]
                if len(missing) == nblocks:
                    break
                nblocks = len(missing)
            if last_ri < entries:
                break
            entries = last_ri + 1
        # Layout: the new blocks first, then the table.
        blocks_at = {ri: end + k for k, ri in enumerate(missing)}
        table_at = end + nblocks
        for ri in missing:
            self._blocks[ri] = RefBlock(bytearray(cs), self.order)
        try:
            self._build_table(blocks_at, table_at, end, nblocks + tclusters, entries)
        except BaseException:
            # ENOSPC/EIO before the switch: the old table stays in charge.
            # Forget the new blocks (no reftable entry names them); counts
            # added to existing blocks for the new area only leak.
            for ri in missing:
                self._blocks.pop(ri, None)
                self._dirty.discard(ri)
            raise

    def _build_table(
        self, blocks_at: dict[int, int], table_at: int, end: int, area: int, entries: int
    ) -> None:
        """Second half of :meth:`_grow_table`: count the new area ``area``
        clusters from ``end``, write blocks and table, sync, switch."""
        tclusters = area - len(blocks_at)
        self.plain.clear()  # rare; new counts (see plain)
        new_table = self.table + [0] * (entries - len(self.table))
        for ri, c in blocks_at.items():
            new_table[ri] = c << self.cluster_bits
        # _block() looks new blocks up in the cache only; old ones still
        # load through the old table, which is what is on disk so far.
        for c in range(end, end + area):
            blk = self._block(c >> self.rb_shift)
            assert blk is not None
            i = c & (self.rb_entries - 1)
            blk.set(i, blk.get(i) + 1)
            self._dirty.add(c >> self.rb_shift)
        self.fresh_from = max(self.fresh_from, end + area)
        for ri, c in blocks_at.items():
            self.f.pwrite_sync(c << self.cluster_bits, self._blocks[ri].data)
            self._dirty.discard(ri)
        for ri in list(self._dirty):
            self._write_block(ri)
        raw = b"".join(_U64.pack(e) for e in new_table)
        self.f.pwrite_sync(table_at << self.cluster_bits, raw)
        self.f.fdatasync_sync()
        old_off, old_clusters = self.table_offset, self.table_clusters
        assert self._switch is not None  # checked by _grow_table
        self._switch(table_at << self.cluster_bits, tclusters)
        # The new table holds every entry, owed ones included, and was
        # synced after the blocks above.
        self.unlinked.clear()
        self.table = new_table
        self.block_offsets = {e for e in new_table if e}
        self.table_offset = table_at << self.cluster_bits
        self.table_clusters = tclusters
        # The old table is unreferenced now; its clusters become free.
        self.free(old_off, old_clusters)

"""Refcount table and blocks: lookup, allocation, growth (the block codec
and limits are in :mod:`~nbdqcow.qcow2.refblock`, re-exported here).

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
from collections.abc import Callable, Iterator

from nbdqcow.errors import CorruptImage
from nbdqcow.io import HostFile
from nbdqcow.qcow2.refblock import (
    MAX_HOST_OFFSET,
    MAX_REFTABLE_BYTES,
    REFT_OFFSET_MASK,
    RefBlock,
    RefcountOverflow,
    decode_block,
    encode_block,
    entries_per_block,
)

__all__ = [
    "MAX_REFTABLE_BYTES",
    "RefBlock",
    "RefcountOverflow",
    "Refcounts",
    "decode_block",
    "encode_block",
    "entries_per_block",
]


_U64 = struct.Struct(">Q")

SwitchTable = Callable[[int, int], None]


class _WouldBlock(Exception):
    """Raised inside :meth:`Refcounts.alloc_nowait` where the general path
    would read or write the file."""


class Refcounts:
    """The refcount structure of one open image.

    Args:
        f: the image file.
        cluster_bits: log2 of the cluster size.
        refcount_order: log2 of the refcount width.
        table_offset: host offset of the reftable.
        table_clusters: its length in clusters.
        switch_table: called as ``switch_table(offset, clusters)`` to point
            the header at a new reftable; it must write both fields in one
            write and sync it before returning.
        writable: refuse every change when false.
    """

    def __init__(
        self,
        f: HostFile,
        *,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        switch_table: SwitchTable | None = None,
        writable: bool = True,
    ) -> None:
        self.f = f
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = refcount_order
        self.rb_entries = entries_per_block(self.cluster_size, refcount_order)
        self.rb_shift = self.rb_entries.bit_length() - 1
        self._rb_mask = self.rb_entries - 1
        #: Bytes per refcount entry; 0 for the sub-byte widths (packed).
        self._entry_bytes = (1 << refcount_order) >> 3
        #: Clusters below 2^56 bytes of host offsets (MAX_HOST_OFFSET).
        self._max_clusters = MAX_HOST_OFFSET >> cluster_bits
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self._switch = switch_table
        self.writable = writable
        if table_clusters <= 0 or table_clusters * self.cluster_size > MAX_REFTABLE_BYTES:
            raise CorruptImage(
                f"refcount_table_clusters {table_clusters} is outside "
                f"1..{MAX_REFTABLE_BYTES // self.cluster_size}"
            )
        if table_offset % self.cluster_size:
            raise CorruptImage(f"refcount_table_offset {table_offset:#x} is not cluster aligned")
        raw = f.pread_sync(table_offset, table_clusters * self.cluster_size)
        if len(raw) != table_clusters * self.cluster_size:
            raise CorruptImage(
                f"refcount table at {table_offset:#x} ({table_clusters} clusters) "
                "extends past the end of the file"
            )
        self.table: list[int] = [
            e & REFT_OFFSET_MASK for (e,) in struct.iter_unpack(">Q", raw)
        ]
        for i, e in enumerate(self.table):
            if e % self.cluster_size:
                raise CorruptImage(f"refcount block offset {e:#x} (reftable index {i}) unaligned")
        self._blocks: dict[int, RefBlock] = {}
        #: host offsets of every refcount block (overlap checks).
        self.block_offsets = {e for e in self.table if e}
        self._dirty: set[int] = set()
        #: Lowest cluster index that may be free.
        self.free_index = 0
        #: Clusters from this index on are *fresh*: past the end the file
        #: had when it was opened, and never allocated or freed since (every
        #: count change moves the mark past its cluster).  Since every write
        #: lands in a cluster whose count is non-zero at the time (the
        #: engine's overlap check), a fresh cluster has never been written
        #: in this session and lay beyond the end of file before: it reads
        #: as zeroes whatever the file's current size is (a hole or past
        #: EOF).  The write engine skips the zero COW fill of such clusters
        #: without asking the file system for its size (see
        #: :meth:`alloc_fresh`).
        self.fresh_from = (f.size() + self.cluster_size - 1) >> cluster_bits
        #: Host offsets of clusters the write engine found fit for an
        #: in-place data write: count 1 and not metadata
        #: (``Metadata.is_metadata``), so its fast path need not ask again
        #: (``InlineWrites._write_now``).  Every count change drops the
        #: cluster (:meth:`update`, :meth:`_new_block`,
        #: :meth:`_build_table`); :meth:`alloc_cached`, the one change that
        #: does not, only turns 0 into 1, and no member has count 0.  A
        #: cluster becomes metadata only by being allocated (count 0 first),
        #: so members stay fit until their count changes; ``Metadata`` also
        #: empties the set whenever metadata moves (header, L1, new tables),
        #: as a second guard.
        self.plain: set[int] = set()
        #: Set while :meth:`alloc_nowait` runs: any file I/O raises
        #: :class:`_WouldBlock` instead.
        self._no_io = False

    # -- lookup -----------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def _block(self, ri: int) -> RefBlock | None:
        blk = self._blocks.get(ri)
        if blk is not None:
            return blk
        if ri >= len(self.table) or self.table[ri] == 0:
            return None
        if self._no_io:
            raise _WouldBlock
        off = self.table[ri]
        raw = self.f.pread_sync(off, self.cluster_size)
        if len(raw) != self.cluster_size:
            raise CorruptImage(
                f"refcount block at {off:#x} (reftable index {ri}) is outside the image"
            )
        blk = RefBlock(bytearray(raw), self.order)
        self._blocks[ri] = blk
        return blk

    def get(self, cluster: int) -> int:
        """Refcount of host cluster number ``cluster``."""
        blk = self._block(cluster >> self.rb_shift)
        return 0 if blk is None else blk.get(cluster & (self.rb_entries - 1))

    def get_cached(self, cluster: int) -> int:
        """:meth:`get` without I/O: -1 when the block is not in memory.
        The default 16-bit width is decoded inline (the write engine's
        in-place fast path asks once per write)."""
        ri = cluster >> self.rb_shift
        blk = self._blocks.get(ri)
        if blk is None:
            if ri < len(self.table) and self.table[ri]:
                return -1
            return 0
        if self.order == 4:
            j = (cluster & (self.rb_entries - 1)) << 1
            d = blk.data
            return d[j] << 8 | d[j + 1]
        return blk.get(cluster & (self.rb_entries - 1))

    def get_offset(self, offset: int) -> int:
        return self.get(offset >> self.cluster_bits)

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

    def _is_free(self, cluster: int) -> bool:
        return self.get(cluster) == 0

    def _find_free(self, n: int, start: int) -> int:
        """Lowest cluster index >= ``start`` beginning ``n`` free clusters.

        As a side effect, when searching from :attr:`free_index` it moves
        that mark to the first free cluster seen, so the next search does
        not rescan the used prefix (qemu's ``free_cluster_index``).
        """
        c = start
        run = 0
        first = c
        first_seen: int | None = None
        mask = self.rb_entries - 1
        while run < n:
            blk = self._block(c >> self.rb_shift)
            if blk is None and (c & mask) == 0:
                # A whole range with no block: every count in it is 0.
                if run == 0:
                    first = c
                if first_seen is None:
                    first_seen = c
                run += self.rb_entries
                c += self.rb_entries
                continue
            if blk is None or blk.get(c & mask) == 0:
                if run == 0:
                    first = c
                if first_seen is None:
                    first_seen = c
                run += 1
            else:
                run = 0
            c += 1
        if (first + n) << self.cluster_bits > MAX_HOST_OFFSET:
            raise OSError(errno.ENOSPC, "qcow2 host offsets are limited to 2^56 bytes")
        if start == self.free_index and first_seen is not None:
            self.free_index = first + n if first_seen == first else first_seen
        return first

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
            except _WouldBlock:
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
        """Create the refcount block for range ``ri``, inside that range.

        Written and synced before the reftable entry is set, so the pointer
        never names an unwritten block.
        """
        if self._no_io:
            raise _WouldBlock
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
        self._blocks[ri] = blk
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
        try:
            self.f.pwrite_sync(off, blk.data)
            self.f.fdatasync_sync()
            # The pointer goes to disk before memory believes in it: a block
            # whose reftable entry failed to be written would otherwise be
            # flushed later to reftable offset 0 -- over the header.
            self.f.pwrite_sync(self.table_offset + ri * 8, _U64.pack(off))
        except BaseException:
            # ENOSPC/EIO: forget the block (the range reads as all-free
            # again, as on disk); a count it caused in another range leaks.
            if self._blocks.get(ri) is blk:
                del self._blocks[ri]
            raise
        self.table[ri] = off
        self.block_offsets.add(off)
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
        self.table = new_table
        self.block_offsets = {e for e in new_table if e}
        self.table_offset = table_at << self.cluster_bits
        self.table_clusters = tclusters
        # The old table is unreferenced now; its clusters become free.
        self.free(old_off, old_clusters)

    def _highest_used(self) -> int:
        """Highest cluster index with a non-zero refcount (-1 if none)."""
        for ri in range(len(self.table) - 1, -1, -1):
            blk = self._block(ri)
            if blk is None:
                continue
            vals = blk.values()
            for i in range(len(vals) - 1, -1, -1):
                if vals[i]:
                    return (ri << self.rb_shift) + i
        return -1

    def _write_block(self, ri: int) -> None:
        off = self.table[ri]
        if not off:
            # Never write a block through an empty reftable entry (offset 0
            # is the header).
            raise CorruptImage(f"refcount block {ri} has no reftable entry")
        self.f.pwrite_sync(off, self._blocks[ri].data)
        self._dirty.discard(ri)

    def flush(self) -> None:
        """Write every dirty refcount block (no sync: the caller decides
        where the barrier goes)."""
        for ri in sorted(self._dirty):
            self._write_block(ri)

    def end_offset(self) -> int:
        """Byte offset just past the highest in-use cluster."""
        return (self._highest_used() + 1) << self.cluster_bits

    def iter_used(self) -> Iterator[tuple[int, int]]:
        """``(cluster, refcount)`` for every cluster with a non-zero count."""
        for ri in range(len(self.table)):
            blk = self._block(ri)
            if blk is None:
                continue
            base = ri << self.rb_shift
            for i, v in enumerate(blk.values()):
                if v:
                    yield base + i, v


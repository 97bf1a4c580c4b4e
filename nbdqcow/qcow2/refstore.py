"""The refcount structure in memory and on disk (:class:`RefcountStore`):
the reftable, refcount blocks loaded on demand, count lookup, the
free-cluster search, and writing dirty blocks back (qcow2.txt "Host
cluster management": refcount table and refcount blocks; qemu
``block/qcow2-refcount.c``).  Changing counts -- updates, allocation,
growth -- is :class:`~nbdqcow.qcow2.refcount.Refcounts`, built on it.

Synchronous: metadata I/O goes through the ``*_sync`` calls of
:class:`~nbdqcow.io.HostFile`.
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
    entries_per_block,
)

__all__ = ["RefcountStore", "SwitchTable", "WouldBlock"]

_U64 = struct.Struct(">Q")


SwitchTable = Callable[[int, int], None]


class WouldBlock(Exception):
    """Raised inside :meth:`Refcounts.alloc_nowait` where the general path
    would read or write the file."""


class RefcountStore:
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
        #: :class:`WouldBlock` instead.
        self._no_io = False
        #: Reftable indexes of refcount blocks created in memory
        #: (``Refcounts._new_block``) whose reftable entry is not written
        #: yet: the block itself is dirty, and its entry may only be
        #: written once the block is durable ("content before pointer";
        #: :meth:`write_blocks`, :meth:`link`).
        self.unlinked: set[int] = set()

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
            raise WouldBlock
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
        """Write every dirty refcount block and every reftable entry still
        owed (no sync after them: the caller decides where the barrier
        goes).

        A new block's entry is owed (:attr:`unlinked`) until the block is
        durable, so when there is one this syncs between the block and its
        entry, blocking; the write engine's barriers use
        :meth:`write_blocks` and :meth:`link` around an asynchronous sync
        instead (``Metadata.write_refcounts``)."""
        owed = self.write_blocks()
        while owed:
            self.f.fdatasync_sync()
            owed = self.link(owed)

    def write_blocks(self) -> set[int]:
        """Write every dirty refcount block, no sync; return the new blocks
        written whose reftable entries :meth:`link` must write once a sync
        has made them durable."""
        for ri in sorted(self._dirty):
            self._write_block(ri)
        return set(self.unlinked)

    def link(self, owed: set[int]) -> set[int]:
        """Write the reftable entries of the new blocks ``owed`` (returned
        by :meth:`write_blocks`, the sync done since) that may go now;
        return the rest, to link after one more sync.  Entries written
        meanwhile by another flush, or with a whole new table
        (``Refcounts._build_table``), are no longer in :attr:`unlinked`
        and are skipped.

        A block usually counts its own cluster, and then its entry may go
        at once.  When an allocation run covered a whole range, the range's
        block lives in a later range, counted by that range's block --
        often new as well.  An entry naming a block whose own count sits in
        a block not yet linked would, after a power cut, point at a cluster
        with refcount 0 (``qemu-img check``: "refcount=0 reference=1";
        review of the deferred linking, reproduced with 512-byte clusters
        and 64-bit refcounts).  So an entry goes only once the block that
        counts the new block's cluster is linked *and durable*: the
        chain's blocks are linked one round per sync, last first (new
        blocks only ever live in later ranges, so the chain ends).
        """
        pending = owed & self.unlinked
        written: set[int] = set()
        later: set[int] = set()
        for ri in sorted(pending):
            home = (self.table[ri] >> self.cluster_bits) >> self.rb_shift
            if home != ri and (home in self.unlinked or home in written):
                # Its count is not on disk with a durable pointer yet.
                later.add(ri)
                continue
            self.f.pwrite_sync(self.table_offset + ri * 8, _U64.pack(self.table[ri]))
            self.unlinked.discard(ri)
            written.add(ri)
        # Another round, after a sync, for every entry held back -- a chain
        # of three waits two rounds (review) -- as long as this round wrote
        # something: each round then shortens the set, so the callers'
        # loops end.  An entry whose home is a block created since
        # write_blocks() makes no progress and stays owed for a later
        # flush, which writes that block first.
        return later if written else set()

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

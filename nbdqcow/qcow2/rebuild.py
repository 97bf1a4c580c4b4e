"""Rebuild the whole refcount structure from computed references.

What ``qemu-img check -r all`` does when refcounts are too low or the
refcount structure itself is damaged (``rebuild_refcount_structure`` in
qemu's ``block/qcow2-refcount.c``), and what opening a dirty lazy-refcounts
image needs: the counts on disk cannot be trusted, so a complete new
reftable and new refcount blocks are written *after* everything in use,
synced, and the header is switched to them in one synced write
(QCOW2.md section 7, rule 2).  Until that write the old structure stays in
force, so a crash in the middle leaves the image as it was.  The old
structure's clusters are simply not counted by the new one: they become
free space.
"""

from __future__ import annotations

import errno
from dataclasses import replace

from nbdqcow.qcow2.offline import OfflineImage, pack_table
from nbdqcow.qcow2.refcount import MAX_REFTABLE_BYTES, RefBlock, entries_per_block

__all__ = ["rebuild_refcounts"]


def rebuild_refcounts(img: OfflineImage, refs: dict[int, int]) -> None:
    """Replace the refcount structure of ``img`` by one encoding ``refs``.

    Args:
        img: the image, open writable.
        refs: cluster index -> number of references, *excluding* the
            current refcount table and refcount blocks (they are dropped).

    Raises:
        RefcountOverflow: a reference count does not fit the refcount width.
        OSError: ENOSPC when the new table would exceed qemu's limit.
    """
    cs = img.cluster_size
    rb_entries = entries_per_block(cs, img.header.refcount_order)
    used = [c for c, n in refs.items() if n]
    file_clusters = -(-img.file_size() // cs)
    end = max([file_clusters, *(c + 1 for c in used)])
    needed = {c // rb_entries for c in used}
    # Place blocks, then the table, at [end, ...): the area itself needs
    # counting, which may need more blocks and a longer table; iterate.
    nblocks, tclusters = 0, 1
    while True:
        area = range(end, end + nblocks + tclusters)
        ranges = needed | set(range(area.start // rb_entries, (area.stop - 1) // rb_entries + 1))
        want_t = -(-(max(ranges) + 1) * 8 // cs)
        if len(ranges) == nblocks and want_t == tclusters:
            break
        nblocks, tclusters = len(ranges), want_t
    if tclusters * cs > MAX_REFTABLE_BYTES:
        raise OSError(errno.ENOSPC, "the rebuilt refcount table would exceed 8 MiB")
    order = sorted(ranges)
    block_at = {ri: end + k for k, ri in enumerate(order)}
    table_at = end + nblocks
    counts = dict(refs)
    for c in range(end, end + nblocks + tclusters):
        counts[c] = counts.get(c, 0) + 1
    blocks = {ri: RefBlock(bytearray(cs), img.header.refcount_order) for ri in order}
    for c, n in counts.items():
        if n:
            blocks[c // rb_entries].set(c % rb_entries, n)
    table = [0] * (tclusters * cs // 8)
    for ri, c in block_at.items():
        table[ri] = c * cs
        img.f.pwrite_sync(c * cs, blocks[ri].data)
    img.f.pwrite_sync(table_at * cs, pack_table(table))
    img.sync()
    img.write_header(
        replace(img.header, refcount_table_offset=table_at * cs, refcount_table_clusters=tclusters)
    )
    img.reload_refcounts()

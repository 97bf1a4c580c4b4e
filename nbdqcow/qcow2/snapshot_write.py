"""Internal snapshots: create, delete, apply (``qemu-img snapshot -c/-d/-a``).

Mirrors the write side of qemu's ``block/qcow2-snapshot.c`` on the format of
qcow2.txt "Snapshots"; the table codec is the read engine's
:mod:`nbdqcow.qcow2.snapshot`.  These work on a closed image, synchronously.

A snapshot is a copy of the active L1 table plus one more reference on every
L2 table and data cluster reachable from it; COPIED (refcount == 1) is then
false everywhere in the shared tree, so the next guest write copies instead
of overwriting.  The order of every step follows QCOW2.md sections 6 and 7:

* create: refcounts of the tree +1 (flushed and synced: "refcount before
  reference"), COPIED cleared in the active tables, the L1 copy and the new
  snapshot table written and synced ("content before pointer"), one synced
  header write of ``nb_snapshots``/``snapshots_offset``, old table freed;
* delete: the new table (without the entry) written and synced, one synced
  header write, *then* the tree's refcounts -1 ("unlink before decrement": a
  crash afterwards only leaks), synced, then COPIED recomputed;
* apply: the snapshot's tree +1 (synced), its L1 copied over the active one
  (synced), the old active tree -1 (synced), COPIED recomputed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

from nbdqcow.errors import ImageError
from nbdqcow.qcow2.entries import ClusterType, classify, l1_l2_offset
from nbdqcow.qcow2.layout import L2E_OFFSET_MASK, OFLAG_COPIED
from nbdqcow.qcow2.offline import OfflineImage
from nbdqcow.qcow2.refcount import RefcountOverflow
from nbdqcow.qcow2.snapshot import SnapshotEntry, find_snapshot, read_snapshot_table

__all__ = [
    "apply_snapshot",
    "create_snapshot",
    "delete_snapshot",
    "list_snapshots",
    "recompute_copied",
]

_NO_ICOUNT = 0xFFFF_FFFF_FFFF_FFFF


def _open(path: str, *, writable: bool) -> OfflineImage:
    img = OfflineImage(path, writable=writable)
    h = img.header
    if writable and (h.dirty or h.corrupt):
        img.close()
        state = "dirty (lazy refcounts not written back)" if h.dirty else "marked corrupt"
        raise ImageError(
            f"{path}: image is {state}; run 'nbdqcow check -r all' before changing snapshots"
        )
    if h.has_data_file:
        img.close()
        raise ImageError(f"{path}: snapshots of images with an external data file are refused")
    return img


def list_snapshots(path: str) -> list[SnapshotEntry]:
    with _open(path, writable=False) as img:
        return read_snapshot_table(img.f, img.header, img.file_size())


# -- the tree of an L1 table -------------------------------------------------
def _tree(img: OfflineImage, l1: list[int]) -> Counter[int]:
    """References (cluster index -> count) held by the L2 tables and data of
    an L1 table; the L1 table itself is not included."""
    cs = img.cluster_size
    ext = img.geo.extended_l2
    refs: Counter[int] = Counter()
    for e in l1:
        l2 = l1_l2_offset(e)
        if not l2:
            continue
        refs[l2 // cs] += 1
        words = img.read_l2(l2)
        for w in words[:: 2 if ext else 1]:
            ctype = classify(w, extended_l2=ext)
            if ctype is ClusterType.COMPRESSED:
                host, n = img.geo.compressed_range(w)
                for c in range(host // cs, (host + n - 1) // cs + 1):
                    refs[c] += 1
            elif ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                refs[(w & L2E_OFFSET_MASK) // cs] += 1
    return refs


def _clusters(offset: int, nbytes: int, cs: int) -> range:
    """Cluster indexes of a table of ``nbytes`` at ``offset`` (empty if 0)."""
    if nbytes <= 0:
        return range(0)
    return range(offset // cs, (offset + nbytes - 1) // cs + 1)


def _apply_delta(img: OfflineImage, refs: Counter[int], sign: int) -> None:
    """Add ``sign * count`` to each cluster's refcount, all or nothing,
    then write the refcount blocks and sync."""
    rc = img.refcounts
    limit = (1 << (1 << img.header.refcount_order)) - 1
    for c, n in refs.items():
        new = rc.get(c) + sign * n
        if new > limit:
            raise RefcountOverflow(
                f"cluster {c} would be referenced {new} times, more than refcount_bits="
                f"{1 << img.header.refcount_order} can count (qemu-img amend -o refcount_bits=...)"
            )
    for c, n in sorted(refs.items()):
        rc.update(c, sign * n)
    rc.flush()
    img.sync()


def recompute_copied(img: OfflineImage) -> None:
    """Set COPIED exactly on active L1/L2 entries whose target has refcount 1.

    Must run only after the refcounts it reads are durable (a COPIED flag
    on a shared cluster would let a writer overwrite snapshot data).
    """
    rc = img.refcounts
    cs = img.cluster_size
    ext = img.geo.extended_l2
    l1 = img.read_l1()
    l1_changed = False
    for i, e in enumerate(l1):
        l2 = l1_l2_offset(e)
        if not l2:
            continue
        words = img.read_l2(l2)
        changed = False
        for j in range(0, len(words), 2 if ext else 1):
            w = words[j]
            if classify(w, extended_l2=ext) not in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                continue
            want = OFLAG_COPIED if rc.get((w & L2E_OFFSET_MASK) // cs) == 1 else 0
            if w & OFLAG_COPIED != want:
                words[j] = (w & ~OFLAG_COPIED & 0xFFFF_FFFF_FFFF_FFFF) | want
                changed = True
        if changed:
            img.write_table(l2, words)
        want = OFLAG_COPIED if rc.get(l2 // cs) == 1 else 0
        if e & OFLAG_COPIED != want:
            l1[i] = (e & ~OFLAG_COPIED & 0xFFFF_FFFF_FFFF_FFFF) | want
            l1_changed = True
    if l1_changed:
        img.write_table(img.header.l1_table_offset, l1)
    img.sync()


# -- the snapshot table ------------------------------------------------------
def _write_table(img: OfflineImage, snaps: list[SnapshotEntry]) -> None:
    """Write ``snaps`` as a new table and switch the header to it; free the
    old table afterwards."""
    h = img.header
    old_off = h.snapshots_offset
    old_size = sum(len(s.pack()) for s in read_snapshot_table(img.f, h, img.file_size()))
    raw = b"".join(s.pack() for s in snaps)
    new_off = 0
    rc = img.refcounts
    if raw:
        n = -(-len(raw) // img.cluster_size)
        new_off = rc.alloc(n)
        rc.flush()
        img.f.pwrite_sync(new_off, raw + bytes(n * img.cluster_size - len(raw)))
        img.sync()
    img.write_header(replace(img.header, nb_snapshots=len(snaps), snapshots_offset=new_off))
    if old_size:
        rc.free(old_off, -(-old_size // img.cluster_size))
        rc.flush()
        img.sync()


def _next_id(snaps: list[SnapshotEntry]) -> str:
    ids = [int(s.id) for s in snaps if s.id.isdigit()]
    return str(max(ids, default=0) + 1)


def create_snapshot(path: str, name: str) -> SnapshotEntry:
    """Take an internal snapshot of the image's current state."""
    if not name:
        raise ImageError("a snapshot needs a non-empty name")
    with _open(path, writable=True) as img:
        h = img.header
        snaps = read_snapshot_table(img.f, h, img.file_size())
        if any(s.name == name for s in snaps):
            raise ImageError(f"{path}: a snapshot named {name!r} already exists")
        l1 = img.read_l1()
        tree = _tree(img, l1)
        _apply_delta(img, tree, +1)
        # Everything reachable is now shared: no COPIED flag may remain.
        recompute_copied(img)
        rc = img.refcounts
        copy = [e & ~OFLAG_COPIED & 0xFFFF_FFFF_FFFF_FFFF for e in l1]
        l1_off = 0
        if copy:
            n = -(-len(copy) * 8 // img.cluster_size)
            l1_off = rc.alloc(n)
            rc.flush()
            img.write_table(l1_off, copy, n * img.cluster_size)
        now = time.time_ns()
        extra = (0).to_bytes(8, "big") + h.size.to_bytes(8, "big") + _NO_ICOUNT.to_bytes(8, "big")
        entry = SnapshotEntry(
            l1_table_offset=l1_off, l1_size=len(copy), id=_next_id(snaps), name=name,
            date_sec=now // 10**9, date_nsec=now % 10**9, vm_clock_nsec=0, vm_state_size=0,
            extra=extra,
        )  # fmt: skip
        img.sync()
        _write_table(img, [*snaps, entry])
        return entry


def delete_snapshot(path: str, wanted: str) -> SnapshotEntry:
    """Delete a snapshot (by ID or name) and release what only it used."""
    with _open(path, writable=True) as img:
        snaps = read_snapshot_table(img.f, img.header, img.file_size())
        victim = find_snapshot(snaps, wanted)
        l1 = img.read_table(victim.l1_table_offset, victim.l1_size, "snapshot L1 table")
        _write_table(img, [s for s in snaps if s is not victim])
        tree = _tree(img, l1)
        tree.update(_clusters(victim.l1_table_offset, victim.l1_size * 8, img.cluster_size))
        _apply_delta(img, tree, -1)
        recompute_copied(img)
        return victim


def apply_snapshot(path: str, wanted: str) -> SnapshotEntry:
    """Revert the active state to a snapshot (the snapshot is kept)."""
    with _open(path, writable=True) as img:
        h = img.header
        snaps = read_snapshot_table(img.f, h, img.file_size())
        snap = find_snapshot(snaps, wanted)
        new_l1 = img.read_table(snap.l1_table_offset, snap.l1_size, "snapshot L1 table")
        new_l1 = [e & ~OFLAG_COPIED & 0xFFFF_FFFF_FFFF_FFFF for e in new_l1]
        old_l1 = img.read_l1()
        new_tree = _tree(img, new_l1)
        old_tree = _tree(img, old_l1)
        _apply_delta(img, new_tree, +1)
        size = snap.disk_size if snap.disk_size is not None else h.size
        cs = img.cluster_size
        if len(new_l1) <= h.l1_size:
            # Overwrite in place, zero-padded (the old entries beyond the
            # snapshot's size belonged to the old tree, released below).
            img.write_table(h.l1_table_offset, new_l1, h.l1_size * 8)
            img.sync()
            if size != h.size:
                img.write_header(replace(h, size=size))
        else:
            n = -(-len(new_l1) * 8 // cs)
            rc = img.refcounts
            off = rc.alloc(n)
            rc.flush()
            img.write_table(off, new_l1, n * cs)
            img.sync()
            img.write_header(replace(h, l1_table_offset=off, l1_size=len(new_l1), size=size))
            old_tree.update(_clusters(h.l1_table_offset, h.l1_size * 8, cs))
        _apply_delta(img, old_tree, -1)
        recompute_copied(img)
        return snap


def describe(entries: list[SnapshotEntry]) -> str:
    """``qemu-img snapshot -l``-style listing."""
    lines = ["Snapshot list:", f"{'ID':<10}{'TAG':<18}{'VM SIZE':>8} {'DATE':<19} {'VM CLOCK':>15}"]
    for s in entries:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        secs, ms = s.vm_clock_nsec // 10**9, s.vm_clock_nsec // 10**6 % 1000
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ms:03d}"
        lines.append(f"{s.id:<10}{s.name:<18}{s.vm_state_size_large:>6} B {date} {clock:>15}")
    return "\n".join(lines)

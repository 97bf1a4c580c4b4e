"""Consistency check and repair (``qemu-img check [-r leaks|all]``).

Mirrors ``qcow2_check_refcounts`` and friends in qemu's
``block/qcow2-refcount.c`` and the invariants of qcow2.txt: every cluster's
refcount must equal the number of references to it.  The references are
rebuilt in memory from the header cluster, the active L1 table and its L2
tables and data clusters (compressed ranges count every cluster they touch),
every snapshot's L1/L2 tables, the snapshot table, the bitmap directory and
bitmap tables, the encryption header, the refcount table and every refcount
block.  Then, as qemu classifies:

* refcount > references: a *leak* (wasted space, harmless; ``-r leaks``);
* refcount < references: a *corruption* (``-r all`` rebuilds the refcount
  structure, see :mod:`nbdqcow.qcow2.rebuild`);
* COPIED set where the refcount is not 1 (or missing where it is), an
  unaligned table or cluster offset, a region past the end of the file, a
  refcount block outside the image: corruptions.

Exit statuses of ``qemu-img check``: 0 clean, 1 the check could not be
completed, 2 corruptions remain, 3 only leaks remain, 63 the file is not an
image this check supports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from nbdqcow.errors import NbdqcowError, UnsupportedImage
from nbdqcow.qcow2.bitmap import read_bitmap_directory
from nbdqcow.qcow2.entries import (
    ClusterType,
    SubclusterType,
    classify,
    classify_subcluster,
    l1_l2_offset,
)
from nbdqcow.qcow2.layout import L2E_OFFSET_MASK, MAGIC, OFLAG_COPIED, REFT_OFFSET_MASK
from nbdqcow.qcow2.offline import OfflineImage, unpack_table
from nbdqcow.qcow2.rebuild import rebuild_refcounts
from nbdqcow.qcow2.refcount import decode_block, entries_per_block
from nbdqcow.qcow2.snapshot import read_snapshot_table

__all__ = ["CheckResult", "Repair", "check_image", "compute_references"]

#: Bitmap table entries keep the data cluster offset in bits 9..55.
_BME_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


class Repair(enum.Enum):
    NONE = "none"
    LEAKS = "leaks"
    ALL = "all"


@dataclass
class CheckResult:
    """Counters with qemu-img's meaning (``--output=json`` keys)."""

    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    #: not a qcow2 image we can check (qemu-img's exit status 63)
    unsupported: bool = False

    @property
    def exit_code(self) -> int:
        if self.unsupported:
            return 63
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "image-end-offset": self.image_end_offset,
            "total-clusters": self.total_clusters,
            "check-errors": self.check_errors,
            "leaks": self.leaks,
            "corruptions": self.corruptions,
            "filename": self.filename,
            "format": "qcow2",
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
        }
        if self.leaks_fixed:
            out["leaks-fixed"] = self.leaks_fixed
        if self.corruptions_fixed:
            out["corruptions-fixed"] = self.corruptions_fixed
        return out


@dataclass
class _Scan:
    """References computed from the metadata."""

    refs: dict[int, int] = field(default_factory=dict)
    #: references held by the refcount table and blocks themselves.
    structure: dict[int, int] = field(default_factory=dict)
    #: active L2 tables: (l1 index, l2 offset) for the COPIED check.
    active_l2: list[tuple[int, int]] = field(default_factory=list)


class _Checker:
    def __init__(self, img: OfflineImage, res: CheckResult) -> None:
        self.img = img
        self.res = res
        self.h = img.header
        self.geo = img.geo
        self.cs = img.cluster_size
        self.file_size = img.file_size()
        self.scan = _Scan()
        self._next_contiguous = 0

    def msg(self, text: str) -> None:
        self.res.messages.append(text)

    def corrupt(self, text: str) -> None:
        self.res.corruptions += 1
        self.msg(text)

    def inc(self, offset: int, length: int, *, structure: bool = False) -> None:
        """Count one reference to every cluster of ``[offset, offset+length)``."""
        if length <= 0:
            return
        if offset + length - self.file_size >= self.cs:
            self.corrupt(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset {offset:#x} size {length:#x}"
            )
            return
        target = self.scan.structure if structure else self.scan.refs
        for c in range(offset // self.cs, (offset + length - 1) // self.cs + 1):
            target[c] = target.get(c, 0) + 1

    # -- L1/L2 ------------------------------------------------------------------
    def l1(self, l1_offset: int, l1_size: int, *, active: bool) -> None:
        if l1_size == 0:
            return
        self.inc(l1_offset, l1_size * 8)
        if l1_offset % self.cs or l1_offset + l1_size * 8 > self.file_size:
            self.corrupt(f"ERROR: L1 table at {l1_offset:#x} is unaligned or outside the image")
            return
        for i, e in enumerate(self.img.read_table(l1_offset, l1_size, "L1 table")):
            l2 = l1_l2_offset(e)
            if not l2:
                continue
            if l2 % self.cs:
                # Reported, then (as qemu does) still counted and scanned
                # where it points, so both tools tally the same references.
                self.corrupt(
                    f"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                )
            self.inc(l2, self.cs)
            if l2 + self.cs > self.file_size:
                continue
            if active:
                self.scan.active_l2.append((i, l2))
            self.l2(l2, active=active)

    def l2(self, l2_offset: int, *, active: bool) -> None:
        words = self.img.read_l2(l2_offset)
        step = 2 if self.geo.extended_l2 else 1
        ext = self.geo.extended_l2
        for j in range(0, len(words), step):
            e = words[j]
            bitmap = words[j + 1] if ext else 0
            ctype = classify(e, extended_l2=ext, data_file=self.h.has_data_file)
            if ctype is ClusterType.COMPRESSED:
                if e & OFLAG_COPIED:
                    self.corrupt(
                        f"ERROR: coffset={e & self.geo.coffset_mask:#x}: copied flag must "
                        "never be set for compressed clusters"
                    )
                if ext and bitmap:
                    self.corrupt(f"ERROR compressed cluster {e:#x} has a non-zero bitmap")
                host, nbytes = self.geo.compressed_range(e)
                self.inc(host - host % 512, nbytes + host % 512)
                if active:
                    # Compressed clusters count as fragmented by nature (as
                    # qemu counts them: they are re-read at sector grain).
                    self.res.allocated_clusters += 1
                    self.res.compressed_clusters += 1
                    self.res.fragmented_clusters += 1
                continue
            # The contradictions classify_subcluster flags do not depend on
            # the subcluster index, so asking about subcluster 0 suffices.
            sub = classify_subcluster(e, bitmap, 0, extended_l2=True) if ext else None
            if sub is SubclusterType.INVALID:
                self.corrupt(f"ERROR invalid cluster entry: {e:#018x} bitmap {bitmap:#018x}")
            if ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                off = e & L2E_OFFSET_MASK
                if self.h.has_data_file:
                    continue
                if off % self.cs:
                    self.corrupt(
                        f"ERROR offset={off:x}: Data cluster is not properly aligned; "
                        "L2 entry corrupted."
                    )
                if active:
                    self.res.allocated_clusters += 1
                    if off != self._next_contiguous and self._next_contiguous:
                        self.res.fragmented_clusters += 1
                    self._next_contiguous = off + self.cs
                self.inc(off, self.cs)

    # -- everything else --------------------------------------------------------
    def scan_all(self) -> None:
        h = self.h
        self.inc(0, self.cs)
        self.l1(h.l1_table_offset, h.l1_size, active=True)
        if h.nb_snapshots:
            snaps = read_snapshot_table(self.img.f, h, self.file_size)
            size = 0
            for s in snaps:
                size += len(s.pack())
                self.l1(s.l1_table_offset, s.l1_size, active=False)
            self.inc(h.snapshots_offset, size)
        for bm in read_bitmap_directory(self.img.f, h):
            ext = h.bitmaps
            assert ext is not None
            self.inc(bm.table_offset, bm.table_size * 8)
            for e in self.img.read_table(bm.table_offset, bm.table_size, "bitmap table"):
                if e & _BME_OFFSET_MASK:
                    self.inc(e & _BME_OFFSET_MASK, self.cs)
        if h.bitmaps is not None:
            self.inc(h.bitmaps.directory_offset, h.bitmaps.directory_size)
        crypto = h.crypto
        if crypto is not None:
            self.inc(crypto.offset, crypto.length)

    def image_refcounts(self) -> dict[int, int]:
        """The refcounts stored in the image (tolerant of a damaged structure)."""
        h = self.h
        out: dict[int, int] = {}
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs, structure=True)
        raw = self.img.f.pread_sync(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        rb_entries = entries_per_block(self.cs, h.refcount_order)
        for ri, e in enumerate(unpack_table(raw[: len(raw) - len(raw) % 8])):
            off = e & REFT_OFFSET_MASK
            if not off:
                continue
            if off % self.cs:
                self.corrupt(
                    f"ERROR refcount block {ri} is not cluster aligned; refcount table entry "
                    "corrupted"
                )
                continue
            if off >= self.file_size:
                self.corrupt(f"ERROR refcount block {ri} is outside image")
                continue
            self.inc(off, self.cs, structure=True)
            block = self.img.f.pread_sync(off, self.cs)
            block += bytes(self.cs - len(block))
            base = ri * rb_entries
            for i, v in enumerate(decode_block(block, h.refcount_order)):
                if v:
                    out[base + i] = v
        return out

    def compare(self, stored: dict[int, int]) -> list[int]:
        """Report mismatches; return the clusters that differ."""
        refs = self.references()
        nb = -(-self.file_size // self.cs)
        bad: list[int] = []
        for c in sorted(set(stored) | set(refs)):
            if c >= nb:
                continue
            have, want = stored.get(c, 0), refs.get(c, 0)
            if have == want:
                continue
            bad.append(c)
            if have > want:
                self.res.leaks += 1
                self.msg(f"Leaked cluster {c} refcount={have} reference={want}")
            else:
                self.corrupt(f"ERROR cluster {c} refcount={have} reference={want}")
        return bad

    def references(self) -> dict[int, int]:
        refs = dict(self.scan.refs)
        for c, n in self.scan.structure.items():
            refs[c] = refs.get(c, 0) + n
        return refs

    def check_copied(self, stored: dict[int, int], *, fix: bool) -> int:
        """COPIED must be set exactly where the refcount is 1 (active tables
        only).  Returns the number of entries fixed."""
        fixed = 0
        l1 = self.img.read_l1()
        l1_dirty = False
        for i, l2 in self.scan.active_l2:
            if fix and l2 % self.cs:
                # Never write a "table" at an unaligned offset: it would
                # overwrite the neighbouring clusters.
                fix = False
            rc = stored.get(l2 // self.cs, 0)
            if (rc == 1) != bool(l1[i] & OFLAG_COPIED):
                self.corrupt(
                    f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1[i]:x} refcount={rc}"
                )
                if fix:
                    l1[i] ^= OFLAG_COPIED
                    l1_dirty = True
                    fixed += 1
            words = self.img.read_l2(l2)
            step = 2 if self.geo.extended_l2 else 1
            dirty = False
            for j in range(0, len(words), step):
                e = words[j]
                ctype = classify(
                    e, extended_l2=self.geo.extended_l2, data_file=self.h.has_data_file
                )
                if ctype not in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                    continue
                off = e & L2E_OFFSET_MASK
                if off % self.cs or self.h.has_data_file:
                    continue
                rc = stored.get(off // self.cs, 0)
                if (rc == 1) != bool(e & OFLAG_COPIED):
                    self.corrupt(f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                    if fix:
                        words[j] = e ^ OFLAG_COPIED
                        dirty = True
                        fixed += 1
            if dirty:
                self.img.write_table(l2, words)
        if l1_dirty:
            self.img.write_table(self.h.l1_table_offset, l1)
        if fixed:
            self.img.sync()
        return fixed


def compute_references(img: OfflineImage) -> dict[int, int]:
    """References to every cluster except those of the refcount structure
    (what a rebuild encodes)."""
    chk = _Checker(img, CheckResult(img.path))
    chk.scan_all()
    return chk.scan.refs


def _run(img: OfflineImage, res: CheckResult) -> tuple[_Checker, list[int]]:
    chk = _Checker(img, res)
    chk.scan_all()
    stored = chk.image_refcounts()
    bad = chk.compare(stored)
    refs = chk.references()
    res.total_clusters = -(-img.header.size // img.cluster_size)
    res.image_end_offset = (max(refs, default=0) + 1) * img.cluster_size
    chk.check_copied(stored, fix=False)
    return chk, bad


def check_image(path: str, repair: Repair = Repair.NONE, *, lock: bool = True) -> CheckResult:
    """Check (and optionally repair) the qcow2 image at ``path``.

    Errors that stop the check (unreadable metadata) are counted in
    ``check_errors`` with a message, never raised.
    """
    res = CheckResult(path)
    try:
        with OfflineImage(path, writable=repair is not Repair.NONE, lock=lock) as img:
            chk, bad = _run(img, res)
            if repair is Repair.NONE or (not res.leaks and not res.corruptions):
                return res
            found = CheckResult(path, corruptions=res.corruptions, leaks=res.leaks)
            if repair is Repair.LEAKS:
                stored = chk.image_refcounts()
                refs = chk.references()
                rc = img.refcounts
                leaks_only = [c for c in bad if stored.get(c, 0) > refs.get(c, 0)]
                for c in leaks_only:
                    rc.update(c, refs.get(c, 0) - stored.get(c, 0))
                rc.flush()
                img.sync()
            else:
                if bad or chk.res.corruptions:
                    rebuild_refcounts(img, chk.scan.refs)
                after = _Checker(img, CheckResult(path))
                after.scan_all()
                after.check_copied(after.image_refcounts(), fix=True)
            # Double check, as qemu-img does, and report what changed.
            final = CheckResult(path)
            _run(img, final)
            final.leaks_fixed = max(0, found.leaks - final.leaks)
            final.corruptions_fixed = max(0, found.corruptions - final.corruptions)
            final.messages = [*res.messages, *final.messages]
            return final
    except UnsupportedImage as exc:
        # Not qcow2 at all: qemu-img's "format does not support checks";
        # a qcow2 image we cannot open is a failed check.
        res.unsupported = _magic(path) != MAGIC
        res.check_errors += 0 if res.unsupported else 1
        res.messages.append(f"ERROR: {exc}")
        return res
    except NbdqcowError as exc:
        res.check_errors += 1
        res.messages.append(f"ERROR: {exc}")
        return res
    except OSError as exc:
        res.check_errors += 1
        res.messages.append(f"ERROR: {exc.strerror or exc}")
        return res


def _magic(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(4)
    return int.from_bytes(head, "big") if len(head) == 4 else 0

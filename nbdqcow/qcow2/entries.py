"""Classification of L1/L2 entries (qemu ``block/qcow2.h``:
``qcow2_get_cluster_type`` and ``qcow2_get_subcluster_type``).

qcow2.txt "Cluster mapping" and "Extended L2 Entries" define what an entry
means; this module turns a raw 64-bit entry (plus the subcluster bitmap with
extended L2) into a closed enum, so that every reader and writer agrees on
one classification and none of them tests bits by hand.
"""

from __future__ import annotations

import enum

from nbdqcow.qcow2.layout import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
)

__all__ = [
    "L2_BITMAP_ALL_ALLOC",
    "L2_BITMAP_ALL_ZERO",
    "ClusterType",
    "SubclusterType",
    "classify",
    "classify_subcluster",
    "is_copied",
    "l1_l2_offset",
    "l1_reserved_bits",
    "l2_host_offset",
    "l2_reserved_bits",
    "subcluster_alloc_bit",
    "subcluster_zero_bit",
]

#: Bitmap word of an extended L2 entry: bits 0-31 "allocated", 32-63 "zero".
L2_BITMAP_ALL_ALLOC = 0x0000_0000_FFFF_FFFF
L2_BITMAP_ALL_ZERO = 0xFFFF_FFFF_0000_0000


class ClusterType(enum.Enum):
    """What a whole cluster's L2 entry says."""

    UNALLOCATED = "unallocated"  # read from the backing file (or zeros)
    ZERO_PLAIN = "zero_plain"  # reads as zeros, no host cluster
    ZERO_ALLOC = "zero_alloc"  # reads as zeros, host cluster preallocated
    NORMAL = "normal"  # data at the host offset
    COMPRESSED = "compressed"  # compressed data at a byte offset


class SubclusterType(enum.Enum):
    """What one subcluster reads as (without extended L2, the cluster's)."""

    UNALLOCATED_PLAIN = "unallocated_plain"  # backing, no host cluster
    UNALLOCATED_ALLOC = "unallocated_alloc"  # backing, host cluster exists
    ZERO_PLAIN = "zero_plain"
    ZERO_ALLOC = "zero_alloc"
    NORMAL = "normal"
    COMPRESSED = "compressed"
    INVALID = "invalid"  # bitmap contradicts the entry: corrupt metadata

    @property
    def reads_backing(self) -> bool:
        return self in (SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC)

    @property
    def reads_zero(self) -> bool:
        return self in (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC)


def l1_l2_offset(l1_entry: int) -> int:
    """Host offset of the L2 table an L1 entry points to (0: none)."""
    return l1_entry & L1E_OFFSET_MASK


def l1_reserved_bits(l1_entry: int) -> int:
    """Non-zero when an L1 entry has reserved bits set (corruption)."""
    return l1_entry & L1E_RESERVED_MASK


def l2_host_offset(l2_entry: int) -> int:
    """Host cluster offset of a standard (non-compressed) L2 entry."""
    return l2_entry & L2E_OFFSET_MASK


def l2_reserved_bits(l2_entry: int, *, extended_l2: bool = False) -> int:
    """Reserved bits set in a standard L2 entry (non-zero means corrupt).

    With extended L2, bit 0 (the zero flag) is unused and must be 0 as well.
    Compressed entries have no reserved bits here (their layout differs).
    """
    if l2_entry & OFLAG_COMPRESSED:
        return 0
    mask = L2E_STD_RESERVED_MASK | (OFLAG_ZERO if extended_l2 else 0)
    return l2_entry & mask


def is_copied(entry: int) -> bool:
    return bool(entry & OFLAG_COPIED)


def subcluster_alloc_bit(sc: int) -> int:
    return 1 << sc


def subcluster_zero_bit(sc: int) -> int:
    return 1 << (32 + sc)


def classify(l2_entry: int, *, extended_l2: bool = False, data_file: bool = False) -> ClusterType:
    """Classify a whole cluster from its (first) L2 entry word.

    Args:
        l2_entry: the 64-bit entry.
        extended_l2: the image has extended L2 entries; the zero flag is then
            unused (zeroes are per subcluster, in the bitmap).
        data_file: the image has an external data file, where host offset 0
            is a valid data cluster; qcow2.txt: such clusters always carry
            COPIED, which disambiguates them from "unallocated".
    """
    if l2_entry & OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    offset = l2_entry & L2E_OFFSET_MASK
    if l2_entry & OFLAG_ZERO and not extended_l2:
        return ClusterType.ZERO_ALLOC if offset else ClusterType.ZERO_PLAIN
    if not offset:
        if data_file and l2_entry & OFLAG_COPIED:
            return ClusterType.NORMAL
        return ClusterType.UNALLOCATED
    return ClusterType.NORMAL


def classify_subcluster(
    l2_entry: int,
    bitmap: int,
    sc: int,
    *,
    extended_l2: bool = False,
    data_file: bool = False,
) -> SubclusterType:
    """Classify subcluster ``sc`` (0..31) of a cluster.

    Without extended L2 the bitmap and ``sc`` are ignored and the result is
    the whole cluster's type.  With extended L2 the bitmap decides, and the
    spec's contradictions (a subcluster both allocated and zero; "allocated"
    bits on a cluster without a host offset) are ``INVALID``.
    """
    ctype = classify(l2_entry, extended_l2=extended_l2, data_file=data_file)
    if not extended_l2:
        return _PLAIN[ctype]
    if ctype is ClusterType.COMPRESSED:
        return SubclusterType.COMPRESSED
    if ctype is ClusterType.NORMAL:
        if (bitmap >> 32) & bitmap & L2_BITMAP_ALL_ALLOC:
            return SubclusterType.INVALID
        if bitmap & subcluster_zero_bit(sc):
            return SubclusterType.ZERO_ALLOC
        if bitmap & subcluster_alloc_bit(sc):
            return SubclusterType.NORMAL
        return SubclusterType.UNALLOCATED_ALLOC
    # UNALLOCATED (ZERO_* cannot occur with extended L2).
    if bitmap & L2_BITMAP_ALL_ALLOC:
        return SubclusterType.INVALID
    if bitmap & subcluster_zero_bit(sc):
        return SubclusterType.ZERO_PLAIN
    return SubclusterType.UNALLOCATED_PLAIN


_PLAIN = {
    ClusterType.UNALLOCATED: SubclusterType.UNALLOCATED_PLAIN,
    ClusterType.ZERO_PLAIN: SubclusterType.ZERO_PLAIN,
    ClusterType.ZERO_ALLOC: SubclusterType.ZERO_ALLOC,
    ClusterType.NORMAL: SubclusterType.NORMAL,
    ClusterType.COMPRESSED: SubclusterType.COMPRESSED,
}

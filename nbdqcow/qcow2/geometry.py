"""Pure address arithmetic of a qcow2 image (the helpers of qemu's
``block/qcow2.h``: ``offset_to_l1_index``, ``offset_to_l2_index``,
``offset_into_cluster``, ``size_to_clusters``, the compressed-descriptor and
refcount-block geometry).

Nothing here touches a file.  :class:`Geometry` is built once per image from
the header and handed to every other module, so that no module re-derives a
shift or a mask on its own (the usual place where qcow2 readers go wrong).
See qcow2.txt "Cluster mapping", "Compressed Clusters Descriptor" and
"Extended L2 Entries", and "Host cluster management" for refcounts.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdqcow.qcow2.layout import L2E_COMPRESSED_OFFSET_SIZE_MASK, Header

__all__ = [
    "SUBCLUSTERS_PER_CLUSTER",
    "Geometry",
    "div_round_up",
]

#: With extended L2 entries every cluster has exactly 32 subclusters.
SUBCLUSTERS_PER_CLUSTER = 32

#: Compressed data is addressed in 512-byte sectors.
SECTOR_SIZE = 512


def div_round_up(n: int, d: int) -> int:
    return -(-n // d)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Shifts and sizes derived from ``cluster_bits``, ``extended_l2`` and
    ``refcount_order``."""

    cluster_bits: int
    extended_l2: bool = False
    refcount_order: int = 4

    @classmethod
    def from_header(cls, h: Header) -> Geometry:
        return cls(h.cluster_bits, h.extended_l2, h.refcount_order)

    # -- clusters -------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def cluster_mask(self) -> int:
        return self.cluster_size - 1

    def offset_in_cluster(self, offset: int) -> int:
        return offset & self.cluster_mask

    def start_of_cluster(self, offset: int) -> int:
        return offset & ~self.cluster_mask

    def size_to_clusters(self, size: int) -> int:
        return (size + self.cluster_mask) >> self.cluster_bits

    def is_aligned(self, offset: int) -> bool:
        return offset & self.cluster_mask == 0

    # -- L1/L2 ----------------------------------------------------------------
    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry: 8, or 16 with extended L2 (entry + bitmap)."""
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table (one table fills one cluster)."""
        return self.cluster_size // self.l2_entry_size

    @property
    def l2_bits(self) -> int:
        return self.l2_entries.bit_length() - 1

    @property
    def bytes_per_l2(self) -> int:
        """Guest bytes covered by one L2 table (= one L1 entry)."""
        return self.l2_entries << self.cluster_bits

    def l1_index(self, offset: int) -> int:
        return offset >> (self.cluster_bits + self.l2_bits)

    def l2_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.l2_entries - 1)

    def l1_entries_for(self, size: int) -> int:
        """Minimum ``l1_size`` for a virtual disk of ``size`` bytes."""
        return div_round_up(size, self.bytes_per_l2)

    # -- subclusters ----------------------------------------------------------
    @property
    def subcluster_size(self) -> int:
        if not self.extended_l2:
            return self.cluster_size
        return self.cluster_size // SUBCLUSTERS_PER_CLUSTER

    @property
    def subcluster_bits(self) -> int:
        return self.subcluster_size.bit_length() - 1

    def subcluster_index(self, offset: int) -> int:
        """Index (0..31) of the subcluster holding guest ``offset``."""
        return (offset & self.cluster_mask) >> self.subcluster_bits

    # -- compressed descriptors ------------------------------------------------
    @property
    def csize_shift(self) -> int:
        """``x = 62 - (cluster_bits - 8)``: bits 0..x-1 hold the host offset."""
        return 62 - (self.cluster_bits - 8)

    @property
    def csize_mask(self) -> int:
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def coffset_mask(self) -> int:
        return (1 << self.csize_shift) - 1

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """Host byte offset and byte count of a compressed cluster's data.

        The count comes from the sector count, so it may include bytes of the
        next compressed cluster and may run past the end of the file (the
        caller clamps at EOF): qcow2.txt "Compressed Clusters Descriptor".
        """
        desc = entry & L2E_COMPRESSED_OFFSET_SIZE_MASK
        host = desc & self.coffset_mask
        nb_sectors = ((desc >> self.csize_shift) & self.csize_mask) + 1
        return host, nb_sectors * SECTOR_SIZE - (host % SECTOR_SIZE)

    def compressed_descriptor(self, host: int, nbytes: int) -> int:
        """The L2 descriptor (without ``OFLAG_COMPRESSED``) for ``nbytes``
        of compressed data at byte offset ``host``; for the write engine."""
        last_sector = (host + nbytes - 1) // SECTOR_SIZE
        extra = last_sector - host // SECTOR_SIZE
        if host > self.coffset_mask or extra > self.csize_mask:
            raise ValueError(f"compressed range {host}+{nbytes} cannot be described")
        return host | (extra << self.csize_shift)

    # -- refcounts --------------------------------------------------------------
    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refcount_max(self) -> int:
        return (1 << self.refcount_bits) - 1

    @property
    def refblock_entries(self) -> int:
        """Refcounts per refcount block (one block fills one cluster)."""
        return (self.cluster_size * 8) >> self.refcount_order

    def reftable_index(self, host_offset: int) -> int:
        return (host_offset >> self.cluster_bits) // self.refblock_entries

    def refblock_index(self, host_offset: int) -> int:
        return (host_offset >> self.cluster_bits) % self.refblock_entries

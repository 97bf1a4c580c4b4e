"""State and plumbing of the qcow2 write engine (:class:`EngineBase`),
shared by its paths: :mod:`~nbdqcow.qcow2.inline_write` (the lock-free fast
path), :mod:`~nbdqcow.qcow2.data_write` (the locked data path),
:mod:`~nbdqcow.qcow2.zeroing` (write-zeroes and trim) and
:mod:`~nbdqcow.qcow2.write` (the engine itself: entry points, flush, close).

Validation of L2 entries before a write (qcow2.txt "Cluster mapping":
reserved bits, alignment, no zero flag on v2), the corrupt state (qemu
``qcow2_signal_corruption``) and the sticky failed-``fdatasync`` state
(QCOW2.md section 7: the ordering barriers cannot be trusted after one).

Refcounts are always kept exact, even on images with the lazy-refcounts
compatible bit: lazy mode only *allows* stale counts, so the dirty bit is
never needed for our own writes.  An image that arrives dirty (another
writer crashed in lazy mode) is repaired -- refcounts rebuilt, as ``qemu-img
check -r all`` does -- and the bit cleared before the first write.
"""

from __future__ import annotations

import contextlib
import errno

from nbdqcow.errors import CorruptImage, ImageError
from nbdqcow.qcow2.alloc import Metadata
from nbdqcow.qcow2.entries import ClusterType, l2_reserved_bits
from nbdqcow.qcow2.image import Qcow2Image
from nbdqcow.qcow2.layout import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO

__all__ = ["HOSTED", "EngineBase"]

#: Cluster types that own a host cluster a write may land in.
HOSTED = (ClusterType.NORMAL, ClusterType.ZERO_ALLOC)


class EngineBase:
    """State of the write side of one open, writable :class:`Qcow2Image`."""

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img
        self.meta = Metadata(img)
        self.geo = img.geo
        self.cs = img.geo.cluster_size
        self.ext = img.geo.extended_l2
        self.broken: str | None = None
        self._closed = False
        #: guest cluster -> locked writers allocating or filling it now.
        self._busy: dict[int, int] = {}
        # Fast path (_write_now): precomputed shifts and masks.
        self._cbits = img.geo.cluster_bits
        self._l2_bits = img.geo.l2_bits
        self._l2_mask = img.geo.l2_entries - 1
        self._cmask = img.geo.cluster_mask

    @property
    def v3(self) -> bool:
        return self.img.header.version >= 3

    # -- plumbing -------------------------------------------------------------------
    def _usable(self) -> None:
        if self.broken is not None:
            raise OSError(errno.EIO, f"image was marked corrupt, writes are refused: {self.broken}")
        if self._closed:
            raise OSError(errno.EIO, "image is closed")
        lost = self._sync_lost()
        if lost is not None:
            raise OSError(errno.EIO, lost)

    def _sync_lost(self) -> str | None:
        """Why writes are refused after a failed ``fdatasync``, or None.

        The kernel may have dropped the pages that failed writeback (see
        :mod:`nbdqcow.io`), so neither the data nor the metadata ordering
        barriers (QCOW2.md section 7) can be trusted any more: every later
        write, zero, trim and flush fails with ``EIO``, like a corrupt
        image, while reads continue.  The corrupt bit is not set -- the
        metadata may well be fine, and writing the header would need the
        very sync that fails; ``qemu-img check`` is the way back.
        """
        img = self.img
        for f in (img.file, img.data):
            err = f.sync_error
            if err is not None:
                return (
                    f"an fdatasync of {f.path} failed ({err.strerror}); writes are refused "
                    "because data acknowledged before it may not be on disk"
                )
        return None

    def _fail(self, exc: ImageError) -> None:
        self.broken = str(exc)
        with contextlib.suppress(OSError):
            self.meta.mark_corrupt()

    def _backing_visible(self, guest: int) -> bool:
        b = self.img.backing
        return b is not None and guest < b.size

    def _slot(self, l2i: int) -> int:
        return 2 * l2i if self.ext else l2i

    def _check_entry(self, e: int, guest: int) -> None:
        if e & OFLAG_COMPRESSED:
            return
        if l2_reserved_bits(e, extended_l2=self.ext):
            raise CorruptImage(f"L2 entry {e:#018x} for guest offset {guest:#x} has reserved bits")
        host = e & L2E_OFFSET_MASK
        if host % self.cs:
            raise CorruptImage(
                f"L2 entry {e:#018x} for guest offset {guest:#x}: host offset unaligned"
            )
        if not self.v3 and e & OFLAG_ZERO:
            raise CorruptImage(f"L2 entry {e:#018x} for guest offset {guest:#x}: zero flag in v2")


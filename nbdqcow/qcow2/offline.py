"""Synchronous access to the metadata of a closed qcow2 image.

The tools that work on an image nobody is serving -- ``create``, ``check``,
``snapshot`` -- share this small layer: read the header (via
:mod:`nbdqcow.qcow2.layout`), load the active L1 table, load and store L2
tables, and rewrite the header with one synced write, which is how every
pointer switch of QCOW2.md section 7 rule 2 is made durable ("header fields
updated together in one write").  Refcounts come from
:class:`nbdqcow.qcow2.refcount.Refcounts`, wired so that a reftable that has
to grow switches the header through :meth:`OfflineImage.write_header`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import replace

from nbdqcow.errors import CorruptImage
from nbdqcow.io import HostFile
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.layout import Header
from nbdqcow.qcow2.lock import LOCK_READ, LOCK_WRITE, lock_image
from nbdqcow.qcow2.refcount import Refcounts

__all__ = ["OfflineImage", "pack_table", "unpack_table"]


def unpack_table(raw: bytes | bytearray) -> list[int]:
    """Big-endian u64 entries of an L1/L2/reftable."""
    return [e for (e,) in struct.iter_unpack(">Q", raw)]


def pack_table(entries: list[int], size: int | None = None) -> bytes:
    """Serialise u64 entries, zero-padded to ``size`` bytes if given."""
    out = struct.pack(f">{len(entries)}Q", *entries)
    if size is not None and size > len(out):
        out += bytes(size - len(out))
    return out


class OfflineImage:
    """A qcow2 image opened for metadata work by one synchronous tool.

    Args:
        path: the image file.
        writable: open read-write (refcount changes, header rewrites).
        lock: take qemu-compatible image locks (off only for a caller that
            already holds the image's write lock through another fd).

    Raises:
        ImageLocked: another process is writing the image.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, writable: bool, lock: bool = True
    ) -> None:
        self.path = os.fspath(path)
        self.f = HostFile(path, writable=writable)
        try:
            if lock:
                # Like qemu-img: refuse an image another process writes (a
                # served image), and keep writers away while we work.
                lock_image(self.f.fd, self.path, LOCK_WRITE if writable else LOCK_READ)
            head = self.f.pread_sync(0, 2 * 1024 * 1024)
            self.header = Header.unpack(head)
            self.geo = Geometry.from_header(self.header)
            self.writable = writable
            self._refcounts: Refcounts | None = None
        except BaseException:
            self.f.close()
            raise

    def __enter__(self) -> OfflineImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    # -- header ---------------------------------------------------------------
    def write_header(self, header: Header) -> None:
        """Replace the header (one write of cluster 0's used bytes), synced."""
        data = header.pack()
        self.f.pwrite_sync(0, data)
        self.f.fdatasync_sync()
        self.header = header.layout()

    def _switch_reftable(self, offset: int, clusters: int) -> None:
        self.write_header(
            replace(self.header, refcount_table_offset=offset, refcount_table_clusters=clusters)
        )

    # -- refcounts ------------------------------------------------------------
    @property
    def refcounts(self) -> Refcounts:
        if self._refcounts is None:
            self._refcounts = Refcounts(
                self.f,
                cluster_bits=self.header.cluster_bits,
                refcount_order=self.header.refcount_order,
                table_offset=self.header.refcount_table_offset,
                table_clusters=self.header.refcount_table_clusters,
                switch_table=self._switch_reftable,
                writable=self.writable,
            )
        return self._refcounts

    def reload_refcounts(self) -> None:
        """Forget cached refcount state (after check rebuilt it on disk)."""
        self._refcounts = None

    # -- tables ---------------------------------------------------------------
    def read_table(self, offset: int, entries: int, what: str) -> list[int]:
        """Read ``entries`` u64s at ``offset``; short reads are corruption."""
        raw = self.f.pread_sync(offset, entries * 8)
        if len(raw) != entries * 8:
            raise CorruptImage(f"{what} at {offset:#x} ({entries} entries) runs past end of file")
        return unpack_table(raw)

    def read_l1(self) -> list[int]:
        return self.read_table(self.header.l1_table_offset, self.header.l1_size, "L1 table")

    def read_l2(self, offset: int) -> list[int]:
        # Always one cluster of u64 words; with extended L2 entries word
        # 2i is entry i's descriptor and word 2i+1 its subcluster bitmap.
        return self.read_table(offset, self.cluster_size // 8, "L2 table")

    def write_table(self, offset: int, entries: list[int], size: int | None = None) -> None:
        self.f.pwrite_sync(offset, pack_table(entries, size))

    def sync(self) -> None:
        self.f.fdatasync_sync()

    def file_size(self) -> int:
        return self.f.size()

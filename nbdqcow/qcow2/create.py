"""Create a new, empty qcow2 image (``qemu-img create -f qcow2``).

Mirrors the layout ``block/qcow2.c:qcow2_co_create`` produces, described in
qcow2.txt ("Header", "Host cluster management"): cluster 0 holds the header,
its extensions and the backing file name; cluster 1 the refcount table;
cluster 2 the first refcount block; the L1 table follows.  The first three
clusters are written by hand (nothing can be allocated before a refcount
structure exists); the L1 table is then allocated through
:class:`~nbdqcow.qcow2.refcount.Refcounts`, which grows the refcount
structure on its own when the L1 table is large.

The file is created with ``O_EXCL``: an existing file is never overwritten.
On any failure the partial file is removed.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, replace

from nbdqcow.errors import ImageError
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.layout import (
    EXT_BACKING_FORMAT,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE,
    CompatFeature,
    CompressionType,
    Header,
    HeaderExtension,
    IncompatFeature,
)
from nbdqcow.qcow2.offline import OfflineImage
from nbdqcow.qcow2.refcount import RefBlock

__all__ = ["CreateOptions", "create", "parse_size"]

#: qemu limits the L1 table to 32 MiB (QCOW_MAX_L1_SIZE).
_MAX_L1_BYTES = 32 * 1024 * 1024
#: header_length qemu writes for v3: 104 bytes + compression_type + padding.
_V3_HEADER_LENGTH = 112

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
             "e": 1 << 60}  # fmt: skip


def parse_size(text: str) -> int:
    """Parse ``1G``, ``512M``, ``64k``, ``1048576`` (binary suffixes, as
    qemu-img does); raise :class:`ImageError` naming the bad value."""
    t = text.strip().lower()
    if t.endswith("ib"):
        t = t[:-2]
    num, suffix = t, ""
    if t and t[-1] in _SUFFIXES and not t[-1].isdigit():
        num, suffix = t[:-1], t[-1]
    try:
        value = float(num) * _SUFFIXES[suffix] if "." in num else int(num) * _SUFFIXES[suffix]
    except (ValueError, KeyError):
        raise ImageError(f"invalid size {text!r} (expected e.g. 1G, 512M, 65536)") from None
    if value < 0 or int(value) != value:
        raise ImageError(f"invalid size {text!r}: must be a whole, non-negative number of bytes")
    return int(value)


@dataclass(frozen=True, slots=True)
class CreateOptions:
    """Validated creation parameters (the ``-o`` options of qemu-img)."""

    size: int
    cluster_size: int = 65536
    version: int = 3
    refcount_bits: int = 16
    extended_l2: bool = False
    lazy_refcounts: bool = False
    compression_type: str = "zlib"
    backing: str | None = None
    backing_format: str | None = None

    def validate(self) -> None:
        cs = self.cluster_size
        if cs <= 0 or cs & (cs - 1) or not (
            1 << MIN_CLUSTER_BITS <= cs <= 1 << MAX_CLUSTER_BITS
        ):
            raise ImageError(
                f"cluster_size {cs} must be a power of two between "
                f"{1 << MIN_CLUSTER_BITS} and {1 << MAX_CLUSTER_BITS}"
            )
        if self.version not in (2, 3):
            raise ImageError(f"version {self.version} is not supported (2 or 3)")
        rb = self.refcount_bits
        if rb <= 0 or rb & (rb - 1) or rb > 64:
            raise ImageError(f"refcount_bits {rb} must be a power of two between 1 and 64")
        if self.version == 2 and rb != 16:
            raise ImageError(f"refcount_bits {rb} needs version 3 (v2 images use 16)")
        if self.extended_l2:
            if self.version == 2:
                raise ImageError("extended_l2 needs version 3")
            if cs < 16384:
                raise ImageError(f"extended_l2 needs cluster_size >= 16384 (got {cs})")
        if self.lazy_refcounts and self.version == 2:
            raise ImageError("lazy_refcounts needs version 3")
        if self.compression_type not in ("zlib", "zstd"):
            raise ImageError(
                f"compression_type {self.compression_type!r} is not supported (zlib or zstd)"
            )
        if self.compression_type == "zstd" and self.version == 2:
            raise ImageError("compression_type zstd needs version 3")
        if self.size < 0 or self.size % 512:
            raise ImageError(f"size {self.size} must be a non-negative multiple of 512")
        if self.backing is not None:
            if not self.backing_format:
                raise ImageError(
                    "a backing file needs an explicit backing format (-F raw or -F qcow2): "
                    "nbdqcow never probes formats"
                )
            if len(self.backing.encode()) > MAX_BACKING_NAME:
                raise ImageError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
        elif self.backing_format is not None:
            raise ImageError("backing_format given without a backing file")
        geo = Geometry(cs.bit_length() - 1, self.extended_l2, rb.bit_length() - 1)
        if geo.l1_entries_for(self.size) * 8 > _MAX_L1_BYTES:
            raise ImageError(
                f"size {self.size} is too large for cluster_size {cs} "
                f"(the L1 table would exceed {_MAX_L1_BYTES} bytes)"
            )

    def header(self) -> Header:
        """The header of the new image (tables not placed yet)."""
        cbits = self.cluster_size.bit_length() - 1
        exts: tuple[HeaderExtension, ...] = ()
        if self.backing_format is not None:
            exts = (HeaderExtension(EXT_BACKING_FORMAT, self.backing_format.encode()),)
        backing = None if self.backing is None else self.backing.encode()
        geo = Geometry(cbits, self.extended_l2)
        common = dict(
            version=self.version, backing_file_offset=0, backing_file_size=0,
            cluster_bits=cbits, size=self.size, crypt_method=0,
            l1_size=geo.l1_entries_for(self.size), l1_table_offset=0,
            refcount_table_offset=self.cluster_size, refcount_table_clusters=1,
            nb_snapshots=0, snapshots_offset=0,
        )  # fmt: skip
        if self.version == 2:
            return Header(**common, header_length=V2_HEADER_SIZE,  # type: ignore[arg-type]
                          extensions=exts, backing_file=backing)  # fmt: skip
        incompat = 0
        if self.extended_l2:
            incompat |= IncompatFeature.EXTL2
        ctype = CompressionType.ZLIB
        if self.compression_type == "zstd":
            incompat |= IncompatFeature.COMPRESSION
            ctype = CompressionType.ZSTD
        compat = CompatFeature.LAZY_REFCOUNTS if self.lazy_refcounts else 0
        assert _V3_HEADER_LENGTH > V3_HEADER_SIZE
        return Header(
            **common,  # type: ignore[arg-type]
            incompatible_features=int(incompat),
            compatible_features=int(compat),
            autoclear_features=0,
            refcount_order=self.refcount_bits.bit_length() - 1,
            header_length=_V3_HEADER_LENGTH,
            compression_type=int(ctype),
            extensions=exts,
            backing_file=backing,
        )


def create(
    path: str | os.PathLike[str],
    size: int,
    *,
    cluster_size: int = 65536,
    version: int = 3,
    refcount_bits: int = 16,
    extended_l2: bool = False,
    lazy_refcounts: bool = False,
    compression_type: str = "zlib",
    backing: str | None = None,
    backing_format: str | None = None,
) -> None:
    """Create an empty qcow2 image at ``path``.

    Raises:
        ImageError: an option is invalid (the message names it).
        FileExistsError: ``path`` exists; it is left untouched.
    """
    opts = CreateOptions(
        size, cluster_size, version, refcount_bits, extended_l2, lazy_refcounts,
        compression_type, backing, backing_format,
    )  # fmt: skip
    opts.validate()
    header = opts.header()
    if len(header.pack()) > cluster_size:
        raise ImageError(
            f"header and backing file name do not fit in one {cluster_size}-byte cluster"
        )
    path = os.fspath(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            _bootstrap(fd, header)
        finally:
            os.close(fd)
        _place_l1(path, header)
    except BaseException:
        os.unlink(path)
        raise


def _bootstrap(fd: int, header: Header) -> None:
    """Write header, reftable (cluster 1) and first refblock (cluster 2).

    The refblock counts clusters 0..2; entry 0 of the reftable points at it.
    """
    cs = header.cluster_size
    block = RefBlock(bytearray(cs), header.refcount_order)
    for c in range(3):
        block.set(c, 1)
    reftable = bytearray(cs)
    struct.pack_into(">Q", reftable, 0, 2 * cs)
    os.pwrite(fd, header.pack(), 0)
    os.pwrite(fd, reftable, cs)
    os.pwrite(fd, block.data, 2 * cs)
    os.ftruncate(fd, 3 * cs)


def _place_l1(path: str, header: Header) -> None:
    with OfflineImage(path, writable=True) as img:
        l1_bytes = header.l1_size * 8
        if l1_bytes == 0:
            # Like qemu: a zero-sized disk has no L1 table at all.
            return
        nclusters = -(-l1_bytes // img.cluster_size)
        rc = img.refcounts
        off = rc.alloc(nclusters)
        rc.flush()
        end = max(img.file_size(), rc.end_offset())
        img.f.truncate(max(end, off + nclusters * img.cluster_size))
        img.sync()
        img.write_header(replace(img.header, l1_table_offset=off))
        if img.file_size() % img.cluster_size:  # pragma: no cover - defensive
            raise OSError(errno.EIO, "created image has a partial cluster")

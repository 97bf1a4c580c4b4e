"""The qcow2 on-disk header and header extensions (the feature bits, entry
masks, limits and extension types are :mod:`~nbdqcow.qcow2.constants`,
re-exported here).

Mirrors ``docs/interop/qcow2.txt`` ("Header", "Header extensions", "Feature
name table", "Bitmaps extension", "Full disk encryption header pointer",
"External data file name") and the layout half of qemu's ``block/qcow2.h``.

This module is *structural*: :meth:`Header.unpack` refuses what cannot be
parsed at all (bad magic, unknown version, a header or extension that runs out
of cluster 0) and keeps every other value as the raw integer found on disk,
unknown bits included.  The semantic checks (limits, alignment, pointers
beyond EOF, unknown incompatible features) live in
:mod:`nbdqcow.qcow2.validate`, which runs before any pointer is followed.

:meth:`Header.pack` is the exact inverse for images qemu writes: it re-emits
unknown trailing header fields and unknown extensions in their original order
(the spec: unknown header extensions "must be preserved" by a writer that
rewrites the header), then the end-of-extensions marker, then the backing
file name, recomputing ``backing_file_offset``/``backing_file_size``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from nbdqcow.errors import CorruptImage, UnsupportedImage
from nbdqcow.qcow2.constants import (
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    KNOWN_INCOMPAT,
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_COMPRESSED_OFFSET_SIZE_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE,
    AutoclearFeature,
    CompatFeature,
    CompressionType,
    CryptMethod,
    FeatureType,
    IncompatFeature,
)

__all__ = [
    "EXT_BACKING_FORMAT",
    "EXT_BITMAPS",
    "EXT_CRYPTO",
    "EXT_DATA_FILE",
    "EXT_END",
    "EXT_FEATURE_TABLE",
    "KNOWN_INCOMPAT",
    "L1E_OFFSET_MASK",
    "L1E_RESERVED_MASK",
    "L2E_COMPRESSED_OFFSET_SIZE_MASK",
    "L2E_OFFSET_MASK",
    "L2E_STD_RESERVED_MASK",
    "MAGIC",
    "MAX_BACKING_NAME",
    "MAX_CLUSTER_BITS",
    "MAX_L1_BYTES",
    "MAX_REFTABLE_BYTES",
    "MAX_SNAPSHOTS",
    "MIN_CLUSTER_BITS",
    "OFLAG_COMPRESSED",
    "OFLAG_COPIED",
    "OFLAG_ZERO",
    "REFT_OFFSET_MASK",
    "REFT_RESERVED_MASK",
    "V2_HEADER_SIZE",
    "V3_HEADER_SIZE",
    "AutoclearFeature",
    "BitmapsExtension",
    "CompatFeature",
    "CompressionType",
    "CryptMethod",
    "CryptoExtension",
    "FeatureName",
    "FeatureType",
    "Header",
    "HeaderExtension",
    "IncompatFeature",
]

# C: u32 magic, u32 version, u64 backing_file_offset, u32 backing_file_size,
#    u32 cluster_bits, u64 size, u32 crypt_method, u32 l1_size,
#    u64 l1_table_offset, u64 refcount_table_offset,
#    u32 refcount_table_clusters, u32 nb_snapshots, u64 snapshots_offset
_V2 = struct.Struct(">IIQIIQIIQQIIQ")
# C: u64 incompatible_features, u64 compatible_features,
#    u64 autoclear_features, u32 refcount_order, u32 header_length
_V3 = struct.Struct(">QQQII")
# C: u32 type, u32 length (then data, padded to a multiple of 8)
_EXT = struct.Struct(">II")
# C: u8 type, u8 bit, char name[46]
_FEATURE = struct.Struct(">BB46s")
# C: u32 nb_bitmaps, u32 reserved, u64 bitmap_directory_size,
#    u64 bitmap_directory_offset
_BITMAPS = struct.Struct(">IIQQ")
# C: u64 offset, u64 length
_CRYPTO = struct.Struct(">QQ")

assert _V2.size == V2_HEADER_SIZE and _V2.size + _V3.size == V3_HEADER_SIZE


def _pad8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True, slots=True)
class HeaderExtension:
    """One header extension, kept as raw bytes (known or not)."""

    type: int
    data: bytes

    def pack(self) -> bytes:
        body = _EXT.pack(self.type, len(self.data)) + self.data
        return body + bytes(_pad8(len(body)) - len(body))


@dataclass(frozen=True, slots=True)
class FeatureName:
    """An entry of the feature name table extension."""

    type: int
    bit: int
    name: str


@dataclass(frozen=True, slots=True)
class BitmapsExtension:
    nb_bitmaps: int
    reserved: int
    directory_size: int
    directory_offset: int

    @classmethod
    def unpack(cls, data: bytes) -> BitmapsExtension:
        if len(data) < _BITMAPS.size:
            raise CorruptImage(
                f"bitmaps header extension is {len(data)} bytes, expected {_BITMAPS.size}"
            )
        return cls(*_BITMAPS.unpack_from(data))

    def pack(self) -> bytes:
        return _BITMAPS.pack(
            self.nb_bitmaps, self.reserved, self.directory_size, self.directory_offset
        )


@dataclass(frozen=True, slots=True)
class CryptoExtension:
    offset: int
    length: int

    @classmethod
    def unpack(cls, data: bytes) -> CryptoExtension:
        if len(data) < _CRYPTO.size:
            raise CorruptImage(
                f"crypto header extension is {len(data)} bytes, expected {_CRYPTO.size}"
            )
        return cls(*_CRYPTO.unpack_from(data))


@dataclass(frozen=True, slots=True)
class Header:
    """The image header plus everything else stored in cluster 0.

    Integer fields are the raw on-disk values (unknown feature bits kept).
    For v2 images the v3-only fields read as qcow2.txt defines them for v2:
    no features, ``refcount_order`` 4, ``header_length`` 72.

    ``tail`` holds the header bytes after ``compression_type`` up to
    ``header_length`` (padding, or fields of a future version), so that
    :meth:`pack` can re-emit them unchanged.
    """

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_SIZE
    compression_type: int = 0
    tail: bytes = b""
    extensions: tuple[HeaderExtension, ...] = ()
    #: the backing file name as stored (attacker data: bytes, not a path).
    backing_file: bytes | None = None
    #: offset of the end-of-extensions marker (or where the scan stopped).
    extensions_end: int = field(default=0, compare=False)

    # -- derived values -----------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & IncompatFeature.EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & IncompatFeature.DATA_FILE)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & IncompatFeature.DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & IncompatFeature.CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & CompatFeature.LAZY_REFCOUNTS)

    def extension(self, ext_type: int) -> HeaderExtension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(EXT_BACKING_FORMAT)
        return None if ext is None else ext.data.decode("utf-8", "replace")

    @property
    def data_file(self) -> bytes | None:
        ext = self.extension(EXT_DATA_FILE)
        return None if ext is None else ext.data

    @property
    def bitmaps(self) -> BitmapsExtension | None:
        ext = self.extension(EXT_BITMAPS)
        return None if ext is None else BitmapsExtension.unpack(ext.data)

    @property
    def crypto(self) -> CryptoExtension | None:
        ext = self.extension(EXT_CRYPTO)
        return None if ext is None else CryptoExtension.unpack(ext.data)

    @property
    def feature_names(self) -> tuple[FeatureName, ...]:
        ext = self.extension(EXT_FEATURE_TABLE)
        if ext is None:
            return ()
        out = []
        # A trailing partial entry is ignored: the table is informative only.
        for pos in range(0, len(ext.data) - _FEATURE.size + 1, _FEATURE.size):
            ftype, bit, raw = _FEATURE.unpack_from(ext.data, pos)
            name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            out.append(FeatureName(ftype, bit, name))
        return tuple(out)

    def feature_name(self, ftype: FeatureType, bit: int) -> str | None:
        for f in self.feature_names:
            if f.type == ftype and f.bit == bit:
                return f.name
        return None

    # -- parsing --------------------------------------------------------------
    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Header:
        """Parse cluster 0.

        Args:
            buf: the start of the image file: at least the whole first
                cluster, or the whole file if it is shorter.

        Raises:
            UnsupportedImage: not a qcow2 image, or a version other than 2/3.
            CorruptImage: the header, an extension or the backing file name
                does not fit where the spec says it must.
        """
        buf = bytes(buf)
        if len(buf) < 8:
            raise UnsupportedImage(f"file is too short ({len(buf)} bytes) to be a qcow2 image")
        magic, version = struct.unpack_from(">II", buf)
        if magic != MAGIC:
            raise UnsupportedImage(f"bad magic {magic:#010x}: not a qcow2 image")
        if version not in (2, 3):
            raise UnsupportedImage(f"unsupported qcow2 version {version} (only 2 and 3)")
        min_len = V2_HEADER_SIZE if version == 2 else V3_HEADER_SIZE
        if len(buf) < min_len:
            raise CorruptImage(f"file ends inside the {min_len}-byte v{version} header")
        (_, _, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, snap_off) = _V2.unpack_from(buf)  # fmt: skip
        if not MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS:
            # Checked here because cluster 0's extent depends on it.
            raise UnsupportedImage(
                f"cluster_bits {cbits} out of range "
                f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})"
            )
        cluster_size = 1 << cbits
        kw: dict[str, int | bytes] = {}
        hlen = V2_HEADER_SIZE
        if version == 3:
            incompat, compat, autoclear, rorder, hlen = _V3.unpack_from(buf, V2_HEADER_SIZE)
            if hlen < V3_HEADER_SIZE or hlen % 8 or hlen > cluster_size:
                raise CorruptImage(
                    f"header_length {hlen} invalid (must be >= {V3_HEADER_SIZE}, "
                    f"a multiple of 8 and at most the cluster size {cluster_size})"
                )
            if len(buf) < hlen:
                raise CorruptImage(f"file ends inside the header (header_length {hlen})")
            kw = {
                "incompatible_features": incompat,
                "compatible_features": compat,
                "autoclear_features": autoclear,
                "refcount_order": rorder,
                "header_length": hlen,
            }
            if hlen > V3_HEADER_SIZE:
                kw["compression_type"] = buf[V3_HEADER_SIZE]
                kw["tail"] = buf[V3_HEADER_SIZE + 1 : hlen]
        # Extensions live between the header and the backing file name (or
        # the end of cluster 0).
        limit = min(cluster_size, len(buf))
        if bfo:
            limit = min(limit, bfo)
        exts: list[HeaderExtension] = []
        seen: set[int] = set()
        pos = hlen
        while True:
            if pos + _EXT.size > limit:
                # qemu tolerates a missing end marker when the extension
                # area is exhausted; so do we.
                break
            etype, elen = _EXT.unpack_from(buf, pos)
            if etype == EXT_END:
                break
            data_at = pos + _EXT.size
            if elen > limit - data_at:
                raise CorruptImage(
                    f"header extension {etype:#010x} at offset {pos} has length {elen}, "
                    f"which runs past the extension area (ends at {limit})"
                )
            if etype in seen:
                raise CorruptImage(f"header extension {etype:#010x} appears twice")
            seen.add(etype)
            exts.append(HeaderExtension(etype, buf[data_at : data_at + elen]))
            pos = data_at + _pad8(elen)
        backing: bytes | None = None
        if bfo:
            if bfs > MAX_BACKING_NAME:
                raise CorruptImage(
                    f"backing_file_size {bfs} exceeds the limit of {MAX_BACKING_NAME} bytes"
                )
            if bfo < hlen or bfo + bfs > cluster_size:
                raise CorruptImage(
                    f"backing file name (backing_file_offset {bfo}, backing_file_size {bfs}) "
                    f"lies outside the header cluster after the header"
                )
            if bfo + bfs > len(buf):
                raise CorruptImage(f"file ends inside the backing file name at {bfo}")
            backing = buf[bfo : bfo + bfs]
        return cls(
            version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
            nb_snap, snap_off, extensions=tuple(exts), backing_file=backing,
            extensions_end=pos, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    # -- serialising ----------------------------------------------------------
    def layout(self) -> Header:
        """This header with ``backing_file_offset``/``backing_file_size``
        (and ``extensions_end``) set to where :meth:`pack` puts them."""
        pos = self.header_length
        for ext in self.extensions:
            pos += _pad8(_EXT.size + len(ext.data))
        pos += _EXT.size  # end marker
        if self.backing_file is None:
            return replace(self, backing_file_offset=0, backing_file_size=0, extensions_end=pos - 8)
        return replace(
            self,
            backing_file_offset=pos,
            backing_file_size=len(self.backing_file),
            extensions_end=pos - 8,
        )

    def pack(self) -> bytes:
        """Serialise the header, extensions and backing file name.

        The layout is qemu's: header, extensions in order, end marker,
        backing file name.  ``backing_file_offset``/``size`` are recomputed
        (see :meth:`layout`).  Raises ``ValueError`` if the result does not fit
        in cluster 0 -- a bug in the caller, not bad input.
        """
        h = self.layout()
        out = bytearray(
            _V2.pack(
                MAGIC, h.version, h.backing_file_offset, h.backing_file_size, h.cluster_bits,
                h.size, h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
                h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset,
            )
        )  # fmt: skip
        if h.version >= 3:
            out += _V3.pack(
                h.incompatible_features,
                h.compatible_features,
                h.autoclear_features,
                h.refcount_order,
                h.header_length,
            )
            if h.header_length > V3_HEADER_SIZE:
                out.append(h.compression_type)
                tail = h.tail[: h.header_length - V3_HEADER_SIZE - 1]
                out += tail + bytes(h.header_length - len(out) - len(tail))
        for ext in h.extensions:
            out += ext.pack()
        out += _EXT.pack(EXT_END, 0)
        if h.backing_file is not None:
            out += h.backing_file
        if len(out) > h.cluster_size:
            raise ValueError(f"header needs {len(out)} bytes, cluster size is {h.cluster_size}")
        return bytes(out)

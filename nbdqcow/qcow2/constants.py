"""qcow2 constants (qcow2.txt "Header": magic, header sizes, feature bits;
"Cluster mapping": L1/L2 entry bits and masks; "Host cluster management":
reftable entry masks; "Header extensions": extension types) and qemu's
limits (QCOW2.md sections 2 and 10).  Re-exported by
:mod:`~nbdqcow.qcow2.layout`, where the rest of the package imports them.
"""

from __future__ import annotations

import enum

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
    "CompatFeature",
    "CompressionType",
    "CryptMethod",
    "FeatureType",
    "IncompatFeature",
]

#: "QFI\xfb"
MAGIC = 0x514649FB

#: v2 headers end after ``snapshots_offset``; v3 adds five fields (104 bytes)
#: and optionally the compression type byte plus padding (qemu writes 112).
V2_HEADER_SIZE = 72
V3_HEADER_SIZE = 104

# --- limits (QCOW2.md section 2 and 10; the values are qemu's) --------------
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023

# --- entry bits (qcow2.txt "Cluster mapping") -------------------------------
# Python ints are unbounded: every mask is written out as a 64-bit constant so
# that no code ever needs a bare ``~x``.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1E_RESERVED_MASK = 0x7F00_0000_0000_01FF
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_STD_RESERVED_MASK = 0x3F00_0000_0000_01FE
#: bits 0..61 of a compressed entry: host offset and sector count.
L2E_COMPRESSED_OFFSET_SIZE_MASK = 0x3FFF_FFFF_FFFF_FFFF
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
REFT_RESERVED_MASK = 0x1FF

# --- header extension types -------------------------------------------------
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441


class IncompatFeature(enum.IntFlag):
    """``incompatible_features`` (bytes 72-79): an unknown bit forbids use."""

    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    DATA_FILE = 1 << 2
    COMPRESSION = 1 << 3
    EXTL2 = 1 << 4


KNOWN_INCOMPAT = int(
    IncompatFeature.DIRTY
    | IncompatFeature.CORRUPT
    | IncompatFeature.DATA_FILE
    | IncompatFeature.COMPRESSION
    | IncompatFeature.EXTL2
)


class CompatFeature(enum.IntFlag):
    """``compatible_features`` (bytes 80-87): unknown bits may be ignored."""

    LAZY_REFCOUNTS = 1 << 0


class AutoclearFeature(enum.IntFlag):
    """``autoclear_features`` (bytes 88-95): a writer that does not know a
    bit must clear it before its first write."""

    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


class CompressionType(enum.IntEnum):
    ZLIB = 0
    ZSTD = 1


class CryptMethod(enum.IntEnum):
    NONE = 0
    AES = 1
    LUKS = 2


class FeatureType(enum.IntEnum):
    INCOMPATIBLE = 0
    COMPATIBLE = 1
    AUTOCLEAR = 2

"""Open-time validation of a parsed qcow2 header (qemu ``qcow2_do_open``;
QCOW2.md sections 2 and 10).

Every field is checked before anything follows a pointer in it: limits that
bound memory (``l1_size``, the refcount table, the snapshot count), pointer
alignment, pointers past the end of the file or into the header cluster,
feature bits we do not understand, encryption.  Each refusal is one of our
exceptions with a message naming the field and its value.

The checks are pure (header + file size in, exception or nothing out) so the
write engine can re-run them on a header it is about to write.
"""

from __future__ import annotations

from nbdqcow.errors import CorruptImage, ImageError, UnsupportedImage
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.layout import (
    KNOWN_INCOMPAT,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
    CompressionType,
    CryptMethod,
    FeatureType,
    Header,
    IncompatFeature,
)

__all__ = ["check_table", "validate_header"]

#: qemu's QCOW_MAX_SNAPSHOTS_SIZE: the whole snapshot table.
MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024
#: Virtual sizes above 2^63 - 512 cannot be addressed by any client (and
#: qemu refuses them); keeps every offset a positive 64-bit value.
MAX_VIRTUAL_SIZE = (1 << 63) - 512


def check_table(
    what: str, offset: int, nbytes: int, geo: Geometry, file_size: int, *, field: str
) -> None:
    """Refuse a metadata table that is unaligned, overlaps the header
    cluster or ends past the end of the file.

    Args:
        what: the table, for the message ("L1 table").
        offset: its host offset.
        nbytes: its size in bytes.
        geo: image geometry.
        file_size: size of the image file.
        field: the header field that holds ``offset``.
    """
    if not geo.is_aligned(offset):
        raise CorruptImage(
            f"{field} {offset:#x} is not aligned to the cluster size {geo.cluster_size}"
        )
    if nbytes == 0:
        return
    if offset < geo.cluster_size:
        raise CorruptImage(f"{field} {offset:#x}: the {what} would overlap the image header")
    if offset + nbytes > file_size:
        raise CorruptImage(
            f"{field} {offset:#x}: the {what} ({nbytes} bytes) extends beyond the end "
            f"of the image file ({file_size} bytes)"
        )


def _feature_desc(h: Header, bits: int) -> str:
    names = []
    for bit in range(64):
        if bits >> bit & 1:
            name = h.feature_name(FeatureType.INCOMPATIBLE, bit)
            names.append(f"bit {bit} ({name})" if name else f"bit {bit}")
    return ", ".join(names)


def validate_header(h: Header, file_size: int, *, writable: bool = False) -> None:
    """Check every header field of ``h`` against the spec and our limits.

    Raises:
        UnsupportedImage: a valid image using a feature we refuse
            (encryption, unknown incompatible features, unknown compression).
        CorruptImage: a field is inconsistent or points outside the file.
        ImageError: the image may only be opened read-only (corrupt bit).
    """
    geo = Geometry.from_header(h)
    cs = geo.cluster_size

    # -- features --------------------------------------------------------------
    unknown = h.incompatible_features & ~KNOWN_INCOMPAT & 0xFFFF_FFFF_FFFF_FFFF
    if unknown:
        raise UnsupportedImage(
            f"incompatible_features has unknown feature bits set: {_feature_desc(h, unknown)}"
        )
    if h.crypt_method != CryptMethod.NONE:
        kind = {1: "AES", 2: "LUKS"}.get(h.crypt_method, "unknown")
        raise UnsupportedImage(
            f"crypt_method {h.crypt_method} ({kind}): encrypted images are not supported"
        )
    if h.corrupt and writable:
        raise ImageError(
            "incompatible_features has the corrupt bit set: the image may only be "
            "opened read-only (repair it with qemu-img check -r all)"
        )
    if h.version == 2 and h.refcount_order != 4:
        raise CorruptImage(f"refcount_order {h.refcount_order} in a version 2 image (must be 4)")
    if h.refcount_order > 6:
        raise CorruptImage(f"refcount_order {h.refcount_order} out of range (0..6)")
    has_ctype = bool(h.incompatible_features & IncompatFeature.COMPRESSION)
    if h.compression_type not in (CompressionType.ZLIB, CompressionType.ZSTD):
        raise UnsupportedImage(f"compression_type {h.compression_type} is unknown")
    if has_ctype != (h.compression_type != CompressionType.ZLIB):
        raise CorruptImage(
            f"compression_type {h.compression_type} disagrees with the compression-type "
            f"bit of incompatible_features ({'set' if has_ctype else 'clear'})"
        )
    if h.extended_l2 and h.cluster_bits < 14:
        raise CorruptImage(
            f"cluster_bits {h.cluster_bits}: extended L2 entries need clusters of "
            f"at least 16 KiB"
        )
    if h.has_data_file and h.data_file is None:
        raise UnsupportedImage(
            "incompatible_features says the image has an external data file, "
            "but no data file name header extension is present"
        )

    # -- sizes and limits ------------------------------------------------------
    if h.size > MAX_VIRTUAL_SIZE:
        raise CorruptImage(f"size {h.size} is too large")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise CorruptImage(
            f"l1_size {h.l1_size} exceeds the limit of {MAX_L1_BYTES // 8} entries"
        )
    need = geo.l1_entries_for(h.size)
    if h.l1_size < need:
        raise CorruptImage(
            f"l1_size {h.l1_size} is too small for a virtual size of {h.size} bytes "
            f"(needs {need} entries)"
        )
    check_table("L1 table", h.l1_table_offset, h.l1_size * 8, geo, file_size,
                field="l1_table_offset")  # fmt: skip
    if h.refcount_table_clusters == 0:
        raise CorruptImage("refcount_table_clusters is 0: the image has no refcount table")
    rt_bytes = h.refcount_table_clusters * cs
    if rt_bytes > MAX_REFTABLE_BYTES:
        raise CorruptImage(
            f"refcount_table_clusters {h.refcount_table_clusters} exceeds the limit of "
            f"{MAX_REFTABLE_BYTES // cs} clusters"
        )
    check_table("refcount table", h.refcount_table_offset, rt_bytes, geo, file_size,
                field="refcount_table_offset")  # fmt: skip
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage(f"nb_snapshots {h.nb_snapshots} exceeds the limit of {MAX_SNAPSHOTS}")
    if h.nb_snapshots:
        # Each entry is at least 40 bytes; the exact extent is checked when
        # the table is read.
        check_table("snapshot table", h.snapshots_offset, h.nb_snapshots * 40, geo,
                    file_size, field="snapshots_offset")  # fmt: skip
    elif not geo.is_aligned(h.snapshots_offset):
        raise CorruptImage(f"snapshots_offset {h.snapshots_offset:#x} is not cluster aligned")
    if h.backing_file is not None:
        try:
            h.backing_file.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptImage("the backing file name is not valid UTF-8") from None
    bm = h.bitmaps
    # Bitmaps are ignored for reads; only make sure the extension is sane.
    if bm is not None and not geo.is_aligned(bm.directory_offset):
            raise CorruptImage(
                f"bitmap_directory_offset {bm.directory_offset:#x} is not cluster aligned"
            )
    crypto = h.crypto
    if crypto is not None and not geo.is_aligned(crypto.offset):
        raise CorruptImage(f"crypto header offset {crypto.offset:#x} is not cluster aligned")

"""Decompression of compressed clusters (qemu ``block/qcow2-threads.c``).

qcow2.txt "Compressed Clusters Descriptor" and the ``compression_type``
header field: type 0 is zlib *raw deflate* (no zlib header, window bits 12,
so ``wbits=-12``); type 1 is zstd, written by qemu as one frame without a
length prefix.

The compressed byte count in an L2 entry has 512-byte precision, so the input
may end with bytes of the next compressed cluster (or past EOF, clamped by the
caller).  Both decoders therefore stop as soon as exactly one cluster has come
out and ignore whatever follows; zstd input may also consist of several
frames.  Anything other than exactly ``cluster_size`` bytes of output -- a
short stream, a decoding error -- is :class:`~nbdqcow.errors.CorruptImage`,
and the output is bounded by ``cluster_size``, so a crafted stream cannot
inflate into memory (a "zip bomb").

zstd comes from the ``zstandard`` package (python-zstandard): maintained,
wheels for every platform we target, and a streaming reader that can read
across frames with a bounded output size.
"""

from __future__ import annotations

import io
import zlib

import zstandard

from nbdqcow.errors import CorruptImage, UnsupportedImage
from nbdqcow.qcow2.layout import CompressionType

__all__ = ["compress_cluster", "decompress_cluster"]

#: raw deflate, 4 KiB window, as qemu writes it.
ZLIB_WBITS = -12


def decompress_cluster(
    data: bytes | bytearray | memoryview, cluster_size: int, ctype: int, *, where: str = ""
) -> bytes:
    """Decompress one cluster.

    Args:
        data: the compressed bytes (may carry trailing garbage).
        cluster_size: the exact output size required.
        ctype: the header's ``compression_type``.
        where: names the cluster in error messages.

    Raises:
        CorruptImage: the data does not decompress to exactly one cluster.
    """
    try:
        if ctype == CompressionType.ZLIB:
            d = zlib.decompressobj(ZLIB_WBITS)
            out = d.decompress(data, cluster_size)
        elif ctype == CompressionType.ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(data), read_across_frames=True
            )
            parts: list[bytes] = []
            got = 0
            while got < cluster_size:
                chunk = reader.read(cluster_size - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            out = parts[0] if len(parts) == 1 else b"".join(parts)
        else:
            raise UnsupportedImage(f"unknown compression_type {ctype}")
    except (zlib.error, zstandard.ZstdError) as e:
        raise CorruptImage(f"compressed cluster{where} does not decompress: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImage(
            f"compressed cluster{where} decompresses to {len(out)} bytes, "
            f"expected exactly {cluster_size}"
        )
    return out


def compress_cluster(data: bytes | bytearray | memoryview, ctype: int) -> bytes:
    """Compress one cluster as qemu does (for the write engine and tests)."""
    if ctype == CompressionType.ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, ZLIB_WBITS)
        return c.compress(data) + c.flush()
    if ctype == CompressionType.ZSTD:
        return zstandard.ZstdCompressor().compress(data)
    raise UnsupportedImage(f"unknown compression_type {ctype}")

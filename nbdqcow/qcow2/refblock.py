"""Refcount blocks: the on-disk codec and limits (qcow2.txt "Host cluster
management": refcount table entries, refcount blocks, ``refcount_order``).

A refcount block is one cluster holding ``cluster_size * 8 >> refcount_order``
entries of ``1 << refcount_order`` bits.  Widths below a byte (1, 2, 4 bits)
are packed least-significant-bit first inside each byte; widths of 8..64
bits are big-endian integers.  :class:`RefBlock` gives typed access to one
block in memory; :func:`decode_block`/:func:`encode_block` convert whole
blocks (``check``, ``create``, ``rebuild``).  The structure that uses them
is :class:`~nbdqcow.qcow2.refcount.Refcounts`, which re-exports these names.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Iterable
from sys import byteorder

from nbdqcow.errors import ImageError

__all__ = [
    "MAX_HOST_OFFSET",
    "MAX_REFTABLE_BYTES",
    "REFT_OFFSET_MASK",
    "RefBlock",
    "RefcountOverflow",
    "decode_block",
    "encode_block",
    "entries_per_block",
]

#: Reftable entries keep bits 9..63 (qcow2.txt "Refcount table entry").
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
#: qemu refuses reftables above 8 MiB (QCOW_MAX_REFTABLE_SIZE); so do we, on
#: open and when growing.
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
#: Host offsets are 56 bits wide in L1/L2 entries (bits 9..55).
MAX_HOST_OFFSET = 1 << 56


# array typecodes of the exact widths for the byte-aligned refcount orders.
_TYPECODES: dict[int, str] = {}
for _code in ("B", "H", "I", "L", "Q"):
    _TYPECODES.setdefault(array(_code).itemsize * 8, _code)


class RefcountOverflow(ImageError):
    """A cluster's refcount would exceed ``2**refcount_bits - 1``.

    qemu answers ``EINVAL`` and suggests ``qemu-img amend -o refcount_bits``;
    for an NBD client the write failed for lack of space in the counter.
    """

    errno = errno.ENOSPC


def entries_per_block(cluster_size: int, refcount_order: int) -> int:
    """Number of refcounts one refcount block holds."""
    return cluster_size * 8 >> refcount_order


class RefBlock:
    """One refcount block: a cluster-sized ``bytearray`` with typed access.

    Sub-byte widths are packed LSB-first: entry ``i`` of width ``w`` lives in
    byte ``i*w // 8`` at bit ``i*w % 8`` (qcow2.txt, "refcount_order").
    """

    __slots__ = ("bits", "data", "max", "order")

    def __init__(self, data: bytearray, order: int) -> None:
        if not 0 <= order <= 6:
            raise ValueError(f"refcount_order {order} is outside 0..6")
        self.data = data
        self.order = order
        self.bits = 1 << order
        self.max = (1 << self.bits) - 1

    def __len__(self) -> int:
        return len(self.data) * 8 >> self.order

    def get(self, i: int) -> int:
        w = self.bits
        if w < 8:
            bit = i * w
            return (self.data[bit >> 3] >> (bit & 7)) & self.max
        nb = w >> 3
        return int.from_bytes(self.data[i * nb : (i + 1) * nb], "big")

    def set(self, i: int, value: int) -> None:
        if not 0 <= value <= self.max:
            raise RefcountOverflow(
                f"refcount {value} does not fit in refcount_bits={self.bits} "
                f"(maximum {self.max})"
            )
        w = self.bits
        if w < 8:
            bit = i * w
            shift = bit & 7
            byte = self.data[bit >> 3]
            self.data[bit >> 3] = (byte & ~(self.max << shift) & 0xFF) | (value << shift)
            return
        nb = w >> 3
        self.data[i * nb : (i + 1) * nb] = value.to_bytes(nb, "big")

    def values(self) -> list[int]:
        return decode_block(self.data, self.order)


def decode_block(data: bytes | bytearray | memoryview, order: int) -> list[int]:
    """Every refcount of a block, in index order."""
    w = 1 << order
    if w >= 8:
        arr = array(_TYPECODES[w])
        arr.frombytes(bytes(data))
        if w > 8 and byteorder == "little":
            arr.byteswap()
        return arr.tolist()
    mask = (1 << w) - 1
    per = 8 // w
    shifts = [k * w for k in range(per)]
    return [(b >> s) & mask for b in bytes(data) for s in shifts]


def encode_block(values: Iterable[int], order: int, cluster_size: int) -> bytearray:
    """Pack ``values`` (at most one block's worth) into a cluster-sized block."""
    blk = RefBlock(bytearray(cluster_size), order)
    n = len(blk)
    for i, v in enumerate(values):
        if i >= n:
            raise ValueError(f"more than {n} refcounts for one block")
        if v:
            blk.set(i, v)
    return blk.data

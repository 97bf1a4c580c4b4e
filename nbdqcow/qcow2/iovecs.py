"""Buffer lists for the qcow2 write engine: slicing the caller's buffers
without copies, shared zero buffers for COW fills and write-zeroes
fallbacks, and the one-syscall vectored write of the engine's paths
(:mod:`~nbdqcow.qcow2.inline_write`, :mod:`~nbdqcow.qcow2.data_write`).
No spec section of its own: plumbing for qcow2.txt data clusters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from nbdqcow.backends.base import Buffer
from nbdqcow.io import HostFile

__all__ = ["ZEROS", "ZERO_BYTES", "Split", "all_zero", "write_all", "zero_views"]

#: Source of zero bytes for COW fills and write-zeroes fallbacks (the
#: largest cluster qcow2 allows).
ZERO_BYTES = bytes(2 * 1024 * 1024)
ZEROS = memoryview(ZERO_BYTES)


class Split:
    """Consecutive slices of a list of buffers (no copies)."""

    def __init__(self, bufs: Sequence[Buffer]) -> None:
        self.bufs = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
        self.bufs = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in self.bufs]
        self.i = 0
        self.off = 0

    def skip(self, n: int) -> Split:
        self.take(n)
        return self

    def rest(self) -> list[memoryview]:
        if self.i >= len(self.bufs):
            return []
        return [self.bufs[self.i][self.off :], *self.bufs[self.i + 1 :]]

    def take(self, n: int) -> list[memoryview]:
        out: list[memoryview] = []
        while n > 0:
            b = self.bufs[self.i]
            k = min(len(b) - self.off, n)
            if k <= 0:
                self.i += 1
                self.off = 0
                continue
            out.append(b[self.off : self.off + k])
            self.off += k
            n -= k
        return out


def all_zero(views: list[memoryview]) -> bool:
    """Are ``views`` all slices of the shared zero buffer?"""
    return all(v.obj is ZERO_BYTES for v in views)


def zero_views(n: int) -> list[memoryview]:
    out = []
    while n > 0:
        k = min(n, len(ZEROS))
        out.append(ZEROS[:k])
        n -= k
    return out


def write_all(file: HostFile, offset: int, bufs: Sequence[Buffer], total: int) -> None:
    """``pwritev`` all of ``bufs`` (``total`` bytes) at ``offset``: one
    syscall, straight to ``os.pwritev``; :meth:`HostFile.pwritev_sync`
    only after a short write."""
    n = os.pwritev(file.fd, bufs, offset)
    if n != total:
        file.pwritev_sync(offset + n, Split(bufs).skip(n).rest())

"""Guest-to-host mapping: a guest byte range becomes a list of runs (qemu
``block/qcow2-cluster.c``: ``qcow2_get_host_offset`` and
``count_contiguous_subclusters``).

A :class:`Run` is a stretch of guest bytes with one subcluster type and, for
types that have one, a host range that is contiguous.  Adjacent clusters of
the same type whose host clusters follow each other are merged into one run,
so a sequential read of a freshly converted image turns into one vectored
``preadv`` per run instead of one syscall per cluster.

Every entry is checked as it is used (reserved bits, alignment, subcluster
bitmap contradictions, zero flags in a v2 image): bad metadata fails the
request touching it with :class:`~nbdqcow.errors.CorruptImage`, never the
open and never the process.

Extension points for the write engine: :meth:`ClusterMap.l2_table_offset`
(validated L1 lookup), :meth:`ClusterMap.load_l2` (pinned table from the L2
cache), and :attr:`ClusterMap.l1` (the in-memory active L1, an
``array('Q')`` the writer updates and writes through).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2.cache import CachedTable, TableCache
from nbdqcow.qcow2.entries import (
    SubclusterType,
    classify_subcluster,
    l1_l2_offset,
    l2_host_offset,
    l2_reserved_bits,
)
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.layout import L2E_OFFSET_MASK

__all__ = ["HOSTED", "ClusterMap", "Run"]

#: Types whose run carries a host offset.
HOSTED = frozenset(
    {SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC, SubclusterType.UNALLOCATED_ALLOC}
)
_ZERO_FLAG_TYPES = frozenset({SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC})


@dataclass(slots=True)
class Run:
    """Guest ``[guest, guest+length)`` of one type.

    ``host`` is the host offset of the run's first byte for :data:`HOSTED`
    types, the raw L2 entry for ``COMPRESSED`` (one cluster per run), and
    -1 otherwise.
    """

    guest: int
    length: int
    type: SubclusterType
    host: int = -1

    @property
    def end(self) -> int:
        return self.guest + self.length


class ClusterMap:
    """Maps guest offsets through one L1 table and the L2 cache.

    Args:
        geo: image geometry.
        l1: the L1 table (active, or a snapshot's), native integers.
        l2_cache: the image's L2 table cache.
        version: qcow2 version (zero flags are corruption in version 2).
        data_file: the image has an external data file.
    """

    def __init__(
        self,
        geo: Geometry,
        l1: array,  # type: ignore[type-arg]
        l2_cache: TableCache,
        *,
        version: int = 3,
        data_file: bool = False,
    ) -> None:
        self.geo = geo
        self.l1 = l1
        self.l2_cache = l2_cache
        self.version = version
        self.data_file = data_file

    def l2_table_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table for ``l1_index`` (0: unallocated)."""
        if l1_index >= len(self.l1):
            return 0
        off = l1_l2_offset(self.l1[l1_index])
        if off and not self.geo.is_aligned(off):
            raise CorruptImage(
                f"L1 entry {l1_index}: L2 table offset {off:#x} is not cluster aligned"
            )
        if off and off < self.geo.cluster_size:
            raise CorruptImage(f"L1 entry {l1_index}: L2 table offset {off:#x} overlaps the header")
        return off

    async def load_l2(self, l2_offset: int) -> CachedTable:
        """The L2 table at ``l2_offset``, pinned (release with ``put``)."""
        return await self.l2_cache.get(l2_offset)

    async def runs(self, offset: int, length: int) -> list[Run]:
        """Map guest ``[offset, offset+length)`` to a list of runs."""
        geo = self.geo
        ext = geo.extended_l2
        cmask = geo.cluster_mask
        out: list[Run] = []
        pos, end = offset, offset + length
        cache = self.l2_cache
        while pos < end:
            l1i = geo.l1_index(pos)
            stop = min(end, (l1i + 1) * geo.bytes_per_l2)
            l2off = self.l2_table_offset(l1i)
            if l2off == 0:
                _append(out, pos, stop - pos, SubclusterType.UNALLOCATED_PLAIN, -1)
                pos = stop
                continue
            entries = cache.peek(l2off)
            if entries is None:
                t = await cache.get(l2off)
                cache.put(t)
                entries = t.entries
            # No await from here to the end of this L2 range: ``entries``
            # stays valid even if another task evicts the table meanwhile.
            i = geo.l2_index(pos)
            if ext:
                while pos < stop:
                    cl_end = min(stop, (pos | cmask) + 1)
                    self._subclusters(out, entries[2 * i], entries[2 * i + 1], pos, cl_end)
                    pos = cl_end
                    i += 1
                continue
            # Hot loop.  ``expect`` is the entry that would simply extend the
            # last run (next host cluster of a NORMAL run, or another empty
            # entry): such entries need no classification or validation.
            expect = -1
            csize = cmask + 1
            while pos < stop:
                cl_end = min(stop, (pos | cmask) + 1)
                e = entries[i]
                if e == expect:
                    out[-1].length += cl_end - pos
                else:
                    typ = classify_subcluster(e, 0, 0, data_file=self.data_file)
                    _append(out, pos, cl_end - pos, typ, self._host(e, typ, pos))
                    if e == 0:
                        expect = 0
                    elif typ is SubclusterType.NORMAL and (e & L2E_OFFSET_MASK) + csize <= (
                        L2E_OFFSET_MASK
                    ):
                        expect = e
                    else:
                        expect = -1
                if expect > 0:
                    expect += csize
                pos = cl_end
                i += 1
        return out

    def _host(self, e: int, typ: SubclusterType, pos: int) -> int:
        """Validate entry ``e`` (for guest ``pos``) and return the run host."""
        if typ is SubclusterType.COMPRESSED:
            if self.data_file:
                raise CorruptImage(
                    f"compressed cluster at guest offset {pos:#x} in an image with an "
                    f"external data file"
                )
            return e
        if l2_reserved_bits(e, extended_l2=self.geo.extended_l2):
            raise CorruptImage(
                f"L2 entry {e:#018x} for guest offset {pos:#x} has reserved bits set"
            )
        if self.version < 3 and typ in _ZERO_FLAG_TYPES:
            raise CorruptImage(
                f"L2 entry {e:#018x} for guest offset {pos:#x}: zero flag in a version 2 image"
            )
        if typ not in HOSTED:
            return -1
        host = l2_host_offset(e)
        if not self.geo.is_aligned(host):
            raise CorruptImage(
                f"L2 entry {e:#018x} for guest offset {pos:#x}: host offset {host:#x} "
                f"is not cluster aligned"
            )
        return host + (pos & self.geo.cluster_mask)

    def _subclusters(self, out: list[Run], e: int, bitmap: int, pos: int, cl_end: int) -> None:
        geo = self.geo
        sc_size = geo.subcluster_size
        cstart = pos & ~geo.cluster_mask
        while pos < cl_end:
            sc = (pos - cstart) // sc_size
            sub_end = min(cl_end, cstart + (sc + 1) * sc_size)
            typ = classify_subcluster(e, bitmap, sc, extended_l2=True, data_file=self.data_file)
            if typ is SubclusterType.INVALID:
                raise CorruptImage(
                    f"L2 entry {e:#018x} for guest offset {pos:#x}: subcluster bitmap "
                    f"{bitmap:#018x} is invalid"
                )
            if typ is SubclusterType.COMPRESSED:
                # A compressed cluster has no subclusters: one run for it all.
                _append(out, pos, cl_end - pos, typ, self._host(e, typ, pos))
                return
            _append(out, pos, sub_end - pos, typ, self._host(e, typ, pos))
            pos = sub_end


def _append(out: list[Run], guest: int, length: int, typ: SubclusterType, host: int) -> None:
    if out:
        last = out[-1]
        if (
            last.type is typ
            and typ is not SubclusterType.COMPRESSED
            and (host == -1 or last.host + last.length == host)
        ):
            last.length += length
            return
    out.append(Run(guest, length, typ, host))

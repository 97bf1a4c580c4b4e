"""The internal snapshot table (qcow2.txt "Snapshots"; qemu
``block/qcow2-snapshot.c``, read side).

The table starts at ``snapshots_offset`` and holds ``nb_snapshots``
variable-length entries, each 8-byte aligned.  :func:`read_snapshot_table`
parses it with bounds on everything an attacker controls (entry count, extra
data size, total table size); :class:`SnapshotEntry` packs back exactly what
it unpacked (extra data kept raw) so the write engine can rewrite the table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nbdqcow.errors import CorruptImage, ImageError
from nbdqcow.io import HostFile
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.layout import MAX_L1_BYTES, Header
from nbdqcow.qcow2.validate import MAX_SNAPSHOT_TABLE_BYTES, check_table

__all__ = ["SnapshotEntry", "find_snapshot", "read_snapshot_table"]

# C: u64 l1_table_offset, u32 l1_size, u16 id_str_size, u16 name_size,
#    u32 date_sec, u32 date_nsec, u64 vm_clock_nsec, u32 vm_state_size,
#    u32 extra_data_size
_ENTRY = struct.Struct(">QIHHIIQII")
# qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_EXTRA = 1024


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra: bytes

    @property
    def vm_state_size_large(self) -> int:
        if len(self.extra) >= 8:
            return int.from_bytes(self.extra[0:8], "big")
        return self.vm_state_size

    @property
    def disk_size(self) -> int | None:
        """Virtual size when the snapshot was taken (None: same as image)."""
        if len(self.extra) >= 16:
            return int.from_bytes(self.extra[8:16], "big")
        return None

    @property
    def icount(self) -> int | None:
        if len(self.extra) >= 24:
            v = int.from_bytes(self.extra[16:24], "big")
            return None if v == 0xFFFF_FFFF_FFFF_FFFF else v
        return None

    def pack(self) -> bytes:
        ident, name = self.id.encode(), self.name.encode()
        body = (
            _ENTRY.pack(
                self.l1_table_offset, self.l1_size, len(ident), len(name), self.date_sec,
                self.date_nsec, self.vm_clock_nsec, self.vm_state_size, len(self.extra),
            )
            + self.extra + ident + name
        )  # fmt: skip
        return body + bytes(-len(body) % 8)


def read_snapshot_table(file: HostFile, h: Header, file_size: int) -> list[SnapshotEntry]:
    """Read and check the snapshot table of the image open as ``file``."""
    if h.nb_snapshots == 0:
        return []
    pos = h.snapshots_offset
    end_limit = min(file_size, h.snapshots_offset + MAX_SNAPSHOT_TABLE_BYTES)
    raw = bytearray()

    def have(n: int) -> bool:
        # Read the table in growing windows: its size is only known by
        # parsing it, and it is bounded by the file and by our limit.
        if n > len(raw):
            want = min(max(n, 2 * len(raw), 65536), end_limit - pos)
            if want > len(raw):
                raw.extend(file.pread_sync(pos + len(raw), want - len(raw)))
        return n <= len(raw)

    out: list[SnapshotEntry] = []
    at = 0
    for i in range(h.nb_snapshots):
        if not have(at + _ENTRY.size):
            raise CorruptImage(
                f"snapshot table (snapshots_offset {h.snapshots_offset:#x}) entry {i} runs "
                f"past the end of the file or the {MAX_SNAPSHOT_TABLE_BYTES}-byte limit"
            )
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmsize,
         extra_len) = _ENTRY.unpack_from(raw, at)  # fmt: skip
        if extra_len > MAX_EXTRA:
            raise CorruptImage(
                f"snapshot entry {i}: extra_data_size {extra_len} exceeds the limit of {MAX_EXTRA}"
            )
        if h.version >= 3 and extra_len < 16:
            raise CorruptImage(
                f"snapshot entry {i}: extra_data_size {extra_len} is below the 16 bytes "
                f"version 3 requires"
            )
        body = at + _ENTRY.size
        stop = body + extra_len + id_len + name_len
        if not have(stop):
            raise CorruptImage(f"snapshot entry {i} runs past the end of the snapshot table")
        extra = bytes(raw[body : body + extra_len])
        ident = raw[body + extra_len : body + extra_len + id_len].decode("utf-8", "replace")
        name = raw[body + extra_len + id_len : stop].decode("utf-8", "replace")
        out.append(SnapshotEntry(l1_off, l1_size, ident, name, dsec, dnsec, vmclock, vmsize,
                                 extra))  # fmt: skip
        at = stop + (-stop % 8)
    return out


def find_snapshot(snapshots: list[SnapshotEntry], wanted: str) -> SnapshotEntry:
    """Find a snapshot by ID, then by name (qemu's ``load_tmp_by_id_or_name``)."""
    for s in snapshots:
        if s.id == wanted:
            return s
    for s in snapshots:
        if s.name == wanted:
            return s
    names = ", ".join(f"{s.id}:{s.name}" for s in snapshots) or "none"
    raise ImageError(f"snapshot {wanted!r} not found (snapshots: {names})")


def check_snapshot_l1(s: SnapshotEntry, geo: Geometry, virtual_size: int, file_size: int) -> None:
    """Validate a snapshot's L1 table location and size before reading it."""
    if s.l1_size * 8 > MAX_L1_BYTES:
        raise CorruptImage(
            f"snapshot {s.name!r}: l1_size {s.l1_size} exceeds the limit of "
            f"{MAX_L1_BYTES // 8} entries"
        )
    if s.l1_size < geo.l1_entries_for(virtual_size):
        raise CorruptImage(
            f"snapshot {s.name!r}: l1_size {s.l1_size} is too small for its disk size "
            f"{virtual_size}"
        )
    check_table(f"L1 table of snapshot {s.name!r}", s.l1_table_offset, s.l1_size * 8, geo,
                file_size, field="snapshot l1_table_offset")  # fmt: skip

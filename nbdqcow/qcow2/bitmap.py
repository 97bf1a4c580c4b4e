"""Persistent dirty bitmaps: read the bitmap directory for ``info``
(qcow2.txt "Bitmaps extension" / "Bitmap directory"; qemu
``block/qcow2-bitmap.c``).

Bitmaps do not change what the guest reads, so the read path ignores them;
this module only lists them.  (A *writer* that does not maintain them must
clear autoclear bit 0 before its first write -- the write engine's job.)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from nbdqcow.errors import CorruptImage
from nbdqcow.io import HostFile
from nbdqcow.qcow2.layout import Header

__all__ = ["BitmapEntry", "BitmapFlag", "read_bitmap_directory"]

# C: u64 bitmap_table_offset, u32 bitmap_table_size, u32 flags, u8 type,
#    u8 granularity_bits, u16 name_size, u32 extra_data_size
_ENTRY = struct.Struct(">QIIBBHI")
#: qemu's limits: QCOW2_MAX_BITMAPS and QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
MAX_BITMAPS = 65535
MAX_DIRECTORY = 1024 * MAX_BITMAPS


class BitmapFlag(enum.IntFlag):
    IN_USE = 1 << 0
    AUTO = 1 << 1
    EXTRA_DATA_COMPATIBLE = 1 << 2


@dataclass(frozen=True, slots=True)
class BitmapEntry:
    name: str
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def flag_names(self) -> list[str]:
        names = {BitmapFlag.IN_USE: "in-use", BitmapFlag.AUTO: "auto"}
        return [n for f, n in names.items() if self.flags & f]


def read_bitmap_directory(file: HostFile, h: Header) -> list[BitmapEntry]:
    """The bitmaps of an image (empty without the extension).

    Raises:
        CorruptImage: the directory is out of bounds or malformed.
    """
    ext = h.bitmaps
    if ext is None:
        return []
    if ext.nb_bitmaps > MAX_BITMAPS or ext.directory_size > MAX_DIRECTORY:
        raise CorruptImage(
            f"bitmaps extension: nb_bitmaps {ext.nb_bitmaps} / bitmap_directory_size "
            f"{ext.directory_size} exceed the limits"
        )
    raw = file.pread_sync(ext.directory_offset, ext.directory_size)
    if len(raw) != ext.directory_size:
        raise CorruptImage(
            f"bitmap_directory_offset {ext.directory_offset:#x}: the directory extends "
            f"beyond the end of the file"
        )
    out: list[BitmapEntry] = []
    pos = 0
    for i in range(ext.nb_bitmaps):
        if pos + _ENTRY.size > len(raw):
            raise CorruptImage(f"bitmap directory entry {i} runs past bitmap_directory_size")
        toff, tsize, flags, btype, gbits, name_len, extra_len = _ENTRY.unpack_from(raw, pos)
        name_at = pos + _ENTRY.size + extra_len
        end = name_at + name_len
        if end > len(raw):
            raise CorruptImage(f"bitmap directory entry {i} runs past bitmap_directory_size")
        name = raw[name_at:end].decode("utf-8", "replace")
        out.append(BitmapEntry(name, toff, tsize, flags, btype, gbits))
        pos = end + (-end % 8)
    return out

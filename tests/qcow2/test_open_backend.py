"""open_backend (nbdqcow.backends.open): format probing and choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdqcow.backends.base import BlockBackend
from nbdqcow.backends.open import open_backend
from nbdqcow.backends.raw import RawBackend
from nbdqcow.errors import ImageError
from nbdqcow.qcow2 import Qcow2Image
from tests.qcow2.imagegen import MiB, create, qemu_io


async def test_probe_and_explicit_format(tmp_path: Path) -> None:
    q = create(tmp_path / "img.qcow2", MiB)
    qemu_io(q, "write -P 9 0 4k")
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\x09" * 4096)
    b1 = open_backend(q)
    b2 = open_backend(raw)
    b3 = open_backend(q, fmt="raw")  # the operator's word wins: the file itself
    try:
        assert isinstance(b1, Qcow2Image) and isinstance(b2, RawBackend)
        assert isinstance(b3, RawBackend) and b3.size == q.stat().st_size
        for b in (b1, b2):
            assert isinstance(b, BlockBackend) and b.caps.read_only
            buf = bytearray(4096)
            await b.preadv(0, [memoryview(buf)])
            assert buf == b"\x09" * 4096
    finally:
        for b in (b1, b2, b3):
            await b.aclose()


def test_bad_choices(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(bytes(4096))
    with pytest.raises(ImageError, match="unknown image format 'vmdk'"):
        open_backend(raw, fmt="vmdk")
    with pytest.raises(ImageError, match="no snapshots"):
        open_backend(raw, snapshot="s1")
    q = create(tmp_path / "img.qcow2", MiB)
    with pytest.raises(ImageError, match="read-only"):
        open_backend(q, read_only=False, snapshot="x")

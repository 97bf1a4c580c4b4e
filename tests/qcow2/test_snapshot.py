"""The snapshot table (nbdqcow.qcow2.snapshot)."""

from __future__ import annotations

import pytest

from nbdqcow.errors import ImageError
from nbdqcow.io import HostFile
from nbdqcow.qcow2.image import read_header
from nbdqcow.qcow2.snapshot import find_snapshot, read_snapshot_table
from tests.qcow2.conftest import Built
from tests.qcow2.imagegen import CASES, MiB

SNAP = next(c for c in CASES if c.name == "snapshots")


def test_table_parses_and_packs_back(built: Built) -> None:
    path, _ = built(SNAP)
    f = HostFile(path, writable=False)
    try:
        h = read_header(f, f.size())
        snaps = read_snapshot_table(f, h, f.size())
        assert [(s.id, s.name) for s in snaps] == [("1", "s1"), ("2", "s2")]
        assert [s.disk_size for s in snaps] == [4 * MiB, 4 * MiB]
        assert snaps[0].date_sec > 0 and snaps[0].vm_state_size_large == 0
        packed = b"".join(s.pack() for s in snaps)
        assert f.pread_sync(h.snapshots_offset, len(packed)) == packed
        assert find_snapshot(snaps, "2") is snaps[1]
        assert find_snapshot(snaps, "s1") is snaps[0]
        with pytest.raises(ImageError, match="1:s1, 2:s2"):
            find_snapshot(snaps, "s3")
    finally:
        f.close()

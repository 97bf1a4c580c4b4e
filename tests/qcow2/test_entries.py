"""Entry classification (nbdqcow.qcow2.entries) against the tables of
qcow2.txt "Cluster mapping" and "Extended L2 Entries"."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdqcow.qcow2.entries import (
    ClusterType,
    SubclusterType,
    classify,
    classify_subcluster,
    l2_reserved_bits,
)

C, Z, COPIED = 1 << 62, 1, 1 << 63
OFF = 0x50000


@pytest.mark.parametrize(
    ("entry", "kw", "expected"),
    [
        (0, {}, ClusterType.UNALLOCATED),
        (Z, {}, ClusterType.ZERO_PLAIN),
        (OFF | Z | COPIED, {}, ClusterType.ZERO_ALLOC),
        (OFF | COPIED, {}, ClusterType.NORMAL),
        (OFF, {}, ClusterType.NORMAL),  # shared (snapshot): no COPIED
        (C | 0x12345, {}, ClusterType.COMPRESSED),
        (Z, {"extended_l2": True}, ClusterType.UNALLOCATED),  # bit 0 unused with ext L2
        (COPIED, {"data_file": True}, ClusterType.NORMAL),  # offset 0 in a data file
        (COPIED, {}, ClusterType.UNALLOCATED),
    ],
)  # fmt: skip
def test_classify(entry: int, kw: dict[str, bool], expected: ClusterType) -> None:
    assert classify(entry, **kw) is expected


def _sub(entry: int, bitmap: int, sc: int) -> SubclusterType:
    return classify_subcluster(entry, bitmap, sc, extended_l2=True)


def test_subclusters_of_an_allocated_cluster() -> None:
    bitmap = 0b01 | (0b10 << 32)  # sc0 allocated, sc1 zero, sc2 neither
    assert _sub(OFF | COPIED, bitmap, 0) is SubclusterType.NORMAL
    assert _sub(OFF | COPIED, bitmap, 1) is SubclusterType.ZERO_ALLOC
    assert _sub(OFF | COPIED, bitmap, 2) is SubclusterType.UNALLOCATED_ALLOC


def test_subclusters_of_an_unallocated_cluster() -> None:
    assert _sub(0, 1 << 33, 1) is SubclusterType.ZERO_PLAIN
    assert _sub(0, 1 << 33, 0) is SubclusterType.UNALLOCATED_PLAIN
    # "allocated" bits without a host cluster: invalid
    assert _sub(0, 1, 5) is SubclusterType.INVALID


@given(sc=st.integers(0, 31))
def test_allocated_and_zero_at_once_is_invalid(sc: int) -> None:
    assert _sub(OFF, (1 << sc) | (1 << (32 + sc)), sc) is SubclusterType.INVALID


def test_compressed_has_no_subclusters() -> None:
    assert _sub(C | 0x1234, 0, 7) is SubclusterType.COMPRESSED


@given(entry=st.integers(0, (1 << 64) - 1))
def test_reserved_bits(entry: int) -> None:
    res = l2_reserved_bits(entry)
    if entry & C:
        assert res == 0
    else:
        assert res == entry & 0x3F00_0000_0000_01FE
    assert l2_reserved_bits(entry & ~1 | 1, extended_l2=True) or entry & C

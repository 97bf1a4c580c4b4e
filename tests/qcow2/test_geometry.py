"""Address arithmetic (nbdqcow.qcow2.geometry), checked against the spec's
formulas and against qemu-made images."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nbdqcow.qcow2.geometry import Geometry

geometries = st.builds(Geometry, st.integers(9, 21), st.booleans(), st.integers(0, 6)).filter(
    lambda g: not g.extended_l2 or g.cluster_bits >= 14
)


@given(geo=geometries, offset=st.integers(0, (1 << 60) - 1))
def test_indices_recompose_the_offset(geo: Geometry, offset: int) -> None:
    cluster = geo.l1_index(offset) * geo.l2_entries + geo.l2_index(offset)
    assert (cluster << geo.cluster_bits) + geo.offset_in_cluster(offset) == offset
    assert 0 <= geo.l2_index(offset) < geo.l2_entries
    assert geo.start_of_cluster(offset) + geo.offset_in_cluster(offset) == offset


@given(geo=geometries)
def test_table_sizes(geo: Geometry) -> None:
    # qcow2.txt: l2_entries = cluster_size / 8 (16 with extended L2)
    assert geo.l2_entries * geo.l2_entry_size == geo.cluster_size
    assert geo.refblock_entries * geo.refcount_bits == geo.cluster_size * 8
    assert geo.refcount_max == 2**geo.refcount_bits - 1
    if geo.extended_l2:
        assert geo.subcluster_size * 32 == geo.cluster_size


@given(geo=geometries, size=st.integers(0, 1 << 50))
def test_l1_entries_cover_the_disk(geo: Geometry, size: int) -> None:
    n = geo.l1_entries_for(size)
    assert n * geo.bytes_per_l2 >= size > (n - 1) * geo.bytes_per_l2 or n == size == 0


@given(data=st.data(), bits=st.integers(9, 21))
def test_compressed_descriptor_round_trip(data: st.DataObject, bits: int) -> None:
    geo = Geometry(bits)
    # qcow2.txt: x = 62 - (cluster_bits - 8); offset in bits 0..x-1
    assert geo.csize_shift == 62 - (bits - 8)
    host = data.draw(st.integers(1 << bits, (1 << min(geo.csize_shift, 56)) - 1))
    nbytes = data.draw(st.integers(1, geo.cluster_size + 512 - host % 512))
    desc = geo.compressed_descriptor(host, nbytes)
    got_host, got_len = geo.compressed_range(desc | (1 << 62))
    assert got_host == host
    # The range covers the data and ends on a sector boundary.
    assert got_len >= nbytes and (host + got_len) % 512 == 0 and got_len - nbytes < 512


def test_reftable_and_refblock_index() -> None:
    geo = Geometry(16, refcount_order=4)  # 32768 refcounts per block
    host = (32768 * 3 + 5) << 16
    assert geo.reftable_index(host) == 3 and geo.refblock_index(host) == 5


def test_subcluster_index() -> None:
    geo = Geometry(16, extended_l2=True)
    assert geo.subcluster_size == 2048
    assert geo.subcluster_index(0x10000 + 4095) == 1
    assert geo.subcluster_index(0x1FFFF) == 31

"""Refcount codec, allocation and reftable growth (qcow2.txt "Host cluster
management"); images are checked with ``qemu-img check`` afterwards."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
import tools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2.create import create
from nbdqcow.qcow2.offline import OfflineImage
from nbdqcow.qcow2.refcount import (
    RefBlock,
    RefcountOverflow,
    decode_block,
    encode_block,
    entries_per_block,
)


@st.composite
def blocks(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    order = draw(st.integers(0, 6))
    cluster_size = draw(st.sampled_from([512, 1024, 4096]))
    n = entries_per_block(cluster_size, order)
    maxv = (1 << (1 << order)) - 1
    # Sparse: a few set entries in a zero block (refblocks look like that).
    sparse = draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, maxv), max_size=64))
    values = [0] * n
    for i, v in sparse.items():
        values[i] = v
    return order, cluster_size, values


@given(blocks())
def test_codec_roundtrip(b: tuple[int, int, list[int]]) -> None:
    order, cs, values = b
    data = encode_block(values, order, cs)
    assert len(data) == cs
    assert decode_block(data, order) == values
    blk = RefBlock(bytearray(data), order)
    assert [blk.get(i) for i in range(len(blk))] == values


@given(st.integers(0, 6), st.data())
def test_set_touches_only_its_entry(order: int, data: st.DataObject) -> None:
    blk = RefBlock(bytearray(512), order)
    n = len(blk)
    i = data.draw(st.integers(0, n - 1))
    v = data.draw(st.integers(0, blk.max))
    before = [blk.get(k) for k in range(n)]
    blk.set(i, v)
    after = [blk.get(k) for k in range(n)]
    assert after[i] == v
    assert after[:i] + after[i + 1 :] == before[:i] + before[i + 1 :]


def test_bit_packing_is_lsb_first_and_wide_widths_big_endian() -> None:
    # qcow2.txt: "If refcount_bits < 8, ... the bits are packed starting
    # from the least significant bit"; wider refcounts are big endian.
    one = RefBlock(bytearray(512), 0)
    one.set(0, 1)
    one.set(9, 1)
    assert one.data[0] == 0b1 and one.data[1] == 0b10
    four = RefBlock(bytearray(512), 2)
    four.set(1, 0xA)
    assert four.data[0] == 0xA0
    sixteen = RefBlock(bytearray(512), 4)
    sixteen.set(1, 0x1234)
    assert bytes(sixteen.data[2:4]) == b"\x12\x34"


@pytest.mark.parametrize("order", range(7))
def test_overflow_is_refused(order: int) -> None:
    blk = RefBlock(bytearray(512), order)
    blk.set(3, blk.max)
    with pytest.raises(RefcountOverflow, match="refcount_bits"):
        blk.set(3, blk.max + 1)
    assert blk.get(3) == blk.max


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tools.require("qemu-img"), "check", str(path)], capture_output=True, text=True
    )


@pytest.mark.parametrize("bits", [1, 2, 16, 64])
def test_alloc_free_reuse(tmp_path: Path, bits: int) -> None:
    img = tmp_path / "a.qcow2"
    create(img, 1 << 30, cluster_size=4096, refcount_bits=bits)
    with OfflineImage(img, writable=True) as im:
        rc = im.refcounts
        a = rc.alloc(4)
        b = rc.alloc(1)
        assert b == a + 4 * 4096
        rc.free(a + 4096, 2)
        # Lowest free index first: the hole left by the free is reused.
        assert rc.alloc(2) == a + 4096
        rc.free(a + 4096, 2)
        rc.free(a, 1)
        rc.free(a + 3 * 4096, 1)
        rc.free(b, 1)
        rc.flush()
        im.sync()
    r = _check(img)
    assert r.returncode == 0, r.stdout + r.stderr


def test_refcount_underflow_is_corruption(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    create(img, 1 << 20)
    with OfflineImage(img, writable=True) as im, pytest.raises(CorruptImage, match="below zero"):
        im.refcounts.free(100 * 65536)


def test_overflow_in_image_is_clean(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    create(img, 1 << 20, refcount_bits=1)
    with OfflineImage(img, writable=True) as im:
        with pytest.raises(RefcountOverflow):
            im.refcounts.update(0, 1)
        assert im.refcounts.get(0) == 1


def test_a_new_block_that_could_not_be_placed_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run covering a whole range puts that range's block in the next
    range; when that fails (ENOSPC growing the reftable) the block must not
    stay cached without a reftable entry, or later counts land in it and
    every flush after refuses the image as corrupt (review)."""
    img = tmp_path / "a.qcow2"
    create(img, 1 << 20, cluster_size=512, refcount_bits=64)
    with OfflineImage(img, writable=True) as im:
        rc = im.refcounts
        assert rc.rb_entries == 64 and len(rc.table) == 64
        while rc.free_index < 63 * 64:
            rc.alloc(1)
        rc.flush()
        im.sync()

        def enospc(*_: object, **__: object) -> None:
            raise OSError(errno.ENOSPC, "no space left (injected)")

        # 64 clusters from 63 * 64: all of range 63, so its block goes to
        # range 64, beyond the reftable, whose growth fails.
        with monkeypatch.context() as m:
            m.setattr(rc, "_grow_table", enospc)
            with pytest.raises(OSError, match="injected"):
                rc.alloc(64)
        assert rc.table[63] == 0
        rc.alloc(1)  # space again: the table grows
        rc.free(63 * 64 * 512 - 512)  # first fit now runs into range 63
        rc.alloc(2)
        rc.flush()  # refused the image as corrupt before the fix
        im.sync()
    r = _check(img)
    assert r.returncode in (0, 3), r.stdout + r.stderr


@pytest.mark.parametrize(("cs", "bits"), [(512, 1), (512, 16), (1024, 64)])
def test_reftable_growth_keeps_image_consistent(tmp_path: Path, cs: int, bits: int) -> None:
    """Allocate far beyond what one reftable cluster covers, free part of it
    again, and let qemu-img check judge the result (leaks are expected:
    allocated clusters nothing references)."""
    img = tmp_path / "g.qcow2"
    create(img, 1 << 30, cluster_size=cs, refcount_bits=bits)
    with OfflineImage(img, writable=True) as im:
        rc = im.refcounts
        first_table = im.header.refcount_table_offset
        per_table = (cs // 8) * entries_per_block(cs, bits.bit_length() - 1)
        got = [rc.alloc(1) for _ in range(min(per_table, 20000) + 50)]
        assert len(set(got)) == len(got)
        if per_table < 20000:
            assert im.header.refcount_table_offset != first_table
        for off in got:
            assert rc.get_offset(off) == 1
        rc.flush()
        im.f.truncate(max(im.file_size(), rc.end_offset()))
        im.sync()
        n_alloc = len(got)
    r = _check(img)
    # Every allocated cluster is referenced by nothing, so exactly those are
    # leaks; everything else (reftable, refblocks) must be consistent.
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"{n_alloc} leaked clusters" in r.stdout
    assert "ERROR" not in r.stdout


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bits=st.sampled_from([1, 8, 16, 32, 64]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(1, 5)), min_size=1, max_size=30),
)
def test_cached_allocation_equals_the_general_one(
    tmp_path_factory: pytest.TempPathFactory, bits: int, ops: list[tuple[bool, int]]
) -> None:
    """``Refcounts.alloc_cached`` (the inline write's allocator: byte tests
    for one 16-bit count, a slice store otherwise) hands out what the
    general search would, and leaves the same counts and marks; -1 where
    it cannot (sub-byte widths, a used cluster at the mark)."""
    d = tmp_path_factory.mktemp("rc")
    img = d / "a.qcow2"
    create(img, 1 << 30, cluster_size=4096, refcount_bits=bits)
    twin = d / "b.qcow2"
    shutil.copyfile(img, twin)
    with OfflineImage(img, writable=True) as fast_im, OfflineImage(twin, writable=True) as slow_im:
        fast, slow = fast_im.refcounts, slow_im.refcounts
        got: list[int] = []
        for free, n in ops:
            if free and got:
                off = got.pop(n % len(got))
                fast.free(off)
                slow.free(off)
                continue
            c = fast.alloc_cached(n)
            if c < 0:
                c = fast.alloc_fresh(n)[0] >> fast.cluster_bits
            else:
                assert bits >= 8
            assert c == slow._alloc_slow(n)
            got += [(c + k) << fast.cluster_bits for k in range(n)]
            assert (fast.free_index, fast.fresh_from) == (slow.free_index, slow.fresh_from)
        assert {ri: bytes(b.data) for ri, b in fast._blocks.items()} == {
            ri: bytes(b.data) for ri, b in slow._blocks.items()
        }

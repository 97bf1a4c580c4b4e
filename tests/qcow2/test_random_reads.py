"""Hypothesis: any read range, split into any buffers, equals the qemu-made
raw copy (unaligned, cluster-crossing, vectored)."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.qcow2 import open_image
from tests.qcow2.conftest import Built
from tests.qcow2.imagegen import CASES

BY_NAME = {c.name: c for c in CASES}


@st.composite
def reads(draw: st.DrawFn, size: int) -> tuple[int, list[int]]:
    # Bias towards small reads around cluster boundaries and long ones.
    length = draw(st.one_of(st.integers(1, 4096), st.integers(1, 600_000)))
    length = min(length, size)
    offset = draw(st.integers(0, size - length))
    cuts = sorted(draw(st.lists(st.integers(0, length), max_size=4)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
    return offset, sizes


@pytest.mark.parametrize("name", ["extl2", "zstd", "chain-raw", "v3-c512", "short-backing"])
def test_random_reads(built: Built, name: str) -> None:
    path, raw = built(BY_NAME[name])
    expected = raw.read_bytes()
    img = open_image(path)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(req=reads(len(expected)))
    def check(req: tuple[int, list[int]]) -> None:
        offset, sizes = req
        bufs = [bytearray(n) for n in sizes]
        asyncio.run(img.preadv(offset, [memoryview(b) for b in bufs]))
        assert b"".join(bufs) == expected[offset : offset + sum(sizes)]

    try:
        check()
    finally:
        asyncio.run(img.aclose())


async def test_concurrent_reads_with_a_tiny_l2_cache(built: Built) -> None:
    """Many reads in flight while the 2-table cache evicts constantly."""
    import random

    path, raw = built(BY_NAME["v3-c512"])  # 512-byte clusters: 128 L2 tables
    expected = raw.read_bytes()
    img = open_image(path, l2_cache_bytes=1)
    assert img.l2_cache.capacity == 2
    rnd = random.Random(7)
    reqs = []
    for _ in range(200):
        n = rnd.randint(1, 100_000)
        reqs.append((rnd.randint(0, len(expected) - n), n))

    async def one(off: int, n: int) -> bool:
        buf = bytearray(n)
        await img.preadv(off, [memoryview(buf)])
        return buf == expected[off : off + n]

    try:
        results = await asyncio.gather(*(one(o, n) for o, n in reqs))
        assert all(results)
        assert img.l2_cache.misses > 20  # the cache really was thrashed
    finally:
        await img.aclose()


@pytest.mark.parametrize("name", ["extl2", "chain-raw", "zstd", "short-backing"])
def test_random_block_status_agrees_with_the_full_map(built: Built, name: str) -> None:
    """block_status of any sub-range is contiguous, starts where asked, and
    says at every point what the whole-disk map says there."""
    path, _ = built(BY_NAME[name])
    img = open_image(path)
    full = asyncio.run(img.block_status(0, img.size))
    assert full[-1].end == img.size  # small images: one call covers all

    def at(pos: int) -> tuple[object, int]:
        e = next(x for x in full if x.offset <= pos < x.end)
        return e.flags, e.depth

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        off = data.draw(st.integers(0, img.size - 1))
        length = data.draw(st.integers(1, img.size - off))
        exts = asyncio.run(img.block_status(off, length))
        assert exts[0].offset == off and exts[-1].end <= off + length
        for a, b in itertools.pairwise(exts):
            assert a.end == b.offset
        for e in exts:
            assert e.length > 0
            for p in (e.offset, e.end - 1):
                assert (e.flags, e.depth) == at(p)

    try:
        check()
    finally:
        asyncio.run(img.aclose())

"""The read matrix of issue 2: every image qemu makes reads exactly as
``qemu-img convert -O raw`` reads it, and block status agrees with
``qemu-img map --output=json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nbdqcow.backends.base import Extent, ExtentFlag
from nbdqcow.qcow2 import Qcow2Image, open_image
from tests.qcow2.conftest import Built
from tests.qcow2.imagegen import CASES, Case, qemu_map

CHUNK = 1024 * 1024 + 4096 + 7  # deliberately not cluster aligned


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_reads_equal_qemu_convert(built: Built, case: Case) -> None:
    path, raw = built(case)
    expected = raw.read_bytes()
    img = open_image(path, snapshot=case.snapshot)
    try:
        assert img.size == len(expected)
        got = bytearray(img.size)
        view = memoryview(got)
        for off in range(0, img.size, CHUNK):
            n = min(CHUNK, img.size - off)
            # Vectored: three caller buffers per request.
            a, b = n // 3, 2 * n // 3
            await img.preadv(off, [view[off : off + a], view[off + a : off + b],
                                   view[off + b : off + n]])  # fmt: skip
        if got != expected:
            first_bad = next(i for i in range(len(got)) if got[i] != expected[i])
            raise AssertionError(f"first difference at byte {first_bad:#x}")
    finally:
        await img.aclose()


async def our_map(img: Qcow2Image) -> list[Extent]:
    out: list[Extent] = []
    pos = 0
    while pos < img.size:
        exts = await img.block_status(pos, img.size - pos)
        assert exts and exts[0].offset == pos
        for e in exts:
            assert e.length > 0
        out += exts
        pos = exts[-1].end
    return out


def _key_qemu(e: dict[str, Any], at: int) -> tuple[int, bool, int | None]:
    depth = e["depth"] + 1 if e["present"] else 0
    off = e.get("offset")
    off = off + (at - e["start"]) if (off is not None and e["data"]) else None
    return depth, bool(e["data"]), off


def _key_ours(e: Extent, at: int) -> tuple[int, bool, int | None]:
    data = not (e.flags & ExtentFlag.HOLE)
    off = e.host_offset + (at - e.offset) if e.host_offset is not None else None
    return e.depth, data, off


def compare_maps(qemu: list[dict[str, Any]], ours: list[Extent], size: int) -> None:
    """Compare depth, data and (where qemu has data at an offset) the host
    offset at every boundary of either map."""
    assert sum(e["length"] for e in qemu) == size
    assert sum(e.length for e in ours) == size
    for e in ours:
        # Reads-as-zero must be said for everything that is not data.
        if e.flags & ExtentFlag.HOLE:
            assert e.flags & ExtentFlag.ZERO
    cuts = sorted({e["start"] for e in qemu} | {e.offset for e in ours})
    qi = oi = 0
    for at in cuts:
        while qemu[qi]["start"] + qemu[qi]["length"] <= at:
            qi += 1
        while ours[oi].end <= at:
            oi += 1
        qk, ok = _key_qemu(qemu[qi], at), _key_ours(ours[oi], at)
        if qk[2] is None:
            ok = (ok[0], ok[1], None)
        assert ok == qk, f"at {at:#x}: ours {ours[oi]} vs qemu {qemu[qi]}"


MAP_CASES = [c for c in CASES if c.map]


@pytest.mark.parametrize("case", MAP_CASES, ids=[c.name for c in MAP_CASES])
async def test_block_status_equals_qemu_map(built: Built, case: Case) -> None:
    path, _ = built(case)
    img = open_image(path)
    try:
        compare_maps(qemu_map(Path(path)), await our_map(img), img.size)
    finally:
        await img.aclose()


async def test_matrix_covers_every_cluster_type(built: Built) -> None:
    """The matrix really contains every kind of mapping it claims to test."""
    from nbdqcow.qcow2.entries import SubclusterType

    seen: dict[SubclusterType, set[str]] = {}
    for case in CASES:
        path, _ = built(case)
        img = open_image(path, snapshot=case.snapshot)
        try:
            for run in await img.map.runs(0, img.size):
                seen.setdefault(run.type, set()).add(case.name)
        finally:
            await img.aclose()
    missing = set(SubclusterType) - {SubclusterType.INVALID} - set(seen)
    assert not missing, f"no matrix image has {missing}"
    assert {"zlib", "zstd", "zstd-c2m"} <= seen[SubclusterType.COMPRESSED]
    assert "extl2" in seen[SubclusterType.UNALLOCATED_ALLOC]
    assert "v3-c4k" in seen[SubclusterType.ZERO_ALLOC]

"""Robustness: randomly damaged images are either served or refused with one
of our exceptions -- never another exception, never a hang (the h11 fuzzing
invariant, QCOW2.md section 10)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.errors import NbdqcowError
from nbdqcow.qcow2 import open_image
from tests.qcow2.imagegen import KiB, MiB, create, qemu_img, qemu_io


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("fuzz")
    out = {}
    p = create(d / "plain.qcow2", 2 * MiB, "cluster_size=4096")
    qemu_io(p, f"write -P 1 0 {64 * KiB}", f"write -z {MiB} {8 * KiB}",
            f"write -P 2 {MiB + 8 * KiB} 4k")  # fmt: skip
    qemu_img("snapshot", "-c", "s", p)
    out["plain"] = p.read_bytes()
    e = create(d / "ext.qcow2", 2 * MiB, "extended_l2=on,cluster_size=16k")
    qemu_io(e, "write -P 3 1000 3000", f"write -z {MiB} 2048")
    out["ext"] = e.read_bytes()
    c = d / "comp.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096,compression_type=zstd",
             p, c)  # fmt: skip
    out["comp"] = c.read_bytes()
    return out


async def _exercise(path: Path) -> None:
    try:
        img = open_image(path)
    except NbdqcowError as e:
        assert str(e)
        return
    try:
        for off in range(0, img.size, 256 * KiB):
            n = min(256 * KiB, img.size - off)
            try:
                await img.preadv(off, [memoryview(bytearray(n))])
            except NbdqcowError as e:
                assert str(e)
            try:
                exts = await img.block_status(off, n)
                assert exts and exts[0].offset == off
            except NbdqcowError as e:
                assert str(e)
    finally:
        await img.aclose()


#: More examples locally with NBDQCOW_FUZZ_EXAMPLES=5000 (4000 ran clean).
EXAMPLES = int(os.environ.get("NBDQCOW_FUZZ_EXAMPLES", "150"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    which=st.sampled_from(["plain", "ext", "comp"]),
    edits=st.lists(
        st.tuples(st.integers(0, 40 * 1024), st.integers(0, 255)), min_size=1, max_size=12
    ),
)
def test_damaged_images_fail_cleanly(
    pristine: dict[str, bytes], tmp_path: Path, which: str, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(pristine[which])
    for pos, byte in edits:
        if pos < len(data):
            data[pos] = byte
    p = tmp_path / "fuzzed.qcow2"
    p.write_bytes(bytes(data))
    asyncio.run(_exercise(p))

"""A sparse 4 TiB image: metadata-only costs, reads and map at the far end."""

from __future__ import annotations

from pathlib import Path

from nbdqcow.qcow2 import open_image
from tests.qcow2.imagegen import create, qemu_img, qemu_io, qemu_map
from tests.qcow2.test_matrix import compare_maps, our_map

TiB = 1 << 40
SPOTS = [(0, 65536, 1), (TiB + 12345, 100_000, 2), (4 * TiB - 4096, 4096, 3)]


async def test_sparse_4tib(tmp_path: Path) -> None:
    img_path = create(tmp_path / "big.qcow2", "4T")
    qemu_io(img_path, *(f"write -P {p} {off} {n}" for off, n, p in SPOTS))
    raw = tmp_path / "big.raw"
    qemu_img("convert", "-O", "raw", img_path, raw)  # sparse: only the spots
    img = open_image(img_path)
    try:
        assert img.size == 4 * TiB
        with open(raw, "rb") as f:
            for off, n, _ in SPOTS:
                for start in (off - 1000, off, off + n - 10):
                    start = max(0, min(start, img.size - 70_000))
                    buf = bytearray(70_000)
                    await img.preadv(start, [memoryview(buf)])
                    f.seek(start)
                    assert buf == f.read(70_000), f"mismatch at {start:#x}"
        compare_maps(qemu_map(img_path), await our_map(img), img.size)
        # Only the three touched L2 tables were ever read.
        assert img.l2_cache.misses <= 3
    finally:
        await img.aclose()

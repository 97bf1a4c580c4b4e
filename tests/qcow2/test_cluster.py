"""Guest-to-host runs (nbdqcow.qcow2.cluster) and the read path built on
them: one vectored read per contiguous run, L2 tables read once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nbdqcow.io import HostFile
from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.entries import SubclusterType
from tests.qcow2.imagegen import KiB, MiB, create, qemu_img, qemu_io


class CountingFile(HostFile):
    def __init__(self, path: str) -> None:
        super().__init__(path, writable=False)
        self.reads: list[tuple[int, int]] = []

    async def preadv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self.reads.append((offset, sum(len(b) for b in bufs)))
        return await super().preadv(offset, bufs)


async def test_contiguous_clusters_are_one_read(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(range(256)) * (8 * MiB // 256))
    img_path = tmp_path / "img.qcow2"
    qemu_img("convert", "-O", "qcow2", src, img_path)
    img = open_image(img_path)
    counting = CountingFile(str(img_path))
    img.data = counting
    try:
        runs = await img.map.runs(0, img.size)
        assert len(runs) == 1 and runs[0].type is SubclusterType.NORMAL
        bufs = [bytearray(MiB) for _ in range(8)]
        await img.preadv(0, [memoryview(b) for b in bufs])
        # 128 clusters, 8 caller buffers: one vectored read.
        assert counting.reads == [(runs[0].host, 8 * MiB)]
        assert b"".join(bufs) == src.read_bytes()
        # Tables were read once; a second read hits the cache only.
        misses = img.l2_cache.misses
        await img.preadv(4096, [memoryview(bufs[0])[:100]])
        assert img.l2_cache.misses == misses
    finally:
        counting.close()
        await img.aclose()


async def test_one_read_per_run_with_small_clusters(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(range(256)) * (8 * MiB // 256))
    img_path = tmp_path / "img.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=4096", src, img_path)
    img = open_image(img_path)
    counting = CountingFile(str(img_path))
    img.data = counting
    try:
        runs = await img.map.runs(0, img.size)
        # L2 tables sit between data runs: one run per 2 MiB, not per cluster.
        assert len(runs) <= 5
        buf = bytearray(img.size)
        await img.preadv(0, [memoryview(buf)])
        assert counting.reads == [(r.host, r.length) for r in runs]
        assert buf == src.read_bytes()
    finally:
        counting.close()
        await img.aclose()


async def test_runs_split_by_type_and_host_gap(tmp_path: Path) -> None:
    p = create(tmp_path / "img.qcow2", 4 * MiB, "cluster_size=65536")
    qemu_io(p, "write -P 1 128k 64k", "write -P 2 0 64k", f"write -z {MiB} 128k")
    img = open_image(p)
    try:
        runs = await img.map.runs(0, 2 * MiB)
        kinds = [(r.guest, r.length, r.type) for r in runs]
        assert kinds == [
            (0, 64 * KiB, SubclusterType.NORMAL),  # written second: host not contiguous
            (64 * KiB, 64 * KiB, SubclusterType.UNALLOCATED_PLAIN),
            (128 * KiB, 64 * KiB, SubclusterType.NORMAL),
            (192 * KiB, MiB - 192 * KiB, SubclusterType.UNALLOCATED_PLAIN),
            (MiB, 128 * KiB, SubclusterType.ZERO_PLAIN),
            (MiB + 128 * KiB, MiB - 128 * KiB, SubclusterType.UNALLOCATED_PLAIN),
        ]
        assert runs[0].host != runs[2].host - 128 * KiB
    finally:
        await img.aclose()


def test_l2_cache_sized_like_qemu(tmp_path: Path) -> None:
    small = create(tmp_path / "small.qcow2", 4 * MiB)
    big = create(tmp_path / "big.qcow2", "1T")
    a = open_image(small)
    b = open_image(big)
    c = open_image(big, l2_cache_bytes=MiB)
    try:
        assert a.l2_cache.capacity == 2  # one table covers the disk; minimum 2
        assert b.l2_cache.capacity == 512  # 32 MiB cap / 64 KiB tables
        assert c.l2_cache.capacity == 16
    finally:
        for i in (a, b, c):
            i.close_files()

"""Targeted behaviour of the write engine: locking, dirty-image repair,
autoclear bits, corrupt-bit handling, FAST_ZERO/NO_HOLE semantics, host
allocation patterns and concurrent writes."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import tools

from nbdqcow.errors import CorruptImage, ImageError, ImageLocked
from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.check import check_image
from nbdqcow.qcow2.layout import L2E_OFFSET_MASK, OFLAG_COPIED, IncompatFeature
from nbdqcow.qcow2.offline import OfflineImage


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools.require(args[0]), *args[1:]], capture_output=True, text=True)


def make(tmp_path: Path, opts: str = "cluster_size=64k", size: str = "4M", *extra: str) -> Path:
    img = tmp_path / "e.qcow2"
    r = run("qemu-img", "create", "-f", "qcow2", "-o", opts, *extra, str(img), size)
    assert r.returncode == 0, r.stderr
    return img


def qemu_map(img: Path) -> list[dict[str, object]]:
    r = run("qemu-img", "map", "--output=json", str(img))
    out: list[dict[str, object]] = json.loads(r.stdout)
    return out


def clean(img: Path) -> None:
    r = run("qemu-img", "check", str(img))
    assert r.returncode == 0, r.stdout + r.stderr


async def test_second_writer_refused_and_named(tmp_path: Path) -> None:
    img = make(tmp_path)
    a = open_image(img, read_only=False)
    try:
        with pytest.raises(ImageLocked, match="in use"):
            open_image(img, read_only=False)
        r = run("qemu-io", "-c", "write 0 4k", str(img))
        assert r.returncode != 0 and "lock" in r.stderr
        # A reader in another process is told who holds it.
        proc = await asyncio.create_subprocess_exec(
            tools.require("qemu-img"), "info", str(img), stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        assert proc.returncode != 0 and b"lock" in err
    finally:
        await a.aclose()
    assert run("qemu-io", "-c", "write 0 4k", str(img)).returncode == 0


def test_qemu_writer_blocks_us(tmp_path: Path) -> None:
    img = make(tmp_path)
    proc = subprocess.Popen(
        [tools.require("qemu-io"), str(img)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("write 0 4k\n")
        proc.stdin.flush()
        proc.stdout.readline()  # qemu-io has the image open now
        with pytest.raises(ImageLocked) as info:
            open_image(img, read_only=False)
        assert "qemu-io" in str(info.value)
    finally:
        proc.kill()
        proc.wait()


async def test_dirty_image_is_repaired_before_writing(tmp_path: Path) -> None:
    img = make(tmp_path, "cluster_size=4k,lazy_refcounts=on")
    assert run("qemu-io", "-c", "write -P 1 0 64k", str(img)).returncode == 0
    with OfflineImage(img, writable=True) as im:
        # Stale refcounts, as lazy refcounts leave them after a crash.
        im.refcounts.alloc(3)
        im.refcounts.flush()
        im.f.truncate(im.file_size() + 3 * 4096)
        h = im.header
        dirty = h.incompatible_features | IncompatFeature.DIRTY
        im.write_header(replace(h, incompatible_features=dirty))
    assert run("qemu-img", "check", str(img)).returncode == 3
    a = open_image(img, read_only=False)
    assert not a.header.dirty
    await a.pwritev(100, [b"x" * 10])
    await a.aclose()
    clean(img)


async def test_autoclear_bits_cleared_before_first_write(tmp_path: Path) -> None:
    img = make(tmp_path)
    with OfflineImage(img, writable=True) as im:
        im.write_header(replace(im.header, autoclear_features=(1 << 0) | (1 << 7)))
    a = open_image(img, read_only=False)
    await a.aclose()
    with OfflineImage(img, writable=False) as im:
        assert im.header.autoclear_features == 0


async def test_write_onto_metadata_marks_corrupt(tmp_path: Path) -> None:
    img = make(tmp_path, "cluster_size=4k")
    assert run("qemu-io", "-c", "write -P 1 0 4k", str(img)).returncode == 0
    with OfflineImage(img, writable=True) as im:
        l1 = im.read_l1()
        l2off = l1[0] & L2E_OFFSET_MASK
        l2 = im.read_l2(l2off)
        # Point guest cluster 1 at the refcount table, claiming COPIED.
        l2[1] = im.header.refcount_table_offset | OFLAG_COPIED
        im.write_table(l2off, l2)
    a = open_image(img, read_only=False)
    try:
        with pytest.raises(CorruptImage, match="refcount table"):
            await a.pwritev(4096, [b"evil" * 1024])
        assert a.header.corrupt
        with pytest.raises(OSError) as e:
            await a.pwritev(0, [b"x"])
        assert e.value.errno == errno.EIO
        buf = bytearray(4096)
        await a.preadv(0, [memoryview(buf)])
        assert buf == b"\1" * 4096
    finally:
        await a.aclose()
    with pytest.raises(ImageError, match="corrupt"):
        open_image(img, read_only=False)
    r = run("qemu-img", "info", "--output=json", str(img))
    assert json.loads(r.stdout)["format-specific"]["data"]["corrupt"] is True


async def test_flush_after_corruption_reports_eio(tmp_path: Path) -> None:
    """A FLUSH reply promises durability; once the engine refuses metadata
    writes (corrupt image) it cannot keep that promise for the writes still
    in its caches, so the flush fails with EIO instead of succeeding
    silently (qemu fails every request once the image is marked corrupt)."""
    img = make(tmp_path, "cluster_size=4k")
    assert run("qemu-io", "-c", "write -P 1 0 4k", str(img)).returncode == 0
    with OfflineImage(img, writable=True) as im:
        l2off = im.read_l1()[0] & L2E_OFFSET_MASK
        l2 = im.read_l2(l2off)
        l2[1] = im.header.refcount_table_offset | OFLAG_COPIED
        im.write_table(l2off, l2)
    a = open_image(img, read_only=False)
    try:
        await a.pwritev(8192, [b"\2" * 4096])  # acknowledged, not yet durable
        with pytest.raises(CorruptImage):
            await a.pwritev(4096, [b"evil" * 1024])
        with pytest.raises(OSError) as e:
            await a.flush()
        assert e.value.errno == errno.EIO
    finally:
        await a.aclose()


async def test_fast_zero_and_no_hole(tmp_path: Path) -> None:
    img = make(tmp_path, "cluster_size=64k")
    a = open_image(img, read_only=False)
    try:
        await a.pwritev(0, [b"\7" * (256 * 1024)])
        await a.flush()
        size_before = img.stat().st_size
        with pytest.raises(OSError) as e:
            await a.zero(100, 65536, fast=True)
        assert e.value.errno == errno.ENOTSUP
        buf = bytearray(256 * 1024)
        await a.preadv(0, [memoryview(buf)])
        assert buf == b"\7" * (256 * 1024)  # untouched by the refused request
        await a.zero(0, 65536, fast=True)  # NO_HOLE: stays allocated
        await a.zero(65536, 65536, fast=True, may_trim=True)
        await a.flush()
        assert img.stat().st_size == size_before  # metadata only
    finally:
        await a.aclose()
    m = {int(e["start"]): e for e in qemu_map(img)}  # type: ignore[call-overload]
    assert m[0]["zero"] is True and "offset" in m[0]
    assert m[65536]["zero"] is True and "offset" not in m[65536]
    clean(img)


async def test_v2_with_backing_cannot_zero_fast(tmp_path: Path) -> None:
    base = tmp_path / "b.raw"
    base.write_bytes(b"\5" * (1 << 20))
    img = make(tmp_path, "compat=0.10,cluster_size=4k", "1M", "-b", "b.raw", "-F", "raw")
    a = open_image(img, read_only=False)
    try:
        with pytest.raises(OSError) as e:
            await a.zero(0, 8192, fast=True, may_trim=True)
        assert e.value.errno == errno.ENOTSUP
        await a.zero(0, 8192, may_trim=True)  # falls back to writing zeroes
        buf = bytearray(12288)
        await a.preadv(0, [memoryview(buf)])
        assert buf == bytes(8192) + b"\5" * 4096
    finally:
        await a.aclose()
    clean(img)


async def test_sequential_writes_get_contiguous_host_runs(tmp_path: Path) -> None:
    img = make(tmp_path, "cluster_size=4k")
    a = open_image(img, read_only=False)
    try:
        for i in range(32):
            await a.pwritev(i * 4096, [bytes([i + 1]) * 4096])
    finally:
        await a.aclose()
    data = [e for e in qemu_map(img) if e["data"]]
    assert len(data) == 1 and data[0]["length"] == 32 * 4096
    clean(img)


async def test_concurrent_writes_to_one_unallocated_cluster(tmp_path: Path) -> None:
    img = make(tmp_path, "cluster_size=64k")
    a = open_image(img, read_only=False)
    try:
        await asyncio.gather(
            a.pwritev(0, [b"\1" * 1000]),
            a.pwritev(30000, [b"\2" * 1000]),
            a.pwritev(64000, [b"\3" * 3000]),
        )
        buf = bytearray(70000)
        await a.preadv(0, [memoryview(buf)])
    finally:
        await a.aclose()
    assert buf[:1000] == b"\1" * 1000 and buf[30000:31000] == b"\2" * 1000
    assert buf[64000:67000] == b"\3" * 3000 and buf[1000:30000] == bytes(29000)
    assert check_image(str(img)).exit_code == 0
    clean(img)


async def test_read_only_open_refuses_writes(tmp_path: Path) -> None:
    img = make(tmp_path)
    a = open_image(img)
    try:
        assert a.caps.read_only
        with pytest.raises(OSError) as e:
            await a.pwritev(0, [b"x"])
        assert e.value.errno == errno.EROFS
    finally:
        await a.aclose()


async def test_offline_tools_refuse_an_image_in_use(tmp_path: Path) -> None:
    from nbdqcow.qcow2.snapshot_write import create_snapshot

    img = make(tmp_path)
    a = open_image(img, read_only=False)
    try:
        await a.pwritev(0, [b"\1" * 4096])
        res = check_image(str(img))
        assert res.exit_code == 1 and "in use" in " ".join(res.messages)
        with pytest.raises(ImageLocked):
            create_snapshot(str(img), "s")
    finally:
        await a.aclose()
    assert check_image(str(img)).exit_code == 0


async def test_backing_file_locked_against_writers(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    assert run("qemu-img", "create", "-f", "qcow2", str(base), "1M").returncode == 0
    img = make(tmp_path, "cluster_size=64k", "1M", "-b", "base.qcow2", "-F", "qcow2")
    a = open_image(img, read_only=False)
    try:
        r = run("qemu-io", "-c", "write 0 4k", str(base))
        assert r.returncode != 0 and "lock" in r.stderr
        # Readers of the base are fine (qemu-img info -U style sharing).
        assert run("qemu-img", "info", "-U", str(base)).returncode == 0
    finally:
        await a.aclose()
    assert run("qemu-io", "-c", "write 0 4k", str(base)).returncode == 0


async def test_extended_l2_zeroes_subclusters_through_the_bitmap(tmp_path: Path) -> None:
    img = make(tmp_path, "cluster_size=64k,extended_l2=on", "1M")
    a = open_image(img, read_only=False)
    try:
        await a.pwritev(0, [b"\7" * 131072])
        await a.flush()
        size = img.stat().st_size
        await a.zero(2048, 4096, fast=True)  # subclusters 1 and 2 of cluster 0
        await a.zero(98304, 32768, fast=True)  # the tail of cluster 1
        with pytest.raises(OSError) as e:
            await a.zero(100, 2048, fast=True)  # not subcluster aligned
        assert e.value.errno == errno.ENOTSUP
        await a.flush()
        assert img.stat().st_size == size
    finally:
        await a.aclose()
    clean(img)
    r = run("qemu-io", "-c", "read -P 7 0 2k", "-c", "read -P 0 2k 4k", "-c", "read -P 7 6k 90k",
            "-c", "read -P 0 96k 32k", str(img))  # fmt: skip
    assert r.returncode == 0 and "fail" not in r.stdout, r.stdout
    assert run("qemu-img", "snapshot", "-c", "s", str(img)).returncode == 0
    a = open_image(img, read_only=False)
    try:
        # Shared with the snapshot now: zero bits would change what the
        # snapshot reads, so only a (non-fast) copy-on-write will do.
        with pytest.raises(OSError) as e:
            await a.zero(8192, 2048, fast=True)
        assert e.value.errno == errno.ENOTSUP
        await a.zero(8192, 2048)
    finally:
        await a.aclose()
    clean(img)
    r = run("qemu-io", "-c", "read -P 0 8k 2k", "-c", "read -P 7 10k 10k", str(img))
    assert r.returncode == 0 and "fail" not in r.stdout, r.stdout
    assert run("qemu-img", "snapshot", "-a", "s", str(img)).returncode == 0
    r = run("qemu-io", "-c", "read -P 7 8k 2k", str(img))
    assert r.returncode == 0 and "fail" not in r.stdout, r.stdout

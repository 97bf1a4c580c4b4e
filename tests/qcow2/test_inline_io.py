"""The synchronous fast path of :class:`~nbdqcow.qcow2.image.Qcow2Image`
(:class:`~nbdqcow.backends.base.InlineIO`, issue 6).

* reads served inline are byte-identical to the qemu-made raw copy, on every
  image of the matrix (Hypothesis over offsets, lengths and buffer splits);
* any mix of inline and async writes (and flushes) leaves an image that
  ``qemu-img compare`` finds equal to the model and ``qemu-img check``
  finds clean (Hypothesis, on several image kinds);
* every decline case declines and leaves the image unchanged (file bytes,
  cached L2 tables, refcount blocks, pending work).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import tools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.backends.base import InlineIO
from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.image import Qcow2Image
from nbdqcow.qcow2.layout import L2E_OFFSET_MASK, OFLAG_COPIED
from tests.qcow2.conftest import Built
from tests.qcow2.imagegen import CASES

BY_NAME = {c.name: c for c in CASES}
KiB = 1024
MiB = 1024 * KiB


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools.require("qemu-img"), *args], capture_output=True, text=True)


def make(tmp_path: Path, opts: str = "cluster_size=64k", size: str = "4M") -> Path:
    img = tmp_path / "i.qcow2"
    r = qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(img), size)
    assert r.returncode == 0, r.stderr
    return img


def clean(img: Path) -> None:
    r = qemu_img("check", str(img))
    assert r.returncode == 0, r.stdout + r.stderr


def warm(img: Qcow2Image) -> None:
    """Load every L2 table (an async read of the whole disk)."""
    buf = bytearray(img.size)
    asyncio.run(img.preadv(0, [memoryview(buf)]))


def state(img: Qcow2Image) -> tuple[object, ...]:
    """Everything a declined call must leave alone."""
    tables = {o: t.entries.tobytes() for o, t in img.l2_cache._tables.items()}
    dirty = sorted(o for o, t in img.l2_cache._tables.items() if t.dirty)
    eng = img.engine
    rc: object = None
    if eng is not None:
        m = eng.meta
        rc = (
            {ri: bytes(b.data) for ri, b in m.rc._blocks.items()},
            sorted(m.rc._dirty), m.want_eof, list(m.pending_free), list(m.parked),
            img.l2_cache._dependency is not None, img.l2_cache._depends_on_flush,
        )  # fmt: skip
    return Path(img.path).read_bytes(), tables, dirty, list(img.l1), rc


def test_protocol() -> None:
    assert issubclass(Qcow2Image, InlineIO)


# -- reads ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_inline_reads_equal_qemu(built: Built, name: str) -> None:
    case = BY_NAME[name]
    path, raw = built(case)
    expected = raw.read_bytes()
    img = open_image(path, snapshot=case.snapshot)
    served = [0, 0]
    try:
        # Nothing is cached yet: a read of mapped data loads its L2 table
        # inline when the page cache has it (issue 6), and reads qemu's bytes.
        first = bytearray(512)
        if img.try_preadv(0, [memoryview(first)]):
            assert first == expected[:512]
        warm(img)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def check(data: st.DataObject) -> None:
            size = len(expected)
            length = min(size, data.draw(st.one_of(st.integers(1, 4096), st.integers(1, 65535))))
            if data.draw(st.booleans()):
                # Aligned to a cluster or 4 KiB: the common request.
                unit = data.draw(st.sampled_from([512, 4096, 1 << img.geo.cluster_bits]))
                offset = data.draw(st.integers(0, (size - length) // unit)) * unit
            else:
                offset = data.draw(st.integers(0, size - length))
            cuts = sorted(data.draw(st.lists(st.integers(0, length), max_size=3)))
            sizes = [b - a for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
            bufs = [bytearray(b"\xa5" * n) for n in sizes]
            ok = img.try_preadv(offset, [memoryview(b) for b in bufs])
            served[ok] += 1
            if ok:
                assert b"".join(bufs) == expected[offset : offset + length]

        check()
        # Images with plain clusters serve some reads inline; extended L2
        # entries always take the async path.
        if name == "extl2":
            assert served[1] == 0
        elif name in ("v2", "v3-c64k", "v3-c4k", "chain-qcow2", "zlib", "snapshots"):
            assert served[1] > 0, served
    finally:
        asyncio.run(img.aclose())


def test_read_declines_on_cache_miss_and_cold_data(tmp_path: Path) -> None:
    img_path = make(tmp_path)
    subprocess.run([tools.require("qemu-io"), "-c", "write -P 7 0 1M", str(img_path)],
                   check=True, capture_output=True)  # fmt: skip
    img = open_image(img_path)
    try:
        view = memoryview(bytearray(4096))
        # L2 table not cached, but in the page cache: loaded inline (issue 6).
        assert img.try_preadv(4096, [view]) and bytes(view) == b"\x07" * 4096
        assert len(img.l2_cache) == 1 and img.l2_cache.misses == 1
        asyncio.run(img.preadv(0, [view]))
        assert img.try_preadv(4096, [view]) and bytes(view) == b"\x07" * 4096
        # Across clusters that follow each other on the host: one read.
        big = memoryview(bytearray(100 * KiB))
        assert img.try_preadv(60 * KiB, [big]) and bytes(big) == b"\x07" * len(big)
        # Unallocated, no backing file: zeroes, inline.
        assert img.try_preadv(2 * MiB, [view]) and bytes(view) == bytes(4096)
        # Page cache dropped: RWF_NOWAIT refuses, and so does try_preadv
        # (fadvise DONTNEED may keep pages a concurrent reader holds:
        # only assert when the kernel really dropped them).
        os.posix_fadvise(img.file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            cold = os.preadv(img.file.fd, [memoryview(bytearray(4096))], 0x50000 + 8192,
                             os.RWF_NOWAIT) != 4096  # fmt: skip
        except BlockingIOError:
            cold = True
        if cold:
            assert not img.try_preadv(0x50000 + 4096, [view])
    finally:
        asyncio.run(img.aclose())


def test_read_of_a_fresh_cluster_tail_past_eof(tmp_path: Path) -> None:
    """An inline allocating write at the end of the file leaves the file
    ending inside the cluster until the next barrier; reads there are zeroes
    (inline declines the short read, the async path zero-fills)."""
    img = open_image(make(tmp_path), read_only=False)

    async def go() -> None:
        await img.pwritev(0, [b"\x01" * 4096])
        await img.flush()
        assert img.try_pwritev(MiB, [b"\x02" * 4096], False)
        view = memoryview(bytearray(b"\xff" * 8192))
        if img.try_preadv(MiB + 16 * KiB, [view]):
            assert bytes(view) == bytes(8192)
        await img.preadv(MiB + 16 * KiB, [view])
        assert bytes(view) == bytes(8192)
        assert img.try_preadv(MiB, [view[:4096]]) and bytes(view[:4096]) == b"\x02" * 4096
        await img.aclose()

    asyncio.run(go())
    clean(Path(img.path))


# -- writes: equality with qemu ----------------------------------------------------------

WRITE_CASES = ["v3-c64k", "v2", "v3-c4k", "refcount1", "refcount64", "chain-qcow2", "snapshots",
               "zlib"]  # fmt: skip


@st.composite
def write_plans(draw: st.DrawFn, size: int, cluster: int) -> list[tuple[str, int, int, int]]:
    ops = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["inline", "inline", "async", "flush", "fua"]))
        length = draw(st.one_of(st.just(4096), st.integers(1, 3 * cluster), st.just(cluster)))
        length = min(length, size)
        if draw(st.booleans()):
            offset = draw(st.integers(0, (size - length) // 4096)) * 4096
        else:
            offset = draw(st.integers(0, size - length))
        ops.append((kind, offset, length, draw(st.integers(1, 255))))
    return ops


@pytest.mark.parametrize("name", WRITE_CASES)
def test_inline_and_async_writes_equal_model(built: Built, name: str, tmp_path: Path) -> None:
    case = BY_NAME[name]
    src, raw = built(case)
    initial = raw.read_bytes()
    served = [0, 0]
    n = [0]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        n[0] += 1
        d = tmp_path / f"ex{n[0]}"
        shutil.copytree(src.parent, d)
        path = d / src.name
        img = open_image(path, read_only=False)
        model = bytearray(initial)
        plan = data.draw(write_plans(len(model), 1 << img.geo.cluster_bits))

        async def go() -> None:
            if data.draw(st.booleans()):
                await img.preadv(0, [memoryview(bytearray(img.size))])  # cache L2 tables
            for kind, off, length, byte in plan:
                payload = bytes([byte]) * length
                if kind == "flush":
                    await img.flush()
                    continue
                model[off : off + length] = payload
                split = [memoryview(payload)[: length // 3], memoryview(payload)[length // 3 :]]
                if kind == "inline":
                    ok = img.try_pwritev(off, split, False)
                    served[ok] += 1
                    if ok:
                        continue
                await img.pwritev(off, split, fua=kind == "fua")
            await img.aclose()

        asyncio.run(go())
        model_path = d / "model.raw"
        model_path.write_bytes(model)
        r = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(model_path))
        assert r.returncode == 0, r.stdout + r.stderr
        clean(path)
        shutil.rmtree(d)

    check()
    assert served[1] > 0, served


def test_inline_writes_keep_crash_ordering(tmp_path: Path) -> None:
    """An inline allocating write leaves the L2 table dirty behind the
    refcount dependency and the fdatasync barrier (QCOW2.md section 7 rules
    1 and 3), records the file size it needs, and changes nothing on disk
    but the data; the flush makes it all consistent."""
    path = make(tmp_path)
    img = open_image(path, read_only=False)

    async def go() -> None:
        await img.pwritev(0, [b"\x01" * 4096])
        await img.flush()
        before = path.read_bytes()
        assert img.try_pwritev(2 * MiB + 4096, [b"\x02" * 4096], False)
        cache = img.l2_cache
        assert any(t.dirty for t in cache._tables.values())
        assert cache._dependency is not None and cache._depends_on_flush
        assert img.engine is not None and img.engine.meta.want_eof > len(path.read_bytes())
        after = path.read_bytes()
        # Only the data landed: everything before the new cluster is as it was.
        assert after[: len(before)] == before
        await img.flush()
        assert len(path.read_bytes()) >= img.engine.meta.rc.end_offset()
        await img.aclose()

    asyncio.run(go())
    clean(path)


# -- declines -------------------------------------------------------------------------------


def _declines(img: Qcow2Image, offset: int, data: bytes, fua: bool = False) -> None:
    before = state(img)
    assert not img.try_pwritev(offset, [data], fua)
    assert state(img) == before


def test_write_declines(tmp_path: Path) -> None:
    path = make(tmp_path)
    subprocess.run([tools.require("qemu-io"), "-c", "write -P 7 0 1M",
                    "-c", "write -z 1M 64k", "-c", "write -c -P 9 2M 64k", str(path)],
                   check=True, capture_output=True)  # fmt: skip
    img = open_image(path, read_only=False)
    eng = img.engine
    assert eng is not None
    data = b"\x05" * 4096

    async def go() -> None:
        # Nothing cached yet.
        _declines(img, 4096, data)
        await img.preadv(0, [memoryview(bytearray(4096))])
        # The L2 table is cached, the refcount block not yet: declined (the
        # async path loads it).
        _declines(img, 4096, data)
        await img.pwritev(8192, [data])
        assert img.try_pwritev(4096, [data], False)
        _declines(img, 4096, data, fua=True)
        _declines(img, MiB + 4096, data)  # zero-flag cluster: needs the lock
        _declines(img, 2 * MiB, data)  # compressed cluster: COW
        # Two L2 tables' worth would be needed (64 KiB clusters: 512 MiB each):
        # not in a 4 MiB image; a write over a busy cluster instead.
        eng._busy[3 * MiB] = 1
        _declines(img, 3 * MiB + 4096, data)
        del eng._busy[3 * MiB]
        # Clusters released at a flush and ready for reuse: the locked path
        # releases them first.
        await img.trim(0, 64 * KiB)
        await img.flush()
        if eng.meta.parked:
            _declines(img, 3 * MiB, data)
        await img.pwritev(3 * MiB, [data])
        assert not eng.meta.parked
        # A sticky fdatasync failure, a corrupt image.
        img.file.sync_error = OSError(errno.EIO, "injected")
        _declines(img, 4096, data)
        img.file.sync_error = None
        eng.broken = "injected"
        _declines(img, 4096, data)
        eng.broken = None
        assert img.try_pwritev(4096, [data], False)
        await img.aclose()
        assert not img.try_pwritev(4096, [data], False)

    asyncio.run(go())
    clean(path)


def test_write_declines_read_only_backing_and_shared(tmp_path: Path) -> None:
    base = make(tmp_path)
    subprocess.run([tools.require("qemu-io"), "-c", "write -P 3 0 4M", str(base)],
                   check=True, capture_output=True)  # fmt: skip
    ro = open_image(base)
    warm(ro)
    assert not ro.try_pwritev(0, [b"x" * 4096], False)
    asyncio.run(ro.aclose())
    top = tmp_path / "top.qcow2"
    r = qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    assert r.returncode == 0, r.stderr
    img = open_image(top, read_only=False)

    async def go() -> None:
        await img.pwritev(0, [b"\x01" * 4096])  # an L2 table, cached
        # Unallocated but the backing file shows through: COW, declined.
        _declines(img, 64 * KiB + 512, b"\x02" * 512)
        await img.aclose()

    asyncio.run(go())
    clean(top)
    # A table shared with a snapshot (L1 entry without COPIED): declined.
    snap = tmp_path / "snap.qcow2"
    shutil.copy(base, snap)
    assert qemu_img("snapshot", "-c", "s1", str(snap)).returncode == 0
    img = open_image(snap, read_only=False)
    warm(img)
    _declines(img, 4096, b"\x04" * 4096)
    asyncio.run(img.aclose())
    clean(snap)


def test_write_declines_extended_l2_and_new_refcount_blocks(tmp_path: Path) -> None:
    ext = make(tmp_path, "extended_l2=on,cluster_size=64k")
    img = open_image(ext, read_only=False)
    asyncio.run(img.pwritev(0, [b"\x01" * 4096]))
    _declines(img, 4096, b"\x02" * 4096)
    asyncio.run(img.aclose())
    clean(ext)
    # 512-byte clusters, 16-bit refcounts: one refcount block covers 256
    # host clusters, so allocations soon need a new block (a write and an
    # fdatasync): the inline path declines then, and the async path makes it.
    small = tmp_path / "small"
    small.mkdir()
    path = make(small, "cluster_size=512", "1M")
    img = open_image(path, read_only=False)
    rnd = random.Random(5)

    async def go() -> None:
        await img.pwritev(0, [b"\x01" * 512])
        inline = declined = 0
        for c in rnd.sample(range(1, 2048), 600):
            before = state(img)
            if img.try_pwritev(c * 512, [bytes([c % 255 + 1]) * 512], False):
                inline += 1
            else:
                # Nothing cached for this L2 table, or a new refcount block.
                assert state(img) == before
                declined += 1
                await img.pwritev(c * 512, [bytes([c % 255 + 1]) * 512])
        assert inline and declined
        await img.aclose()

    asyncio.run(go())
    clean(path)


def test_corrupt_entry_declines_then_async_reports(tmp_path: Path) -> None:
    """A COPIED entry pointing at metadata: the inline path declines without
    writing; the async path finds it, fails with EIO and marks the image
    corrupt."""
    path = make(tmp_path)
    img = open_image(path, read_only=False)

    async def go() -> None:
        await img.pwritev(0, [b"\x01" * 4096])
        l2 = img.l1[0] & L2E_OFFSET_MASK
        entries = img.l2_cache.peek(l2)
        assert entries is not None
        entries[5] = img.header.refcount_table_offset | OFLAG_COPIED
        _declines(img, 5 * 64 * KiB, b"\x02" * 4096)
        with pytest.raises((CorruptImage, OSError)):
            await img.pwritev(5 * 64 * KiB, [b"\x02" * 4096])
        assert img.engine is not None and img.engine.broken is not None
        assert not img.try_pwritev(0, [b"\x03" * 4096], False)
        await img.aclose()

    asyncio.run(go())


def test_new_l2_table_costs_no_sync_and_keeps_the_order(tmp_path: Path) -> None:
    """QCOW2.md section 7 on the file operations of a fresh image: writes
    into a new L2 table (inline and async) do no sync and no metadata write;
    the flush then writes refcounts and extends the file, syncs, writes the
    table, syncs, and only then writes the L1 entry (rule 2), and syncs."""
    path = make(tmp_path, size="1G")
    img = open_image(path, read_only=False)
    f = img.file
    ops: list[tuple[str, int]] = []
    real_write, real_sync, real_trunc = f.pwritev_sync, f.fdatasync_sync, f.truncate

    def write(offset: int, bufs: object) -> None:
        ops.append(("write", offset))
        real_write(offset, bufs)  # type: ignore[arg-type]

    def sync() -> None:
        ops.append(("sync", 0))
        real_sync()

    def trunc(size: int) -> None:
        ops.append(("extend", size))
        real_trunc(size)

    f.pwritev_sync = write  # type: ignore[method-assign]
    f.fdatasync_sync = sync  # type: ignore[method-assign]
    f.truncate = trunc  # type: ignore[method-assign]
    h = img.header
    l1 = (h.l1_table_offset, h.l1_table_offset + h.l1_size * 8)

    async def go() -> None:
        await img.pwritev(600 * MiB + 4096, [b"\x01" * 4096])  # second table
        assert img.try_pwritev(600 * MiB + 3 * 64 * KiB, [b"\x02" * 4096], False)
        await img.pwritev(5 * MiB, [b"\x03" * 4096])  # first table
        assert img.try_pwritev(7 * MiB, [b"\x04" * 512], False)
        tables = sorted(img.l1[i] & L2E_OFFSET_MASK for i in (0, 1))
        assert all(tables)
        # Only guest data so far (the locked path's first write into each
        # table goes through pwritev_sync, the inline ones straight to
        # os.pwritev): no sync, no table, no L1 entry.
        assert all(k == "write" and o not in tables and not l1[0] <= o < l1[1] for k, o in ops)
        ops.clear()
        await img.flush()
        kinds = [k for k, _ in ops]
        first_table = min(i for i, (k, o) in enumerate(ops) if k == "write" and o in tables)
        l1_writes = [i for i, (k, o) in enumerate(ops) if k == "write" and l1[0] <= o < l1[1]]
        assert len(l1_writes) == 2
        # Extension and refcounts, then a sync, before any table write.
        assert "extend" in kinds[:first_table] and "sync" in kinds[:first_table]
        assert kinds.index("sync") > kinds.index("extend")
        # Every table write is followed by a sync before the first L1 write.
        last_table = max(i for i, (k, o) in enumerate(ops) if k == "write" and o in tables)
        assert "sync" in kinds[last_table : l1_writes[0]]
        assert kinds[-1] == "sync" and l1_writes[-1] < len(kinds) - 1
        await img.aclose()

    asyncio.run(go())
    clean(path)
    r = subprocess.run([tools.require("qemu-io"), "-c", "read -P 1 629149696 4096",
                        "-c", "read -P 2 629342208 4096", "-c", "read -P 3 5242880 4096",
                        "-c", "read -P 4 7340032 512", str(path)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


def test_in_place_fitness_is_asked_again_after_a_count_change(tmp_path: Path) -> None:
    """The inline path remembers clusters fit for an in-place write
    (``Refcounts.plain``: count 1, not metadata); a change of the count
    forgets the cluster, so a cluster shared since (count 2) declines, and
    moved metadata forgets them all."""
    path = make(tmp_path)
    img = open_image(path, read_only=False)
    eng = img.engine
    assert eng is not None
    rc = eng.meta.rc
    data = b"\x01" * 4096

    async def go() -> None:
        await img.pwritev(0, [data])
        assert img.try_pwritev(4096, [data], False)
        entries = img.l2_cache.peek(img.l1[0] & L2E_OFFSET_MASK)
        assert entries is not None
        host = entries[0] & L2E_OFFSET_MASK
        assert host in rc.plain
        rc.update(host >> img.geo.cluster_bits, 1)  # shared now (as with a snapshot)
        assert host not in rc.plain
        _declines(img, 8192, data)
        rc.update(host >> img.geo.cluster_bits, -1)
        assert img.try_pwritev(8192, [data], False)
        assert host in rc.plain
        eng.meta.write_header(img.header)
        assert not rc.plain
        assert img.try_pwritev(12288, [data], False)
        # Two clusters in one write: each is remembered, and a count change
        # of the second one makes the whole write decline.
        await img.pwritev(64 * KiB, [data])
        host1 = entries[1] & L2E_OFFSET_MASK
        assert host1 == host + 64 * KiB  # one host run: the inline path may take it
        span = b"\x01" * 8192
        assert img.try_pwritev(60 * KiB, [span], False)
        assert {host, host1} <= rc.plain
        rc.update(host1 >> img.geo.cluster_bits, 1)
        _declines(img, 60 * KiB, span)
        rc.update(host1 >> img.geo.cluster_bits, -1)
        assert img.try_pwritev(60 * KiB, [span], False)
        await img.aclose()

    asyncio.run(go())
    clean(path)
    r = subprocess.run([tools.require("qemu-io"), "-c", "read -P 1 0 16k", "-c",
                        "read -P 1 60k 8k", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


def test_read_entry_checks_of_the_fused_mask(tmp_path: Path) -> None:
    """try_preadv tests an L2 entry with one mask (issue 6): every entry
    that is not a plain, aligned standard cluster still declines, a plain
    one is served, and a read across two clusters that follow each other
    on the host is served in one piece while one across clusters that do
    not is declined."""
    from nbdqcow.qcow2.layout import OFLAG_COMPRESSED, OFLAG_ZERO

    img_path = make(tmp_path)
    subprocess.run([tools.require("qemu-io"), "-c", "write -P 7 0 512K", str(img_path)],
                   check=True, capture_output=True)  # fmt: skip
    img = open_image(img_path)
    try:
        warm(img)
        view = memoryview(bytearray(4096))
        assert img.try_preadv(3 * 64 * KiB, [view]) and bytes(view) == b"\x07" * 4096
        l2 = img.l1[0] & L2E_OFFSET_MASK
        entries = img.l2_cache.peek(l2)
        assert entries is not None
        plain = entries[3]
        host = plain & L2E_OFFSET_MASK
        assert host and not plain & ~(L2E_OFFSET_MASK | OFLAG_COPIED)
        bad = [
            plain | OFLAG_ZERO,            # zero flag
            plain | OFLAG_COMPRESSED,      # compressed
            plain | 1 << 56,               # a reserved bit above the offset
            plain | 4096,                  # host offset inside a cluster
            plain & ~L2E_OFFSET_MASK,      # COPIED without an offset
        ]  # fmt: skip
        for e in bad:
            entries[3] = e
            assert not img.try_preadv(3 * 64 * KiB, [view]), hex(e)
        entries[3] = plain
        # Two clusters: served when the second continues the first on the
        # host, declined when it does not.
        two = memoryview(bytearray(8192))
        assert entries[4] == plain + 64 * KiB
        assert img.try_preadv(4 * 64 * KiB - 4096, [two])
        assert bytes(two) == b"\x07" * 8192
        entries[4] = entries[5]
        assert not img.try_preadv(4 * 64 * KiB - 4096, [two])
        entries[4] = plain + 64 * KiB
        # Unallocated clusters read as zeroes; a read that mixes them with
        # allocated ones declines, whichever comes first.
        assert img.try_preadv(MiB, [view]) and bytes(view) == bytes(4096)
        assert not img.try_preadv(8 * 64 * KiB - 4096, [two])  # allocated, then not
        saved, entries[2] = entries[2], 0
        assert not img.try_preadv(3 * 64 * KiB - 4096, [two])  # not, then allocated
        entries[2] = saved
    finally:
        asyncio.run(img.aclose())

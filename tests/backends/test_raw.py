"""RawBackend against a real file and a bytearray model."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdqcow.backends.base import BlockBackend, ExtentFlag
from nbdqcow.backends.raw import RawBackend

SIZE = 1024 * 1024


def _make(tmp_path: Path, data: bytes | None = None) -> Path:
    p = tmp_path / "disk.raw"
    with open(p, "wb") as f:
        if data is None:
            f.truncate(SIZE)
        else:
            f.write(data)
    return p


async def _read(b: RawBackend, off: int, n: int, pieces: int = 1) -> bytes:
    buf = bytearray(n)
    mv = memoryview(buf)
    cuts = sorted({0, n, *((n * i) // pieces for i in range(1, pieces))})
    await b.preadv(off, [mv[a:c] for a, c in itertools.pairwise(cuts)])
    return bytes(buf)


async def test_is_a_block_backend(tmp_path: Path) -> None:
    b = RawBackend(_make(tmp_path), read_only=True)
    assert isinstance(b, BlockBackend)
    assert b.size == SIZE
    assert b.caps.read_only and not b.caps.trim
    await b.aclose()


async def test_write_read_vectored(tmp_path: Path) -> None:
    b = RawBackend(_make(tmp_path), read_only=False)
    await b.pwritev(4095, [b"ab", memoryview(b"cdef"), bytearray(b"g")], fua=True)
    assert await _read(b, 4094, 9, pieces=3) == b"\0abcdefg\0"
    await b.flush()
    await b.aclose()
    assert Path(tmp_path / "disk.raw").read_bytes()[4095:4102] == b"abcdefg"


async def test_zero_trim_and_block_status(tmp_path: Path) -> None:
    p = _make(tmp_path, os.urandom(SIZE))
    b = RawBackend(p, read_only=False)
    await b.zero(65536, 65536, may_trim=True)
    await b.zero(262144, 4096, may_trim=False, fast=True)
    await b.trim(524288, 65536)
    assert await _read(b, 65536, 65536) == bytes(65536)
    assert await _read(b, 262144, 4096) == bytes(4096)
    ext = await b.block_status(0, SIZE)
    assert ext[0].offset == 0 and sum(e.length for e in ext) == SIZE
    holes = [(e.offset, e.length) for e in ext if e.flags & ExtentFlag.HOLE]
    assert (65536, 65536) in holes and (524288, 65536) in holes
    for e in ext:
        assert e.depth == 1
    await b.aclose()


async def test_short_file_reads_zero_past_eof(tmp_path: Path) -> None:
    p = _make(tmp_path, b"x" * 1000)
    b = RawBackend(p, read_only=True, size=8192)
    assert await _read(b, 990, 20, pieces=2) == b"x" * 10 + bytes(10)
    ext = await b.block_status(0, 8192)
    assert ext[-1].flags == ExtentFlag.HOLE | ExtentFlag.ZERO and ext[-1].end == 8192
    await b.aclose()


async def test_read_only_refuses_writes(tmp_path: Path) -> None:
    b = RawBackend(_make(tmp_path), read_only=True)
    with pytest.raises(OSError) as ei:
        await b.pwritev(0, [b"x"])
    assert ei.value.errno == errno.EBADF
    await b.aclose()


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["write", "zero", "trim"]),
            st.integers(0, 65535),
            st.integers(1, 9000),
        ),
        max_size=12,
    )
)
def test_model(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int]]) -> None:
    import asyncio

    size = 65536
    p = tmp_path_factory.mktemp("m") / "d.raw"
    p.write_bytes(bytes(size))
    model = bytearray(size)

    async def run() -> bytes:
        b = RawBackend(p, read_only=False)
        for i, (op, off, n) in enumerate(ops):
            n = min(n, size - off)
            if op == "write":
                data = bytes([(i * 7 + 1) & 255]) * n
                await b.pwritev(off, [data])
                model[off : off + n] = data
            elif op == "zero":
                await b.zero(off, n, may_trim=bool(i & 1))
                model[off : off + n] = bytes(n)
            else:
                # TRIM leaves contents unspecified; a hole punch reads zero on
                # Linux file systems, which is what the model expects.
                await b.trim(off, n)
                model[off : off + n] = bytes(n)
        out = await _read(b, 0, size, pieces=5)
        await b.aclose()
        return out

    assert asyncio.run(run()) == bytes(model)


async def test_inline_write_takes_every_buffer_kind(tmp_path: Path) -> None:
    """InlineIO writes: one memoryview, bytes, a non-byte view, several
    buffers; FUA declines (it needs a sync: the async path's job)."""
    from array import array

    b = RawBackend(_make(tmp_path), read_only=False)
    try:
        model = bytearray(SIZE)
        words = array("Q", range(1, 513))  # a 4 KiB view of format "Q"
        cases: list[tuple[int, list[bytes | memoryview]]] = [
            (0, [memoryview(bytearray(b"\x11" * 4096))]),
            (8192, [b"\x22" * 4096]),
            (16384, [memoryview(words)]),
            (65536, [b"\x33" * 512, memoryview(bytearray(b"\x44" * 3584))]),
        ]
        for off, bufs in cases:
            assert b.try_pwritev(off, bufs, False)
            data = b"".join(bytes(memoryview(x).cast("B")) for x in bufs)
            model[off:off + len(data)] = data
        assert not b.try_pwritev(0, [b"\x55" * 4096], True)
        assert await _read(b, 0, SIZE) == bytes(model)
    finally:
        await b.aclose()

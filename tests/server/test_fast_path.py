"""The fast data path (issue 6): requests run inline until they would wait
(:mod:`nbdqcow.eager`), replies of a batch leave together, buffers and slots
come back only after the send -- and none of it may reorder, interleave or
lose a reply."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.backends.raw import RawBackend
from nbdqcow.eager import start
from nbdqcow.server import open_image
from nbdqcow.session import SENDFILE_MIN
from nbdqcow.stream import FileSpan, PlainStream
from tests.server.conftest import SIZE, Running, pattern, serving
from tests.server.nbdclient import CMD_READ, CMD_WRITE, NbdClient
from tests.tools import require

# -- nbdqcow.eager ---------------------------------------------------------


async def test_eager_finishes_inline_without_a_task() -> None:
    seen: list[asyncio.Task[object] | None] = []

    async def quick() -> None:
        seen.append(asyncio.current_task())

    assert start(quick()) is None
    assert seen == [asyncio.current_task()]  # ran in the caller, at once


async def test_eager_resumes_where_it_stopped() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    steps: list[str] = []

    async def waits() -> None:
        steps.append("before")
        steps.append(f"got {await fut}")
        await asyncio.sleep(0)  # a bare yield is resumed too
        try:
            await asyncio.sleep(0.001)
            await failing
        except ValueError as e:
            steps.append(f"caught {e}")

    failing: asyncio.Future[None] = loop.create_future()
    failing.set_exception(ValueError("boom"))
    task = start(waits())
    assert task is not None and steps == ["before"]
    fut.set_result(7)
    await asyncio.wait_for(task, 5)
    assert steps == ["before", "got 7", "caught boom"]


@pytest.mark.parametrize("done_first", [False, True])
async def test_eager_task_cancellation_reaches_the_coroutine(done_first: bool) -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cleaned = asyncio.Event()

    async def waits() -> None:
        try:
            await fut
            await asyncio.sleep(10)
        finally:
            cleaned.set()

    task = start(waits())
    assert task is not None
    await asyncio.sleep(0)
    if done_first:
        fut.set_result(None)  # cancel lands on the throw() path, not the future
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()


# -- the server ------------------------------------------------------------


def _read_replies(data: bytes, lengths: dict[int, int]) -> dict[int, bytes]:
    """Split a byte stream of simple replies; a reply's payload length comes
    from its cookie, so one interleaved byte desynchronises everything."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        magic, err, cookie = struct.unpack_from(">IIQ", data, pos)
        assert magic == 0x67446698 and err == 0, (hex(magic), err, pos)
        pos += 16
        n = lengths[cookie]
        out[cookie] = data[pos:pos + n]
        pos += n
    return out


@pytest.mark.parametrize("seed", [1, 2])
async def test_pipelined_burst_mixing_inline_and_waiting_requests(
        running: Running, hook: list[object], seed: int) -> None:
    """300 requests in one burst, some made to wait (they become tasks),
    most answered inline: every reply once, intact, with the right data."""
    rng = random.Random(seed)
    img = bytearray(pattern())

    async def sometimes_slow(op: str, offset: int) -> None:
        if (offset // 4096) % 5 == 0:
            await asyncio.sleep(rng.random() * 0.005)

    hook[0] = sometimes_slow
    c = await NbdClient.connect(running.path)
    lengths: dict[int, int] = {}
    expected: dict[int, bytes] = {}
    burst = bytearray()
    for cookie in range(1, 301):
        length = rng.choice([512, 4096, 4096, 65536, 200_000])
        # writes go to the upper half, reads come from the lower half, so
        # the expected read data does not depend on reply order
        half = len(img) // 2
        offset = rng.randrange(0, (half - length) // 4096) * 4096
        if rng.random() < 0.2:
            payload = bytes([cookie & 0xFF]) * length
            burst += struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, cookie,
                                 half + offset, length) + payload
            lengths[cookie] = 0
            expected[cookie] = b""
        else:
            burst += struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, cookie, offset, length)
            lengths[cookie] = length
            expected[cookie] = bytes(img[offset:offset + length])
    c.send_raw(bytes(burst))
    total = sum(16 + n for n in lengths.values())
    data = await asyncio.wait_for(c.r.readexactly(total), 30)
    got = _read_replies(data, lengths)
    assert got.keys() == expected.keys()
    for cookie, want in expected.items():
        if lengths[cookie]:
            assert got[cookie] == want, cookie
    await c.disconnect()
    # every buffer and slot came back once the replies were out
    await asyncio.sleep(0.05)
    for session in running.server._conns.values():
        assert session.payload_bytes == 0


async def test_reads_in_page_cache_need_no_task(running: Running,
                                                hook: list[object]) -> None:
    """A burst of cached reads is served by the connection's own task: no
    task per request (the point of the inline path)."""
    tasks: set[asyncio.Task[object] | None] = set()

    def note(op: str, offset: int) -> None:
        tasks.add(asyncio.current_task())

    hook[0] = note
    c = await NbdClient.connect(running.path)
    await c.pread(0, 4096)  # warm
    for i in range(32):
        c.request(CMD_READ, i * 4096, 4096)
    for _ in range(32):
        cookie, err, data = await c.reply(4096)
        assert err == 0 and data == pattern()[(cookie - 2) * 4096:(cookie - 1) * 4096]
    assert len(tasks) == 1
    await c.disconnect()


async def test_more_requests_than_slots_do_not_deadlock(running: Running) -> None:
    """Answered requests hold their slot until their reply is sent; the reader
    must send before it waits for a slot, or 17+ pipelined reads would hang."""
    c = await NbdClient.connect(running.path)
    n = 200
    for i in range(n):
        c.request(CMD_READ, (i % 64) * 4096, 4096)
    for _ in range(n):
        cookie, err, data = await asyncio.wait_for(c.reply(4096), 10)
        i = cookie - 1
        assert err == 0 and data == pattern()[(i % 64) * 4096:(i % 64 + 1) * 4096]
    await c.disconnect()


# -- sendfile replies (raw images in the clear) ------------------------------


@pytest.fixture
async def raw_server(tmp_path: Path, image: Path) -> AsyncIterator[Running]:
    """A plain RawBackend (no test wrapper), so reads may use sendfile."""
    async with serving(RawBackend(image, read_only=False), tmp_path / "raw.sock") as running:
        yield running


async def test_sendfile_and_copying_paths_give_the_same_bytes(raw_server: Running,
                                                              image: Path) -> None:
    """Big reads (sendfile) and the same ranges read in 4 KiB pieces
    (preadv + sendmsg) match the file, pipelined and mixed on one stream."""
    data = image.read_bytes()
    c = await NbdClient.connect(raw_server.path)
    plan: list[tuple[int, int, int]] = []  # (cookie, offset, length)
    rng = random.Random(3)
    for _ in range(40):
        length = rng.choice([SENDFILE_MIN, 100_000, 1 << 20])
        offset = rng.randrange(0, len(data) - length)
        plan.append((c.request(CMD_READ, offset, length), offset, length))
        for k in range(0, min(length, 16384), 4096):  # copying path, same range
            plan.append((c.request(CMD_READ, offset + k, 4096), offset + k, 4096))
    by_cookie = {ck: (o, n) for ck, o, n in plan}
    lengths = {ck: n for ck, (_, n) in by_cookie.items()}
    total = sum(16 + n for n in lengths.values())
    got = _read_replies(await asyncio.wait_for(c.r.readexactly(total), 30), lengths)
    for ck, (o, n) in by_cookie.items():
        assert got[ck] == data[o:o + n], (ck, o, n)
    await c.disconnect()


async def test_sendfile_used_for_big_raw_reads(raw_server: Running, image: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.sendfile

    def counting(out: int, fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out, fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    c = await NbdClient.connect(raw_server.path)
    assert await c.pread(0, 4096) == pattern()[:4096]
    assert not calls  # small reads: batched copies
    assert await c.pread(65536, 1 << 20) == pattern()[65536:65536 + (1 << 20)]
    assert calls and calls[0] == 1 << 20
    await c.disconnect()


async def test_sendfile_pads_a_file_that_shrank(tmp_path: Path) -> None:
    """A raw file truncated under the server: what is gone reads as zeroes,
    and the stream stays in sync (the pad goes out in place of the bytes)."""
    f = tmp_path / "short"
    f.write_bytes(b"\xab" * 4000)
    a, b = socket.socketpair()
    fd = os.open(f, os.O_RDONLY)
    try:
        stream = PlainStream(a)
        pad = memoryview(bytes(10000))
        pending = stream.send_start([b"HDR", FileSpan(fd, 0, 10000, pad), b"END"])
        if pending is not None:
            await pending
        b.settimeout(5)
        got = b""
        while len(got) < 10006:
            got += b.recv(65536)
        assert got == b"HDR" + b"\xab" * 4000 + bytes(6000) + b"END"
    finally:
        os.close(fd)
        stream.close()
        b.close()


async def test_nbdcopy_reads_a_raw_image_exactly(raw_server: Running, image: Path,
                                                 tmp_path: Path) -> None:
    """libnbd (structured replies, many requests in flight, 4 connections)
    against the sendfile path."""
    nbdcopy = require("nbdcopy")
    out = tmp_path / "copy.raw"
    for conns in ("1", "4"):
        proc = await asyncio.create_subprocess_exec(
            nbdcopy, f"-C{conns}", "--request-size=262144", "--no-extents",
            f"nbd+unix:///disk?socket={raw_server.path}", str(out),
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert out.read_bytes() == image.read_bytes()


async def test_sendfile_from_a_read_only_qcow2(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Data clusters of a read-only qcow2 go out with sendfile from their host
    offsets; holes, compressed clusters and ranges spanning them take the
    copying path; every byte matches qemu-img's own reading."""
    qemu_img, qemu_io = require("qemu-img"), require("qemu-io")
    img, raw = tmp_path / "d.qcow2", tmp_path / "d.raw"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    for cmd in ("write -P 0x11 0 1M", "write -P 0x22 1536k 1M", "write -c -P 0x33 3M 64k"):
        subprocess.run([qemu_io, "-f", "qcow2", "-c", cmd, str(img)], check=True,
                       capture_output=True)
    subprocess.run([qemu_img, "convert", "-O", "raw", str(img), str(raw)], check=True)
    want = raw.read_bytes()
    calls: list[int] = []
    real = os.sendfile

    def counting(out: int, fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out, fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    async with serving(await open_image(str(img), read_only=True), tmp_path / "q.sock") as served:
        path = served.path
        c = await NbdClient.connect(path)
        for off, n in ((0, 65536), (0, 1 << 20), (512 * 1024, 1 << 20), (1 << 20, 1 << 20),
                       (3 << 20, 65536), (2 << 20, 2 << 20)):
            c.request(CMD_READ, off, n)  # warm the page cache
            await c.reply(n)
            assert await c.pread(off, n) == want[off:off + n], (off, n)
        assert calls  # the all-data ranges went out with sendfile
        await c.disconnect()


_request = st.tuples(
    st.sampled_from(["read", "read", "read", "write"]),
    st.integers(0, (SIZE // 2 - 1) // 512),  # offset in 512-byte units
    st.sampled_from([512, 4096, 8192, 65535, 65536, 65537, 200_000, 1 << 20]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_request, min_size=1, max_size=120))
def test_pipelined_mix_property(image: Path, tmp_path: Path,
                                plan: list[tuple[str, int, int]]) -> None:
    """Any pipelined mix of reads (sendfile and copying paths) and writes on a
    raw image: each reply once, in one piece, with the file's bytes (writes
    go to the upper half, reads come from the lower half)."""
    image.write_bytes(pattern())
    data = pattern()
    half = SIZE // 2

    async def run() -> None:
        async with serving(RawBackend(image, read_only=False), tmp_path / "p.sock") as served:
            path = served.path
            c = await NbdClient.connect(path)
            lengths: dict[int, int] = {}
            want: dict[int, bytes] = {}
            burst = bytearray()
            for cookie, (op, unit, length) in enumerate(plan, 1):
                offset = min(unit * 512, half - length)
                if op == "write":
                    burst += struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, cookie,
                                         half + offset, length) + bytes([cookie & 0xFF]) * length
                    lengths[cookie] = 0
                else:
                    burst += struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, cookie, offset,
                                         length)
                    lengths[cookie] = length
                    want[cookie] = data[offset:offset + length]
            c.send_raw(bytes(burst))
            total = sum(16 + n for n in lengths.values())
            got = _read_replies(await asyncio.wait_for(c.r.readexactly(total), 30), lengths)
            assert got.keys() == lengths.keys()
            for cookie, w in want.items():
                assert got[cookie] == w, cookie
            await c.disconnect()

    asyncio.run(run())

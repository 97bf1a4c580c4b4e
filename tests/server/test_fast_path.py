"""The fast data path (issue 6): requests run inline until they would wait
(:mod:`nbdqcow.eager`), replies of a batch leave together, buffers and slots
come back only after the send -- and none of it may reorder, interleave or
lose a reply."""

from __future__ import annotations

import asyncio
import random
import struct

import pytest

from nbdqcow.eager import start
from tests.server.conftest import Running, pattern
from tests.server.nbdclient import CMD_READ, CMD_WRITE, NbdClient

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

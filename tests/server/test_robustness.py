"""Misbehaving clients are dropped; everybody else and the image are fine.

Each test sends something broken on one raw connection, then checks that a
well-behaved client on another connection is still served and that the image
file holds exactly what it held (nothing half-written).
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from nbdqcow.server import ServerOptions
from tests.server.conftest import Running, pattern
from tests.server.nbdclient import (
    CMD_READ,
    CMD_WRITE,
    IHAVEOPT,
    OPT_GO,
    REQUEST_MAGIC,
    NbdClient,
)


async def still_serving(r: Running) -> None:
    c = await NbdClient.connect(r.path)
    assert await c.pread(8192, 4096) == pattern()[8192:12288]
    await c.disconnect()


def unharmed(image: Path) -> None:
    assert image.read_bytes() == pattern()


async def test_garbage_instead_of_client_flags(running: Running, image: Path) -> None:
    c = await NbdClient.open(running.path)
    await c.greeting()
    c.send_raw(b"\xff" * 64)  # unknown client flags, then noise
    assert await c.closed_by_server()
    await still_serving(running)
    unharmed(image)


async def test_garbage_in_transmission(running: Running, image: Path) -> None:
    c = await NbdClient.connect(running.path)
    c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(100))
    assert await c.closed_by_server()
    await still_serving(running)
    unharmed(image)


async def test_truncated_request_header_then_eof(running: Running, image: Path) -> None:
    c = await NbdClient.connect(running.path)
    c.send_raw(struct.pack(">IHH", REQUEST_MAGIC, 0, CMD_READ))
    await c.close()
    await still_serving(running)
    unharmed(image)


async def test_truncated_option(running: Running, image: Path) -> None:
    c = await NbdClient.open(running.path)
    await c.start()
    c.send_raw(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"\0\0")
    await c.close()
    await still_serving(running)
    unharmed(image)


@pytest.mark.parametrize("options", [ServerOptions(handshake_timeout=1)], ids=["1s"],
                         indirect=True)
async def test_absurd_option_length(running: Running, image: Path) -> None:
    c = await NbdClient.open(running.path)
    await c.start()
    c.send_raw(struct.pack(">QII", IHAVEOPT, OPT_GO, 0xFFFFFFFF))
    # The core either hangs up at once or streams the 4 GiB away to answer
    # it (as qemu-nbd does); the data never comes, so the handshake timeout
    # ends it.  Either way it is bounded and harms nobody.
    await still_serving(running)
    assert await c.closed_by_server(timeout=5)
    await still_serving(running)
    unharmed(image)


async def test_absurd_write_length(running: Running, image: Path) -> None:
    c = await NbdClient.connect(running.path)
    c.request(CMD_WRITE, 0, 0xFFFFFFFF, payload=b"\xee" * 4096)
    # Either dropped at once (too big to drain) or answered with an error:
    # never written.
    closed = await c.closed_by_server(timeout=2)
    if not closed:
        await c.close()
    await still_serving(running)
    unharmed(image)


async def test_write_past_end_is_an_error_and_stream_stays_in_sync(
        running: Running, image: Path) -> None:
    c = await NbdClient.connect(running.path)
    err = await c.pwrite(c.size - 512, b"\xee" * 4096)
    assert err in (22, 28)  # EINVAL or ENOSPC
    # the payload was drained: the next request is understood
    assert await c.pread(0, 4096) == pattern()[:4096]
    await c.disconnect()
    unharmed(image)


async def test_disconnect_mid_write_payload(running: Running, image: Path) -> None:
    c = await NbdClient.connect(running.path)
    c.request(CMD_WRITE, 65536, 65536, payload=b"\xee" * 1000)
    await asyncio.sleep(0.05)
    await c.close()
    await still_serving(running)
    await asyncio.sleep(0.05)
    unharmed(image)


SHORT = pytest.mark.parametrize(
    "options", [ServerOptions(handshake_timeout=0.5, payload_timeout=0.5)], ids=["short"],
    indirect=True)


@SHORT
async def test_payload_that_never_arrives(running: Running, image: Path) -> None:
    stalled = await NbdClient.connect(running.path)
    stalled.request(CMD_WRITE, 65536, 65536, payload=b"\xee" * 1000)
    # the stalled connection does not hold up anybody else
    for _ in range(3):
        await still_serving(running)
    # and is cut after payload_timeout, its partial payload never written
    assert await stalled.closed_by_server(timeout=5)
    unharmed(image)


@SHORT
async def test_handshake_timeout(running: Running, image: Path) -> None:
    silent = await NbdClient.open(running.path)
    await silent.greeting()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await silent.closed_by_server(timeout=5)
    assert loop.time() - t0 < 3
    # a client that completed its handshake is not subject to it
    c = await NbdClient.connect(running.path)
    await asyncio.sleep(0.8)
    assert await c.pread(0, 512) == pattern()[:512]
    await c.disconnect()


async def test_many_connections(running: Running, image: Path) -> None:
    async def one(i: int) -> None:
        c = await NbdClient.connect(running.path)
        off = (i * 4096 * 7) % (len(pattern()) - 8192)
        for _ in range(5):
            assert await c.pread(off, 8192) == pattern()[off:off + 8192]
        await c.disconnect()

    await asyncio.gather(*(one(i) for i in range(60)))
    unharmed(image)


async def test_slow_request_on_one_connection_does_not_stall_others(
        running: Running, hook: list[object]) -> None:
    gate = asyncio.Event()

    async def block_offset_zero(op: str, offset: int) -> None:
        if op == "read" and offset == 0:
            await gate.wait()

    hook[0] = block_offset_zero
    stuck = await NbdClient.connect(running.path)
    stuck.request(CMD_READ, 0, 4096)
    await asyncio.wait_for(still_serving(running), 5)
    gate.set()
    assert (await stuck.reply(4096))[1] == 0
    await stuck.disconnect()


async def test_client_vanishes_with_large_reads_in_flight(running: Running,
                                                          image: Path) -> None:
    c = await NbdClient.connect(running.path)
    for i in range(32):
        c.request(CMD_READ, (i % 4) * 1048576, 1048576)
    await c.w.drain()
    await c.close()
    await asyncio.sleep(0.2)
    await still_serving(running)
    unharmed(image)


@pytest.mark.parametrize(
    "options", [ServerOptions(shutdown_timeout=0.5)], ids=["short-shutdown"], indirect=True)
async def test_client_that_stops_reading_cannot_block_shutdown(
        running: Running, image: Path) -> None:
    c = await NbdClient.connect(running.path)
    for i in range(64):  # ~64 MiB of replies nobody reads
        c.request(CMD_READ, (i % 4) * 1048576, 1048576)
    await c.w.drain()
    await asyncio.sleep(0.3)
    await still_serving(running)  # others are served meanwhile
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    running.server.close()
    await asyncio.wait_for(running.server.shutdown(), 10)
    assert loop.time() - t0 < 5
    c.w.close()
    unharmed(image)


@pytest.mark.parametrize("options", [ServerOptions(max_connections=2)], ids=["two"],
                         indirect=True)
async def test_connection_limit(running: Running) -> None:
    a = await NbdClient.connect(running.path)
    b = await NbdClient.connect(running.path)
    extra = await NbdClient.open(running.path)
    assert await extra.closed_by_server()  # refused at once, no greeting
    await a.disconnect()
    await asyncio.sleep(0.1)
    await still_serving(running)  # a slot is free again
    await b.disconnect()


@pytest.fixture
def options(request: pytest.FixtureRequest, tmp_path: Path) -> ServerOptions:
    """Server options; tests pick others with ``indirect`` parametrization:
    a ServerOptions, or "tls" for optional TLS with a throwaway CA."""
    param = getattr(request, "param", None)
    if param == "tls":
        from nbdqcow.nbd import TlsMode
        from nbdqcow.tls import TlsConfig
        from tests.interop.certs import make_ca

        certs = make_ca(tmp_path / "ca")
        return ServerOptions(tls=TlsConfig.from_dir(certs, mode=TlsMode.OPTIONAL),
                             handshake_timeout=2)
    if isinstance(param, ServerOptions):
        return param
    return ServerOptions(handshake_timeout=5, shutdown_timeout=5)


@pytest.mark.parametrize("options", ["tls"], ids=["tls"], indirect=True)
@pytest.mark.parametrize("after", [b"", b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.0\r\n\r\n"],
                         ids=["silence", "broken-hello", "not-tls"])
async def test_starttls_then_garbage(running: Running, image: Path, after: bytes,
                                     caplog: pytest.LogCaptureFixture) -> None:
    import logging

    c = await NbdClient.open(running.path)
    await c.start()
    c.send_option(5)  # NBD_OPT_STARTTLS
    rep = await c.option_reply()
    assert rep.type == 1  # ACK: the TLS handshake is due
    c.send_raw(after)
    with caplog.at_level(logging.INFO, logger="nbdqcow"):
        assert await c.closed_by_server(timeout=5)
        await still_serving(running)
    assert not [r for r in caplog.records if r.exc_info]
    assert any("TLS handshake failed" in r.getMessage() or "timed out" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    unharmed(image)


@pytest.mark.parametrize(
    "options", [ServerOptions(max_in_flight_bytes=2 * 1048576)], ids=["2MiB"], indirect=True)
async def test_payload_bytes_in_flight_are_bounded(running: Running,
                                                   hook: list[object]) -> None:
    peak = 0

    async def watch(op: str, offset: int) -> None:
        nonlocal peak
        (session,) = running.server._conns.values()
        peak = max(peak, session.payload_bytes)
        await asyncio.sleep(0.01)

    hook[0] = watch
    c = await NbdClient.connect(running.path)
    for i in range(12):
        c.request(CMD_READ, (i % 4) * 1048576, 1048576)
    for _ in range(12):
        assert (await c.reply(1048576))[1] == 0
    assert 1048576 <= peak <= 2 * 1048576
    await c.disconnect()

"""The callback-driven transmission pump (:mod:`nbdqcow.pump`): inline I/O
through the backend's ``InlineIO`` methods, the async path when they
decline, and back-pressure that pauses and resumes the reader."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from nbdqcow.backends.base import Buffer, InlineIO
from nbdqcow.backends.raw import RawBackend
from nbdqcow.server import ServerOptions
from tests.server.conftest import Running, pattern, serving
from tests.server.nbdclient import CMD_FLUSH, CMD_READ, CMD_WRITE, NbdClient

FLAG_FUA = 1


class Counting(RawBackend):
    """A real raw backend that counts what its inline methods did."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, read_only=False)
        self.inline: dict[str, int] = {"read": 0, "write": 0, "declined": 0}
        self.decline_reads = False

    def try_preadv(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        if self.decline_reads:
            self.inline["declined"] += 1
            return False
        done = super().try_preadv(offset, bufs)
        self.inline["read" if done else "declined"] += 1
        return done

    def try_pwritev(self, offset: int, bufs: Sequence[Buffer], fua: bool) -> bool:
        done = super().try_pwritev(offset, bufs, fua)
        self.inline["write" if done else "declined"] += 1
        return done


@pytest.fixture
async def counting(tmp_path: Path, image: Path) -> AsyncIterator[tuple[Running, Counting]]:
    backend = Counting(image)
    assert isinstance(backend, InlineIO)
    options = ServerOptions(handshake_timeout=5, shutdown_timeout=5, max_in_flight=4)
    async with serving(backend, tmp_path / "pump.sock", options) as running:
        yield running, backend


async def test_small_reads_and_writes_are_served_inline(
        counting: tuple[Running, Counting], image: Path) -> None:
    running, backend = counting
    c = await NbdClient.connect(running.path)
    await c.pread(0, 4096)  # page cache warm
    for i in range(40):  # 10x max_in_flight, pipelined: pauses and resumes
        c.request(CMD_READ, i * 4096, 4096)
    for _ in range(40):
        cookie, err, data = await asyncio.wait_for(c.reply(4096), 10)
        i = cookie - 2
        assert err == 0 and data == pattern()[i * 4096:(i + 1) * 4096]
    assert backend.inline["read"] >= 40
    assert await c.pwrite(8192, b"\xab" * 4096) == 0
    assert backend.inline["write"] == 1
    assert await c.pread(8192, 4096) == b"\xab" * 4096
    await c.disconnect()
    assert image.read_bytes()[8192:12288] == b"\xab" * 4096


async def test_declined_requests_take_the_async_path(
        counting: tuple[Running, Counting], image: Path) -> None:
    """FUA writes are declined (they need a sync); declined reads still get
    the right bytes."""
    running, backend = counting
    c = await NbdClient.connect(running.path)
    assert await c.pwrite(4096, b"\x11" * 4096, flags=FLAG_FUA) == 0
    assert backend.inline["write"] == 0 and backend.inline["declined"] == 1
    backend.decline_reads = True
    assert await c.pread(4096, 4096) == b"\x11" * 4096
    assert backend.inline["read"] == 0 and backend.inline["declined"] == 2
    c.request(CMD_FLUSH)
    assert (await c.reply())[1] == 0
    await c.disconnect()
    assert image.read_bytes()[4096:8192] == b"\x11" * 4096


@pytest.mark.parametrize("options", [ServerOptions(handshake_timeout=5, shutdown_timeout=5,
                                                 max_in_flight=2)], ids=["2"], indirect=True)
async def test_back_pressure_bounds_requests_in_flight(running: Running,
                                                       hook: list[object]) -> None:
    """With max_in_flight 2 and slow reads, a burst of 60 pipelined requests
    never has more than 2 running; every reply arrives with its data."""
    now = peak = 0

    async def slow(op: str, offset: int) -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.002)
        now -= 1

    c = await NbdClient.connect(running.path)
    hook[0] = slow
    burst = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, i, (i % 16) * 4096, 4096)
                     for i in range(1, 61))
    c.send_raw(burst)
    for _ in range(60):
        cookie, err, data = await asyncio.wait_for(c.reply(4096), 10)
        i = cookie % 16
        assert err == 0 and data == pattern()[i * 4096:(i + 1) * 4096]
    assert 1 <= peak <= 2
    await c.disconnect()


async def test_write_payload_split_across_many_receives(counting: tuple[Running, Counting],
                                                        image: Path) -> None:
    """A WRITE whose payload trickles in (one pump call per piece) is
    written once, complete."""
    running, _ = counting
    c = await NbdClient.connect(running.path)
    payload = os.urandom(65536)
    c.send_raw(struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 7, 65536, len(payload)))
    for i in range(0, len(payload), 8192):
        c.send_raw(payload[i:i + 8192])
        await c.w.drain()
        await asyncio.sleep(0.005)
    cookie, err, _ = await asyncio.wait_for(c.reply(), 10)
    assert (cookie, err) == (7, 0)
    await c.disconnect()
    assert image.read_bytes()[65536:131072] == payload


@pytest.mark.parametrize("options", [ServerOptions(handshake_timeout=5, payload_timeout=0.5)],
                         ids=["short"], indirect=True)
async def test_payload_stalled_behind_complete_writes(running: Running, image: Path) -> None:
    """Two complete WRITEs and the start of a third arrive together, then
    the client stalls: the two are answered, and the third's payload is
    still timed (the pump parses requests in batches: answering the
    complete ones must not forget that a payload is half received)."""
    c = await NbdClient.connect(running.path)
    head = ">IHHQQI"
    c.send_raw(struct.pack(head, 0x25609513, 0, CMD_WRITE, 1, 0, 4096) + b"\x01" * 4096
               + struct.pack(head, 0x25609513, 0, CMD_WRITE, 2, 4096, 4096) + b"\x02" * 4096
               + struct.pack(head, 0x25609513, 0, CMD_WRITE, 3, 8192, 4096) + b"\x03" * 100)
    for _ in range(2):
        cookie, err, _ = await asyncio.wait_for(c.reply(), 10)
        assert err == 0 and cookie in (1, 2)
    assert await c.closed_by_server(timeout=5)
    assert image.read_bytes()[:8192] == b"\x01" * 4096 + b"\x02" * 4096


async def test_byte_budget_holds_inline_requests(tmp_path: Path, image: Path) -> None:
    """With room for four 4 KiB payloads, a burst of inline READs and
    WRITEs sent at once (parsed in batches) is answered in full with the
    right data, and the payload bytes held never pass the bound: requests
    beyond it wait, held with the rest of their batch, until replies
    leave."""
    seen: list[int] = []

    class Watching(Counting):
        def try_preadv(self, offset: int, bufs: Sequence[memoryview]) -> bool:
            (session,) = running.server._conns.values()
            seen.append(session.payload_bytes)
            return super().try_preadv(offset, bufs)

    backend = Watching(image)
    options = ServerOptions(handshake_timeout=5, shutdown_timeout=5,
                            max_in_flight_bytes=4 * 4096)
    async with serving(backend, tmp_path / "budget.sock", options) as running:
        c = await NbdClient.connect(running.path)
        await c.pread(0, 4096)  # page cache warm
        reads = {}
        burst = b""  # one send: the server parses it as one batch
        # READs first (each holds 4 KiB until sent), then WRITEs.
        for i in sorted(range(60), key=lambda i: i % 3 == 2):
            cookie = 100 + i
            if i % 3 == 2:
                burst += struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, cookie,
                                     1 << 20 | i * 4096, 4096) + bytes([i]) * 4096
            else:
                burst += struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, cookie, i * 4096, 4096)
                reads[cookie] = i
        c.send_raw(burst)
        for _ in range(60):  # writes have no payload: read by cookie
            magic, err, cookie = struct.unpack(">IIQ", await asyncio.wait_for(
                c.r.readexactly(16), 10))
            assert (magic, err) == (0x67446698, 0)
            if cookie in reads:
                i = reads.pop(cookie)
                assert await c.r.readexactly(4096) == pattern()[i * 4096:(i + 1) * 4096]
        assert not reads
        await c.disconnect()
    assert backend.inline["read"] >= 40 and backend.inline["write"] == 20
    assert seen and max(seen) <= 3 * 4096  # before the read's own 4 KiB
    disk = image.read_bytes()
    for i in range(2, 60, 3):
        assert disk[(1 << 20) + i * 4096:(1 << 20) + (i + 1) * 4096] == bytes([i]) * 4096


async def test_polls_only_when_alone(tmp_path: Path, image: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Busy polling for the next request (nbdqcow.poll) runs only while a
    single client is connected: with two, a spin on one would delay the
    other."""
    from nbdqcow.poll import AdaptivePoll

    waits = 0
    real_wait = AdaptivePoll.wait

    def counting_wait(self: AdaptivePoll, sock: object, probe: bytearray) -> bool:
        nonlocal waits
        waits += 1
        return real_wait(self, sock, probe)  # type: ignore[arg-type]

    monkeypatch.setattr(AdaptivePoll, "wait", counting_wait)
    backend = Counting(image)
    options = ServerOptions(handshake_timeout=5, shutdown_timeout=5)
    async with serving(backend, tmp_path / "poll.sock", options) as running:
        a = await NbdClient.connect(running.path)
        for i in range(5):
            assert await a.pread(i * 4096, 4096) == pattern()[i * 4096:(i + 1) * 4096]
        assert waits >= 5  # alone: after each reply
        b = await NbdClient.connect(running.path)
        waits = 0
        for i in range(5):
            assert await a.pread(i * 4096, 4096) == pattern()[i * 4096:(i + 1) * 4096]
            assert await b.pread(i * 4096, 4096) == pattern()[i * 4096:(i + 1) * 4096]
        assert waits == 0
        await a.disconnect()
        await b.disconnect()


async def test_payload_started_on_resume_is_timed(tmp_path: Path, image: Path) -> None:
    """max_in_flight 1: READ 1 is served, READ 2 is held (the pump pauses),
    and the resume serves it and starts WRITE 3 from the buffered bytes.
    The client then stalls mid-payload: the payload timeout must still drop
    it (review finding: the timer was armed only by the readable callback,
    which a stalled client never triggers again)."""
    backend = Counting(image)
    options = ServerOptions(handshake_timeout=5, shutdown_timeout=5, max_in_flight=1,
                            payload_timeout=0.5)
    head = ">IHHQQI"
    magic = 0x25609513
    async with serving(backend, tmp_path / "r.sock", options) as running:
        c = await NbdClient.connect(running.path)
        await c.pread(0, 4096)  # page cache warm
        c.send_raw(struct.pack(head, magic, 0, CMD_READ, 1, 0, 4096)
                   + struct.pack(head, magic, 0, CMD_READ, 2, 4096, 4096)
                   + struct.pack(head, magic, 0, CMD_WRITE, 3, 8192, 4096) + b"\x03" * 100)
        for _ in range(2):
            cookie, err, _ = await asyncio.wait_for(c.reply(4096), 5)
            assert err == 0 and cookie in (1, 2)
        (session,) = running.server._conns.values()
        assert session.payload_pending
        assert await c.closed_by_server(timeout=5)
        assert not running.server._conns


async def test_polling_gives_the_loop_back(tmp_path: Path, image: Path) -> None:
    """A client that always answers within the poll window (fio at queue
    depth 1, with a 1 ms window) must not keep the event loop from its
    timers: one pump call polls for at most about a millisecond (review
    finding: unbounded, one call ran for 347 ms under fio)."""
    from tests.tools import require

    fio = require("fio")
    backend = Counting(image)
    options = ServerOptions(handshake_timeout=5, shutdown_timeout=5, poll_max_us=1000)
    sock = tmp_path / "p.sock"
    async with serving(backend, sock, options):
        proc = await asyncio.create_subprocess_exec(
            fio, "--name=poll", "--ioengine=nbd", f"--uri=nbd+unix:///disk?socket={sock}",
            "--rw=randread", "--bs=4k", "--iodepth=1", "--size=1M", "--time_based",
            "--runtime=2s", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        loop = asyncio.get_running_loop()
        late = 0.0
        while proc.returncode is None:
            due = loop.time() + 0.005
            await asyncio.sleep(0.005)
            late = max(late, loop.time() - due)
        out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert backend.inline["read"] > 1000  # fio kept the connection busy
    assert late < 0.25, f"the event loop was held for {late * 1000:.0f} ms"


#: A READ past the end of any test image: refused, with no request slot.
_REFUSED = struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 7, 1 << 40, 4096)
_FLOOD = _REFUSED * 20000  # 560 KB
#: Far more than any bound lets the server read from a client that does
#: not read its replies (the old behaviour: it read all of it).
_FLOOD_LIMIT = 400 * len(_FLOOD)


def _flood(sock: Any, would_block: tuple[type[Exception], ...]) -> int:
    """Send refused requests on a non-blocking socket, never reading, until
    the server has taken nothing for a second (or _FLOOD_LIMIT); return
    the bytes it took.  After a send that would block, the same slice is
    offered again (what OpenSSL requires of a retried write)."""
    import time

    sent = 0
    stalled_since = time.monotonic()
    while time.monotonic() - stalled_since < 1.0 and sent < _FLOOD_LIMIT:
        try:
            n = sock.send(_FLOOD[sent % len(_FLOOD):][:65536])
        except would_block:
            time.sleep(0.01)
            continue
        sent += n
        stalled_since = time.monotonic()
    return sent


def _queued_bound() -> int:
    """Reply buffers the core may hold when the server stops reading: the
    mark, plus one 64 KiB receive of refused requests (2 buffers each)."""
    from nbdqcow.pump import _OUTPUT_HIGH

    return _OUTPUT_HIGH + 2 * (65536 // len(_REFUSED) + 1)


async def test_a_client_that_never_reads_replies_is_not_read_either(
        tmp_path: Path, image: Path) -> None:
    """A flood of refused requests (a READ past the end takes no request
    slot) from a client that never reads its replies: the server stops
    reading it once a send waits and replies pile up, so its memory stays
    bounded (review: 32 -> 318 MiB RSS for 50 MB of such requests); and
    once the client reads, every request gets its error reply."""
    import socket as _socket
    import threading

    from tests.nbdclient import NbdClient as SyncClient

    refused = _REFUSED
    async with serving(RawBackend(image), tmp_path / "f.sock") as running:
        c = SyncClient.connect_unix(running.path)
        sock = c.stream.sock  # type: ignore[attr-defined]
        result: dict[str, int] = {}

        def flood() -> None:
            c.handshake()
            c.go("disk")  # no structured replies: 16-byte simple replies
            sock.setblocking(False)
            result["sent"] = _flood(sock, (BlockingIOError,))

        t = threading.Thread(target=flood)
        t.start()
        await asyncio.to_thread(t.join, 60)
        (session,) = running.server._conns.values()
        queued = session.core.queued_output
        assert result["sent"] < _FLOOD_LIMIT, "the server never stopped reading"
        assert queued <= _queued_bound(), queued
        # Now read: the server resumes, and answers every whole request.
        requests = result["sent"] // len(refused)

        def drain() -> int:
            sock.setblocking(True)
            sock.settimeout(10)
            buf = bytearray(1 << 20)

            def replies(want: int) -> int:
                got = 0
                while got < want:
                    n = sock.recv_into(buf, min(len(buf), want - got))
                    assert n, f"closed after {got} of {want} reply bytes"
                    if got == 0:
                        assert buf[:4] == b"\x67\x44\x66\x98"  # simple reply magic
                    got += n
                return got

            got = replies(requests * 16)
            part = result["sent"] % len(refused)
            if part:  # complete the request cut in the middle: one more reply
                sock.sendall(refused[part:])
                got += replies(16)
            sock.shutdown(_socket.SHUT_WR)
            return got

        got = await asyncio.to_thread(drain)
        assert got == (requests + (1 if result["sent"] % len(refused) else 0)) * 16
        c.close()


async def test_a_tls_client_that_never_reads_replies_is_not_read_either(
        tmp_path: Path, image: Path) -> None:
    """The same flood over TLS, which the coroutine reader serves (records
    are decrypted before parsing): it too stops reading a client that does
    not read its replies."""
    import ssl
    import threading

    from nbdqcow.tls import TlsConfig
    from tests.interop.certs import make_ca
    from tests.nbdclient import NbdClient as SyncClient

    pki = make_ca(tmp_path / "pki", client=False)
    options = ServerOptions(handshake_timeout=5, shutdown_timeout=5,
                            tls=TlsConfig.from_dir(pki))
    context = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    async with serving(RawBackend(image), tmp_path / "t.sock", options) as running:
        c = SyncClient.connect_unix(running.path)
        result: dict[str, int] = {}

        def flood() -> None:
            c.handshake()
            c.starttls(context, server_hostname="localhost")
            c.go("disk")
            sock = c.stream.sock  # type: ignore[attr-defined]
            sock.setblocking(False)
            result["sent"] = _flood(
                sock, (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError))

        t = threading.Thread(target=flood)
        t.start()
        await asyncio.to_thread(t.join, 60)
        (session,) = running.server._conns.values()
        assert result["sent"] < _FLOOD_LIMIT, "the server never stopped reading"
        assert session.core.queued_output <= _queued_bound()
        # (Draining is checked without TLS above: after a send that would
        # block, OpenSSL accepts only the very same write again.)
        c.close()

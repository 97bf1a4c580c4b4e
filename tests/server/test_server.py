"""The adapter's own behaviour: exports by name, concurrency and reply order,
error mapping, buffer reuse, shutdown."""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
from pathlib import Path

import pytest

from nbdqcow.errors import CorruptImage, UnsupportedImage
from nbdqcow.exports import ExportCatalog
from nbdqcow.nbd import Errno
from nbdqcow.server import BufferPool, nbd_errno
from tests.server.conftest import Running, pattern
from tests.server.nbdclient import (
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    ERR_BIT,
    OPT_LIST,
    REP_ACK,
    REP_SERVER,
    NbdClient,
)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "full"), Errno.ENOSPC),
        (OSError(errno.EDQUOT, "quota"), Errno.ENOSPC),
        (OSError(errno.EROFS, "ro"), Errno.EPERM),
        (OSError(errno.ENOTSUP, "no"), Errno.ENOTSUP),
        (OSError(errno.EBADF, "odd"), Errno.EIO),
        (CorruptImage("bad L2"), Errno.EIO),
        (UnsupportedImage("zstd"), Errno.ENOTSUP),
        (RuntimeError("bug"), Errno.EIO),
    ],
)
def test_errno_mapping(exc: BaseException, expected: Errno) -> None:
    assert nbd_errno(exc) is expected


def test_buffer_pool_reuses_and_bounds() -> None:
    pool = BufferPool(keep=2)
    a = pool.get(5000)
    assert len(a) == 5000
    base = a.obj
    pool.put(a)
    b = pool.get(8000)  # same 8 KiB class: the same buffer comes back
    assert b.obj is base
    views = [pool.get(8192) for _ in range(4)]
    for v in views:
        pool.put(v)
    assert len(pool._free[8192]) == 2


def test_buffer_pool_release_takes_every_kind_of_entry() -> None:
    """release() (one call per sent batch) does what put() does for each
    buffer and returns the budget cost of the batch."""
    pool = BufferPool(keep=2, keep_bytes=3 * 4096)
    reads = [pool.get(4096) for _ in range(3)]
    short = pool.get(1000)
    held = [pool.get(8192)]
    bases = {id(v.obj) for v in [*reads, short]}
    freed = pool.release([*reads, 0, 65536, short, (held, 8192)])
    assert freed == 3 * 4096 + 65536 + 1000 + 8192
    # 4 KiB class: at most keep=2 kept; the byte bound (3 x 4 KiB) then
    # leaves room for one more buffer, not for the 8 KiB one.
    assert len(pool._free[4096]) == 2 and 8192 not in pool._free
    assert {id(b) for b in pool._free[4096]} <= bases
    assert pool._kept == 2 * 4096
    for v in [*reads, short]:  # released: a late use fails loudly
        with pytest.raises(ValueError):
            v.tobytes()
    again = pool.get(4096)
    assert id(again.obj) in bases and again.nbytes == 4096


async def test_export_lookup_and_list(running: Running) -> None:
    c = await NbdClient.open(running.path)
    await c.start()
    c.send_option(OPT_LIST)
    names = []
    while (rep := await c.option_reply()).type != REP_ACK:
        assert rep.type == REP_SERVER
        n = struct.unpack(">I", rep.data[:4])[0]
        names.append(rep.data[4:4 + n].decode())
    assert names == ["disk"]
    err = await c.go("nope")
    assert err is not None and err.type == ERR_BIT + 6  # ERR_UNKNOWN
    assert await c.go("") is None  # the default export
    assert c.size == len(pattern())
    assert await c.pread(0, 4096) == pattern()[:4096]
    await c.disconnect()


async def test_replies_out_of_order(running: Running,
                                    hook: list[object]) -> None:
    gate = asyncio.Event()

    async def slow_first(op: str, offset: int) -> None:
        if op == "read" and offset == 0:
            await gate.wait()

    hook[0] = slow_first
    c = await NbdClient.connect(running.path)
    slow = c.request(CMD_READ, 0, 4096)
    fast = c.request(CMD_READ, 8192, 4096)
    cookie, err, data = await c.reply(4096)
    assert (cookie, err) == (fast, 0) and data == pattern()[8192:12288]
    gate.set()
    cookie, err, data = await c.reply(4096)
    assert (cookie, err) == (slow, 0) and data == pattern()[:4096]
    await c.disconnect()


async def test_requests_run_concurrently(running: Running, hook: list[object]) -> None:
    active = 0
    peak = 0

    async def track(op: str, offset: int) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1

    hook[0] = track
    c = await NbdClient.connect(running.path)
    cookies = {c.request(CMD_READ, i * 65536, 65536) for i in range(16)}
    for _ in range(16):
        cookie, err, data = await c.reply(65536)
        assert err == 0 and cookie in cookies
        cookies.discard(cookie)
        off = (cookie - 1) * 65536
        assert data == pattern()[off:off + 65536]
    assert not cookies
    assert peak > 1
    await c.disconnect()


@pytest.mark.parametrize(
    ("exc", "code"),
    [(OSError(errno.ENOSPC, "No space left"), 28), (RuntimeError("a bug"), 5),
     (CorruptImage("L2 table points outside the image"), 5)],
)
async def test_backend_errors_become_replies(running: Running, hook: list[object],
                                             exc: Exception, code: int, image: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    def fail(op: str, offset: int) -> None:
        if op == "write":
            raise exc

    hook[0] = fail
    c = await NbdClient.connect(running.path)
    with caplog.at_level(logging.INFO, logger="nbdqcow"):
        assert await c.pwrite(0, b"\x01" * 4096) == code
        # the connection and the server live on
        assert await c.pread(0, 4096) == pattern()[:4096]
        await c.disconnect()
    assert image.read_bytes() == pattern()
    assert not any(r.exc_info for r in caplog.records), "no tracebacks for request errors"


async def test_writes_reach_the_file(running: Running, image: Path) -> None:
    c = await NbdClient.connect(running.path)
    data = bytes(range(256)) * 512
    for i in range(8):
        assert await c.pwrite(i * 131072 + 17, data) == 0
    c.request(CMD_FLUSH)
    assert (await c.reply())[1] == 0
    await c.disconnect()
    body = image.read_bytes()
    for i in range(8):
        assert body[i * 131072 + 17: i * 131072 + 17 + len(data)] == data


async def test_shutdown_finishes_in_flight_requests(running: Running,
                                                    hook: list[object]) -> None:
    started = asyncio.Event()

    async def slow_write(op: str, offset: int) -> None:
        if op == "write":
            started.set()
            await asyncio.sleep(0.3)

    hook[0] = slow_write
    c = await NbdClient.connect(running.path)
    idle = await NbdClient.open(running.path)
    await idle.start()
    cookie = c.request(CMD_WRITE, 4096, 4096, payload=b"\x99" * 4096)
    await started.wait()
    flushed = []
    hook[0] = lambda op, off: flushed.append(op) if op == "flush" else slow_write(op, off)
    running.server.close()
    got, err, _ = await c.reply()
    assert (got, err) == (cookie, 0)  # the in-flight write completed
    assert await c.closed_by_server()
    # a client still negotiating is refused (ERR_SHUTDOWN) or closed
    idle.send_option(OPT_LIST)
    try:
        rep = await asyncio.wait_for(idle.option_reply(), 5)
        assert rep.type == ERR_BIT + 7
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    await idle.close()
    await c.close()
    await asyncio.wait_for(running.server.shutdown(), 10)
    assert flushed == ["flush"]  # the writable export was flushed on the way out


async def test_catalog_rejects_bad_names(image: Path) -> None:
    from nbdqcow.backends.raw import RawBackend

    catalog = ExportCatalog()
    b = RawBackend(image)
    catalog.add("a", b)
    with pytest.raises(ValueError, match="defined twice"):
        catalog.add("a", b)
    with pytest.raises(ValueError, match="NUL"):
        catalog.add("x\0y", b)
    with pytest.raises(ValueError, match="longer than 4096"):
        catalog.add("n" * 5000, b)
    assert catalog.lookup("") is catalog.lookup("a")
    await catalog.aclose()


async def test_tcp_ipv4_and_ipv6_with_nodelay(image: Path) -> None:
    import socket

    from nbdqcow.backends.raw import RawBackend
    from nbdqcow.server import NbdServer

    catalog = ExportCatalog()
    catalog.add("disk", RawBackend(image))
    server = NbdServer(catalog)
    where = await server.listen_tcp("127.0.0.1", 0)
    try:
        where += await server.listen_tcp("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert where[0].startswith("tcp:127.0.0.1:") and where[1].startswith("tcp:[::1]:")
    task = asyncio.create_task(server.serve_forever())
    try:
        for host, port in zip(("127.0.0.1", "::1"), server.ports, strict=True):
            reader, writer = await asyncio.open_connection(host, port)
            c = NbdClient(reader, writer)
            await c.start()
            assert await c.go("disk") is None
            assert await c.pread(4096, 4096) == pattern()[4096:8192]
            # proto.md: both sides SHOULD set TCP_NODELAY
            (conn,) = server._conns.values()
            assert conn.stream.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await c.disconnect()
            await asyncio.sleep(0.05)
    finally:
        server.close()
        await task
        await catalog.aclose()


async def test_export_name_option_for_old_clients(running: Running) -> None:
    from tests.server.nbdclient import OPT_EXPORT_NAME

    c = await NbdClient.open(running.path)
    await c.start()  # with NO_ZEROES
    c.send_option(OPT_EXPORT_NAME, b"disk")
    size, flags = struct.unpack(">QH", await c.r.readexactly(10))
    assert size == len(pattern()) and flags & 1
    assert await c.pread(0, 512) == pattern()[:512]
    await c.disconnect()
    # an unknown name cannot be refused politely: the server hangs up
    c = await NbdClient.open(running.path)
    await c.start()
    c.send_option(OPT_EXPORT_NAME, b"nope")
    assert await c.closed_by_server()


async def test_export_policies(tmp_path: Path, image: Path) -> None:
    """Per-export policy: address filter (hidden from LIST too), TLS-only
    exports, and a per-export client limit."""
    from nbdqcow.backends.raw import RawBackend
    from nbdqcow.nbd import TlsMode
    from nbdqcow.server import NbdServer, ServerOptions
    from nbdqcow.tls import TlsConfig
    from tests.interop.certs import make_ca

    catalog = ExportCatalog()
    catalog.add("open", RawBackend(image), max_connections=1)
    catalog.add("hidden", RawBackend(image), allow=lambda addr: False)
    catalog.add("secret", RawBackend(image), require_tls=True)
    certs = make_ca(tmp_path / "ca")
    server = NbdServer(catalog, ServerOptions(
        tls=TlsConfig.from_dir(certs, mode=TlsMode.OPTIONAL)))
    path = str(tmp_path / "p.sock")
    await server.listen_unix(path)
    task = asyncio.create_task(server.serve_forever())
    try:
        c = await NbdClient.open(path)
        await c.start()
        c.send_option(OPT_LIST)
        names = []
        while (rep := await c.option_reply()).type != REP_ACK:
            names.append(rep.data[4:].decode())
        assert names == ["open", "secret"]
        rep = await c.go("hidden")
        assert rep is not None and rep.type == ERR_BIT + 2  # ERR_POLICY
        rep = await c.go("secret")
        assert rep is not None and rep.type == ERR_BIT + 5  # ERR_TLS_REQD
        assert b"requires TLS" in rep.data
        assert await c.go("open") is None
        second = await NbdClient.open(path)
        await second.start()
        rep = await second.go("open")
        assert rep is not None and rep.type == ERR_BIT + 2  # ERR_POLICY
        assert b"maximum of 1" in rep.data
        await c.disconnect()
        await asyncio.sleep(0.1)
        assert await second.go("open") is None  # the slot is free again
        assert await second.pread(0, 512) == pattern()[:512]
        await second.disconnect()
    finally:
        server.close()
        await task
        await catalog.aclose()

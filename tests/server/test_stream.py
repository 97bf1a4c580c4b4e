"""Streams: vectored sends are atomic under back-pressure, and TLS works
with a standard client."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from nbdqcow.stream import PlainStream, TlsStream
from nbdqcow.tls import TlsConfig
from tests.interop.certs import make_ca


async def _read_all(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, 1 << 16)
        assert chunk
        out += chunk
    return bytes(out)


async def test_concurrent_sends_never_interleave() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setblocking(False)
    stream = PlainStream(a)
    # 20 "replies" of header + 3 payload views each, large enough that the
    # socket buffer fills and sends go partial
    replies = []
    for i in range(20):
        body = bytes([i]) * (50000 + i)
        replies.append([f"H{i:02d}".encode(), memoryview(body)[:20000],
                        memoryview(body)[20000:], b"END"])
    total = sum(sum(len(p) for p in r) for r in replies)
    reader = asyncio.create_task(_read_all(b, total))
    await asyncio.gather(*(stream.send(r) for r in replies))
    data = await reader
    pos = 0
    seen = set()
    while pos < len(data):
        i = int(data[pos + 1:pos + 3])
        n = 50000 + i
        assert data[pos + 3:pos + 3 + n] == bytes([i]) * n
        assert data[pos + 3 + n:pos + 6 + n] == b"END"
        seen.add(i)
        pos += 6 + n
    assert seen == set(range(20))
    await stream.drain()
    stream.close()
    b.close()


async def test_staggered_sends_never_interleave() -> None:
    """Senders arriving while a partial send hands its turn to a waiter.

    Regression: with an asyncio.Lock, a fast-path sender that arrived between
    a release and the woken waiter running sent half its reply, then queued
    behind that waiter, which wrote into the middle of it.
    """
    import random

    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    b.setblocking(False)
    stream = PlainStream(a)
    rnd = random.Random(1)
    sizes = [rnd.randrange(1000, 60000) for _ in range(300)]
    reader = asyncio.create_task(_read_all(b, sum(n + 8 for n in sizes)))

    async def one(i: int, n: int) -> None:
        await asyncio.sleep(rnd.random() * 0.02)
        body = bytes([i % 251]) * n
        head = i.to_bytes(4, "big") + n.to_bytes(4, "big")
        await stream.send([head, memoryview(body)[: n // 2], memoryview(body)[n // 2 :]])

    await asyncio.gather(*(one(i, n) for i, n in enumerate(sizes)))
    data = await reader
    pos = 0
    seen = 0
    while pos < len(data):
        i = int.from_bytes(data[pos : pos + 4], "big")
        n = int.from_bytes(data[pos + 4 : pos + 8], "big")
        assert n == sizes[i], f"reply {seen} has a bad header: interleaved"
        assert data[pos + 8 : pos + 8 + n] == bytes([i % 251]) * n, f"reply {i} interleaved"
        pos += 8 + n
        seen += 1
    assert seen == len(sizes)
    stream.close()
    b.close()


async def test_tls_stream_roundtrip(tmp_path: Path) -> None:
    certs = make_ca(tmp_path / "ca")
    ctx = TlsConfig.from_dir(certs).context()
    a, b = socket.socketpair()
    server = TlsStream(a, ctx)
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))

    def client() -> bytes:
        with client_ctx.wrap_socket(b, server_hostname="localhost") as s:
            s.sendall(b"ping" * 10000)
            got = b""
            while len(got) < 200000:
                got += s.recv(65536)
            assert s.version() in ("TLSv1.2", "TLSv1.3")
            return got

    fut = asyncio.get_running_loop().run_in_executor(None, client)
    await server.handshake()
    buf = bytearray(40000)
    assert await server.recv_exact(memoryview(buf))
    assert bytes(buf) == b"ping" * 10000
    await asyncio.gather(server.send([b"x" * 100000, memoryview(b"y" * 100000)]))
    assert await fut == b"x" * 100000 + b"y" * 100000
    server.close()


async def test_tls_handshake_with_plaintext_peer_fails(tmp_path: Path) -> None:
    certs = make_ca(tmp_path / "ca")
    ctx = TlsConfig.from_dir(certs).context()
    a, b = socket.socketpair()
    server = TlsStream(a, ctx)
    b.sendall(b"this is not a TLS client hello" * 4)
    b.shutdown(socket.SHUT_WR)
    try:
        await asyncio.wait_for(server.handshake(), 5)
    except (ssl.SSLError, ConnectionError):
        pass
    else:
        raise AssertionError("handshake with garbage succeeded")
    server.close()
    b.close()


def test_tls_config_errors(tmp_path: Path) -> None:
    import pytest

    from nbdqcow.tls import TlsSetupError

    with pytest.raises(TlsSetupError, match="not found"):
        TlsConfig.from_dir(tmp_path).context()
    certs = make_ca(tmp_path / "ca")
    (tmp_path / "ca" / "server-key.pem").write_text("garbage")
    with pytest.raises(TlsSetupError, match="unusable"):
        TlsConfig.from_dir(certs).context()
    cfg = TlsConfig(certfile=str(certs / "server-cert.pem"), keyfile="/x", verify_peer=True)
    with pytest.raises(TlsSetupError):
        cfg.context()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_below_1_2_is_refused(tmp_path: Path) -> None:
    """proto.md: "MUST use TLS version 1.2 or later"."""
    certs = make_ca(tmp_path / "ca")
    ctx = TlsConfig.from_dir(certs).context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    a, b = socket.socketpair()
    server = TlsStream(a, ctx)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    try:
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pass  # this OpenSSL cannot even speak TLS 1.1: refused all the more

    def client() -> str:
        try:
            with old.wrap_socket(b) as s:
                return str(s.version())
        except (ssl.SSLError, OSError) as e:
            return f"refused: {e}"

    fut = asyncio.get_running_loop().run_in_executor(None, client)
    try:
        await asyncio.wait_for(server.handshake(), 5)
    except (ssl.SSLError, ConnectionError):
        pass
    else:
        raise AssertionError("a TLS 1.1 handshake succeeded")
    finally:
        server.close()
    assert (await fut).startswith("refused")

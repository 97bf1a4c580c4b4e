"""The accept path of :class:`nbdqcow.server.NbdServer` (issue 6 made it
leaner): TCP socket options come from the listener, a session's task is its
own coroutine, and the bookkeeping when it ends (internal errors included)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbdqcow.backends.raw import RawBackend
from nbdqcow.exports import Export, ExportCatalog
from nbdqcow.server import NbdServer, ServerOptions
from nbdqcow.session import Session
from tests.server.conftest import Running, pattern
from tests.server.nbdclient import NbdClient


async def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def test_tcp_clients_get_nodelay_and_keepalive(image: Path) -> None:
    catalog = ExportCatalog()
    catalog.add("disk", RawBackend(image))
    server = NbdServer(catalog)
    await server.listen_tcp("127.0.0.1", 0)
    task = asyncio.create_task(server.serve_forever())
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.ports[0])
        c = NbdClient(reader, writer)
        await c.start()
        assert await c.go("disk") is None
        (conn,) = server._conns.values()
        sock = conn.stream.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        await c.disconnect()
        await _wait_for(lambda: server.connection_count == 0)
    finally:
        server.close()
        await task
        await catalog.aclose()


async def test_internal_error_is_logged_and_others_are_served(
        running: Running, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real = Session._answer_export
    calls = 0

    def broken_once(self: Session, ev: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        real(self, ev)

    monkeypatch.setattr(Session, "_answer_export", broken_once)
    with caplog.at_level(logging.ERROR, logger="nbdqcow.server"):
        c = await NbdClient.open(running.path)
        await c.start()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await c.go("disk")
        assert await c.closed_by_server()
        await _wait_for(lambda: running.server.connection_count == 0)
    assert any("connection 1: internal error: a bug" in r.getMessage() for r in caplog.records)
    c = await NbdClient.open(running.path)
    await c.start()
    assert await c.go("disk") is None
    assert await c.pread(0, 4096) == pattern()[:4096]
    await c.disconnect()
    await _wait_for(lambda: running.server.connection_count == 0)


# --- the handshake timeout: one sweep for the server (issue 6) ---------------

@pytest.mark.parametrize("options", [ServerOptions(handshake_timeout=1.5, shutdown_timeout=5)],
                         ids=["1.5s"], indirect=True)
async def test_each_client_gets_its_own_handshake_deadline(running: Running) -> None:
    """The server's one timer drops each silent client at its own deadline:
    not before (a client that came later keeps its time), and never one that
    reached transmission."""
    server = running.server
    first = await NbdClient.open(running.path)
    await first.greeting()
    served = await NbdClient.connect(running.path)
    await asyncio.sleep(1.0)
    second = await NbdClient.open(running.path)
    await second.greeting()
    assert await first.closed_by_server(timeout=5)
    # the first deadline passed; the second client's is 1 s later
    assert any(not c.in_transmission for c in server._conns.values())
    assert await second.closed_by_server(timeout=5)
    await _wait_for(lambda: server.connection_count == 1)
    assert not server._handshaking  # forgotten once dropped (or served)
    assert await served.pread(0, 4096) == pattern()[:4096]
    await served.disconnect()


def test_export_info_is_kept_while_the_backend_is_unchanged(image: Path) -> None:
    """The core memoizes its answers on the ExportInfo, so every client of
    an export gets the same one -- until the backend's size changes."""
    backend = RawBackend(image)
    export = Export("disk", backend, description="d")
    info = export.info()
    assert export.info() is info
    assert (info.name, info.size, info.caps, info.description) == (
        "disk", backend.size, backend.caps, "d")
    backend._size += 4096  # as if the image had grown
    grown = export.info()
    assert grown is not info and grown.size == info.size + 4096
    assert export.info() is grown


async def test_a_timed_out_handshake_is_counted_as_a_timeout(
        tmp_path: Path, image: Path) -> None:
    """The sweep's abort is reported as what it is: the metrics count the
    client under reason "timeout" (not "eof"), and the log says why."""
    from nbdqcow.metrics import Metrics
    from tests.server.conftest import serving

    metrics = Metrics()
    opts = ServerOptions(handshake_timeout=0.5, shutdown_timeout=5, metrics=metrics)
    async with serving(RawBackend(image), tmp_path / "nbd.sock", opts) as r:
        silent = await NbdClient.open(r.path)
        await silent.greeting()
        assert await silent.closed_by_server(timeout=5)
        await _wait_for(lambda: r.server.connection_count == 0)
    text = metrics.render().decode()
    assert 'nbdqcow_handshake_failures_total{reason="timeout"} 1.0' in text, text
    assert 'reason="eof"' not in text

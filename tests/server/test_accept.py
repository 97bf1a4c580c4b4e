"""The accept path of :class:`nbdqcow.server.NbdServer` (issue 6 made it
leaner): TCP socket options come from the listener, a session's task is its
own coroutine, and the bookkeeping when it ends (internal errors included)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from nbdqcow.backends.raw import RawBackend
from nbdqcow.exports import ExportCatalog
from nbdqcow.server import NbdServer
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
    real_run = Session.run
    calls = 0

    async def broken_once(self: Session) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        await real_run(self)

    monkeypatch.setattr(Session, "run", broken_once)
    with caplog.at_level(logging.ERROR, logger="nbdqcow.server"):
        c = await NbdClient.open(running.path)
        assert await c.closed_by_server()
        await _wait_for(lambda: running.server.connection_count == 0)
    assert any("connection 1: internal error: a bug" in r.getMessage() for r in caplog.records)
    c = await NbdClient.open(running.path)
    await c.start()
    assert await c.go("disk") is None
    assert await c.pread(0, 4096) == pattern()[:4096]
    await c.disconnect()
    await _wait_for(lambda: running.server.connection_count == 0)

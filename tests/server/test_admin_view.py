"""The server as the admin endpoint and the metrics see it
(``nbdqcow.admin.ServerState``, ``nbdqcow.metrics.Metrics``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nbdqcow.admin import ServerState
from nbdqcow.backends.raw import RawBackend
from nbdqcow.exports import ExportCatalog
from nbdqcow.metrics import Metrics
from nbdqcow.server import NbdServer, ServerOptions
from tests.server.conftest import pattern
from tests.server.nbdclient import CMD_READ, NbdClient


async def test_clients_exports_metrics_and_disconnect(tmp_path: Path, image: Path) -> None:
    metrics = Metrics()
    catalog = ExportCatalog()
    catalog.add("disk", RawBackend(image, read_only=False), image=str(image), format="raw")
    server = NbdServer(catalog, ServerOptions(metrics=metrics, shutdown_timeout=2))
    assert isinstance(server, ServerState)
    path = str(tmp_path / "a.sock")
    await server.listen_unix(path)
    task = asyncio.create_task(server.serve_forever())
    try:
        c = await NbdClient.connect(path)
        assert await c.pread(0, 8192) == pattern()[:8192]
        assert await c.pwrite(65536, b"\x01" * 4096) == 0
        c.request(CMD_READ, len(pattern()), 512)  # past the end: EINVAL
        assert (await c.reply())[1] == 22
        silent = await NbdClient.open(path)  # still in the handshake
        await silent.greeting()
        await asyncio.sleep(0.05)

        (exp,) = server.exports()
        assert (exp.name, exp.image, exp.format, exp.clients, exp.size) == (
            "disk", str(image), "raw", 1, len(pattern()))
        clients = {cl.export: cl for cl in server.clients()}
        assert set(clients) == {"disk", None}
        cl = clients["disk"]
        assert (cl.bytes_read, cl.bytes_written, cl.requests, cl.address) == (
            8192, 4096, 3, "unix")

        text = metrics.render().decode()
        # the refused read counts as a request too, and as an error
        assert 'nbdqcow_requests_total{command="READ",export="disk"} 2.0' in text
        assert 'nbdqcow_requests_total{command="WRITE",export="disk"} 1.0' in text
        assert ('nbdqcow_request_errors_total{command="READ",error="EINVAL",export="disk"} 1.0'
                in text)
        assert "nbdqcow_connections_active 2.0" in text

        assert await server.disconnect(cl.id) is True
        assert await c.closed_by_server()
        assert await server.disconnect("no-such-client") is False
        await silent.close()
        await asyncio.sleep(0.05)
        assert server.clients() == []
        text = metrics.render().decode()
        assert "nbdqcow_connections_active 0.0" in text
        assert 'nbdqcow_handshake_failures_total{reason="eof"} 1.0' in text
    finally:
        server.close()
        await task
        await catalog.aclose()

"""nbdqcow.admin and nbdqcow.metrics: the admin endpoint over real sockets.

The endpoint reads from ``LabState``, a small but real implementation of the
``ServerState`` protocol: its clients are live TCP connections to a toy
asyncio server, so "disconnect" really closes a socket and the test sees the
peer get EOF.  Requests are made with real HTTP clients (urllib, http.client
over a Unix socket, raw sockets for malformed input) and /metrics is parsed
with the Prometheus project's own text parser.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from nbdqcow.admin import AdminError, AdminServer, ClientStatus, ExportStatus, ServerState
from nbdqcow.config import TcpAddress, UnixAddress
from nbdqcow.metrics import CONTENT_TYPE, Metrics


@dataclass
class LabClient:
    id: str
    writer: asyncio.StreamWriter
    export: str | None
    since: float
    bytes_read: int = 0
    bytes_written: int = 0
    requests: int = 0


@dataclass
class LabState:
    """Accepts TCP connections and keeps them as 'clients' of an export."""

    exports_: list[ExportStatus] = field(default_factory=list)
    clients_: dict[str, LabClient] = field(default_factory=dict)
    fail: bool = False
    next_id: int = 1

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = (await reader.readline()).decode().strip() or None
        cid = str(self.next_id)
        self.next_id += 1
        self.clients_[cid] = LabClient(cid, writer, name, time.time())
        writer.write(f"{cid}\n".encode())
        await writer.drain()

    def exports(self) -> Sequence[ExportStatus]:
        if self.fail:
            raise RuntimeError("state is broken: secret detail")
        return self.exports_

    def clients(self) -> Sequence[ClientStatus]:
        out = []
        for c in self.clients_.values():
            host, port = c.writer.get_extra_info("peername")[:2]
            out.append(
                ClientStatus(
                    id=c.id,
                    address=f"{host}:{port}",
                    export=c.export,
                    bytes_read=c.bytes_read,
                    bytes_written=c.bytes_written,
                    requests=c.requests,
                    connected_since=c.since,
                )
            )
        return out

    async def disconnect(self, client_id: str) -> bool:
        client = self.clients_.pop(client_id, None)
        if client is None:
            return False
        client.writer.close()
        await client.writer.wait_closed()
        return True


def test_lab_state_implements_the_protocol() -> None:
    assert isinstance(LabState(), ServerState)


@pytest.fixture
async def lab() -> AsyncIterator[tuple[LabState, Metrics, AdminServer, str]]:
    state = LabState(
        exports_=[
            ExportStatus("golden", "/srv/golden.qcow2", "qcow2", True, "base", 1 << 30, 0),
            ExportStatus("pc1", "/srv/pc1.qcow2", None, False, "", None, 1, accepting=False),
        ]
    )
    metrics = Metrics()
    async with AdminServer(state, metrics) as admin:
        await admin.start(TcpAddress("127.0.0.1", 0))
        (addr,) = admin.addresses
        assert isinstance(addr, TcpAddress)
        yield state, metrics, admin, f"http://127.0.0.1:{addr.port}"


async def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """A real HTTP request with urllib, off the event loop."""

    def run() -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    return await asyncio.to_thread(run)


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_exports(lab: tuple[LabState, Metrics, AdminServer, str]) -> None:
    _, _, _, base = lab
    status, headers, body = await fetch(base + "/exports")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "exports": [
            {"name": "golden", "image": "/srv/golden.qcow2", "format": "qcow2",
             "read_only": True, "description": "base", "size": 1 << 30, "clients": 0,
             "accepting": True},
            {"name": "pc1", "image": "/srv/pc1.qcow2", "format": None, "read_only": False,
             "description": "", "size": None, "clients": 1, "accepting": False},
        ]
    }


async def test_clients_and_disconnect(lab: tuple[LabState, Metrics, AdminServer, str]) -> None:
    state, _, _, base = lab
    toy = await asyncio.start_server(state.on_connect, "127.0.0.1", 0)
    port = toy.sockets[0].getsockname()[1]
    async with toy:
        conns = []
        for export in ("golden", "pc1"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"{export}\n".encode())
            cid = (await reader.readline()).decode().strip()
            conns.append((cid, reader, writer))
        state.clients_["1"].bytes_read = 4096
        state.clients_["1"].requests = 3

        status, _, body = await fetch(base + "/clients")
        assert status == 200
        clients = json.loads(body)["clients"]
        assert [(c["id"], c["export"]) for c in clients] == [("1", "golden"), ("2", "pc1")]
        first = clients[0]
        local = conns[0][2].get_extra_info("sockname")
        assert first["address"] == f"{local[0]}:{local[1]}"
        assert (first["bytes_read"], first["bytes_written"], first["requests"]) == (4096, 0, 3)
        assert first["connected_since"].endswith("Z") and first["tls"] is False
        age = time.time() - datetime.fromisoformat(first["connected_since"]).timestamp()
        assert 0 <= age < 60

        status, _, body = await fetch(base + "/clients/1/disconnect", "POST")
        assert (status, json.loads(body)) == (200, {"disconnected": "1"})
        # The client really lost its connection.
        assert await asyncio.wait_for(conns[0][1].read(), 10) == b""
        _, _, body = await fetch(base + "/clients")
        assert [c["id"] for c in json.loads(body)["clients"]] == ["2"]

        status, _, body = await fetch(base + "/clients/1/disconnect", "POST")
        assert (status, json.loads(body)) == (404, {"error": "no client with id '1'"})
        for _, _, writer in conns:
            writer.close()


async def test_metrics_parse_with_prometheus_parser(
    lab: tuple[LabState, Metrics, AdminServer, str],
) -> None:
    _, metrics, _, base = lab
    metrics.connection_opened()
    metrics.connection_opened()
    metrics.connection_closed()
    for latency in (0.0002, 0.003, 0.003):
        metrics.observe_request("golden", "READ", 65536, latency)
    metrics.observe_request("pc1", "WRITE", 512, 0.5, error="ENOSPC")
    metrics.observe_request("pc1", "FLUSH", 0, 0.02)
    metrics.handshake_failed("timeout")

    status, headers, body = await fetch(base + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE and CONTENT_TYPE.startswith("text/plain;")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}

    def value(family: str, sample: str, **labels: str) -> float:
        for s in families[family].samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
        raise AssertionError(f"no sample {sample}{labels}")

    assert families["nbdqcow_requests"].type == "counter"
    assert value("nbdqcow_requests", "nbdqcow_requests_total", export="golden", command="READ") == 3
    assert value(
        "nbdqcow_request_bytes", "nbdqcow_request_bytes_total", export="golden", command="READ"
    ) == 3 * 65536
    hist = "nbdqcow_request_duration_seconds"
    assert families[hist].type == "histogram"
    assert value(hist, hist + "_count", export="golden", command="READ") == 3
    assert value(hist, hist + "_bucket", export="golden", command="READ", le="0.00025") == 1
    assert value(hist, hist + "_bucket", export="golden", command="READ", le="0.005") == 3
    assert value(hist, hist + "_sum", export="golden", command="READ") == pytest.approx(0.0062)
    assert value(
        "nbdqcow_request_errors", "nbdqcow_request_errors_total",
        export="pc1", command="WRITE", error="ENOSPC",
    ) == 1
    assert value("nbdqcow_connections", "nbdqcow_connections_total") == 2
    assert value("nbdqcow_connections_active", "nbdqcow_connections_active") == 1
    assert value(
        "nbdqcow_handshake_failures", "nbdqcow_handshake_failures_total", reason="timeout"
    ) == 1
    # FLUSH moves no bytes: no byte series is created for it.
    assert not any(
        s.labels.get("command") == "FLUSH" for s in families["nbdqcow_request_bytes"].samples
    )

    metrics.forget_export("pc1")
    _, _, body = await fetch(base + "/metrics")
    assert 'export="pc1"' not in body.decode() and 'export="golden"' in body.decode()


def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request("x", "READ", 1, 0.1)
    assert b"export=\"x\"" in a.render() and b"export=\"x\"" not in b.render()
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("nbdqcow_requests_total", {"export": "x",
                                                                "command": "READ"}) is None


async def test_index_head_and_errors(lab: tuple[LabState, Metrics, AdminServer, str]) -> None:
    state, _, _, base = lab
    status, _, body = await fetch(base + "/")
    assert status == 200 and "/metrics" in json.loads(body)["routes"]

    status, headers, body = await fetch(base + "/exports", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0

    status, headers, body = await fetch(base + "/exports", "POST")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    assert json.loads(body) == {"error": "POST not allowed here; use GET or HEAD"}
    status, headers, _ = await fetch(base + "/clients/1/disconnect")
    assert (status, headers["Allow"]) == (405, "POST")

    status, _, body = await fetch(base + "/nope?x=1")
    assert (status, json.loads(body)) == (404, {"error": "no such resource: /nope"})

    state.fail = True
    status, _, body = await fetch(base + "/exports")
    assert (status, json.loads(body)) == (500, {"error": "internal error"})
    assert b"secret" not in body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"garbage\r\n\r\n", b"400 Bad Request"),
        (b"GET /exports HTTP/1.1\r\nno colon\r\n\r\n", b"400 Bad Request"),
        (b"GET http://x/ HTTP/1.1\r\n\r\n", b"400 Bad Request"),
        (b"GET /\xff HTTP/1.1\r\n\r\n", b"400 Bad Request"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431 Request Header Fields"),
        (b"POST /clients/9/disconnect HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
         b"501 Not Implemented"),
        (b"POST /clients/9/disconnect HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
         b"413 Request Entity Too Large"),
        (b"POST /clients/9/disconnect HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody",
         b"404 Not Found"),
        (b"GET /metrics HTTP/1.0\r\n\r\n", b"200 OK"),
    ],
)
async def test_malformed_requests(
    lab: tuple[LabState, Metrics, AdminServer, str], request_bytes: bytes, status: bytes
) -> None:
    _, _, admin, _ = lab
    port = admin.addresses[0].port  # type: ignore[union-attr]
    answer = await raw(port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"Connection: close\r\n" in answer


async def test_silent_client_times_out(
    lab: tuple[LabState, Metrics, AdminServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbdqcow.admin

    monkeypatch.setattr(nbdqcow.admin, "REQUEST_TIMEOUT", 0.2)
    _, _, admin, _ = lab
    answer = await raw(admin.addresses[0].port, b"GET / HT")  # type: ignore[union-attr]
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")


async def test_unix_socket_endpoint(tmp_path: Path) -> None:
    path = str(tmp_path / "admin.sock")
    state = LabState(exports_=[ExportStatus("e", "/e.raw", "raw", False, "", 512, 0)])
    async with AdminServer(state, Metrics()) as admin:
        await admin.start(UnixAddress(path))
        assert admin.addresses == [UnixAddress(path)]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, "owner only: no authentication"

        def get() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("localhost", timeout=10)
            conn.sock = socket.socket(socket.AF_UNIX)
            conn.sock.connect(path)
            conn.request("GET", "/exports")
            resp = conn.getresponse()
            out = resp.status, resp.read()
            conn.close()
            return out

        status, body = await asyncio.to_thread(get)
        assert status == 200 and json.loads(body)["exports"][0]["name"] == "e"

        with pytest.raises(AdminError, match="another process listens there"):
            await AdminServer(state, Metrics()).start(UnixAddress(path))
    assert not os.path.exists(path), "the socket file is removed on close"


async def test_unix_socket_stale_and_non_socket(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: a crashed server's leftover
    async with AdminServer(LabState(), Metrics()) as admin:
        await admin.start(UnixAddress(str(path)))
        assert admin.addresses == [UnixAddress(str(path))]

    plain = tmp_path / "plain"
    plain.write_text("keep me")
    with pytest.raises(AdminError, match="exists and is not a socket"):
        await AdminServer(LabState(), Metrics()).start(UnixAddress(str(plain)))
    assert plain.read_text() == "keep me"


async def test_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(AdminError, match=rf"admin endpoint 127\.0\.0\.1:{port}: .*in use"):
            await AdminServer(LabState(), Metrics()).start(TcpAddress("127.0.0.1", port))


# -- any bytes in, an HTTP answer (or a clean close) out ------------------------


@pytest.fixture(scope="module")
def threaded_admin() -> Iterator[tuple[int, list[logging.LogRecord]]]:
    """An endpoint on its own loop in a thread, for blocking Hypothesis clients."""
    loop = asyncio.new_event_loop()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.setLevel(logging.ERROR)
    logging.getLogger().addHandler(handler)
    admin = AdminServer(LabState(exports_=[ExportStatus("e", "/e", None, False, "", 1, 0)]),
                        Metrics())
    loop.run_until_complete(admin.start(TcpAddress("127.0.0.1", 0)))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield admin.addresses[0].port, records  # type: ignore[union-attr]
    finally:
        async def stop() -> None:
            admin.close()
            await admin.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        logging.getLogger().removeHandler(handler)


TOKENS = st.sampled_from(["GET", "POST", "HEAD", "PUT", "", " ", "/", "/exports", "/clients",
                          "/clients/1/disconnect", "/metrics", "HTTP/1.1", "HTTP/1.0",
                          "HTTP/2", "\r\n", ":", "Content-Length", "Transfer-Encoding",
                          "0", "5", "-1", "99999999", "\x00", "é"])
REQUESTS = st.one_of(
    st.binary(max_size=200),
    st.lists(TOKENS, max_size=30).map(lambda ts: "".join(ts).encode("utf-8")),
    st.lists(TOKENS, max_size=20).map(lambda ts: ("".join(ts) + "\r\n\r\n").encode("utf-8")),
)
STATUSES = {200, 400, 404, 405, 408, 413, 431, 501}


@settings(max_examples=150, deadline=None)
@given(data=REQUESTS)
def test_any_input_gets_an_answer_or_a_clean_close(
    threaded_admin: tuple[int, list[logging.LogRecord]], data: bytes
) -> None:
    port, records = threaded_admin
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    if answer:
        head, _, body = answer.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n")[0].decode()
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1" and int(status) in STATUSES, status_line
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                      if h.lower().startswith(b"content-length:"))
        assert len(body) == length or (data.startswith(b"HEAD ") and body == b"")
    else:
        assert data == b"", "only a client that sent nothing gets no answer"
    assert records == [], [r.getMessage() for r in records]

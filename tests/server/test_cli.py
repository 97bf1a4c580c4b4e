"""``nbdqcow serve`` as an operator runs it: a subprocess, signals, exit
status, one-line errors, the listening address in the log."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import tools
from tests.interop import harness
from tests.server.conftest import pattern
from tests.server.nbdclient import NbdClient


def nbdqcow(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdqcow", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "/nonexistent/disk.img"], "/nonexistent/disk.img: No such file"),
        (["serve", "--tls", "required", "{img}"], "--tls required needs --tls-certs"),
        (["serve", "--tls-certs", "{tmp}/nocerts", "{img}"], "not found"),
        (["serve", "-x", "a", "-x", "b", "{img}"], "2 export names for 1 images"),
        (["serve", "-x", "a", "-x", "a", "{img}", "{img}"], "defined twice"),
        (["serve", "--handshake-timeout", "0", "{img}"], "must be positive"),
        (["serve", "--format", "qcow2", "{img}"], "qcow2"),
        (["serve", "--bind", "300.1.1.1", "--port", "1", "{img}"], "300.1.1.1:1: "),
        (["serve", "--socket", "{tmp}", "{img}"], "{tmp}: Address already in use"),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(65536))
    r = nbdqcow(*[a.format(img=img, tmp=tmp_path) for a in args])
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdqcow: error: "), r.stderr
    assert message.format(tmp=tmp_path) in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_logs_address_and_stops_cleanly(tmp_path: Path, sig: int) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(pattern())
    s = harness.serve(tmp_path, img, transport="unix")
    try:
        async def use() -> None:
            c = await NbdClient.connect(str(s.socket_path))
            assert await c.pwrite(0, b"\x42" * 4096) == 0
            await c.disconnect()

        asyncio.run(use())
    finally:
        rc = s.stop(sig)
    log = s.stderr()
    assert rc == 0, log
    assert f"listening on unix:{s.socket_path}" in log
    # connection 1 is the harness's readiness probe (closed before the
    # handshake); one line per connection, when it ends
    assert re.search(r"connection 1 unix (?:dropped|closed): .*\(no export\)", log), log
    assert re.search(r"connection 2 unix closed: client disconnected \(export 'disk', "
                     r"1 requests, 0 errors, [0-9.]+ s\)", log), log
    assert "Traceback" not in log
    assert "server stopped" in log
    assert not Path(str(s.socket_path)).exists()  # socket file removed
    assert img.read_bytes()[:4096] == b"\x42" * 4096


def test_tcp_default_address_and_port_zero(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(65536))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdqcow", "serve", "--port", "0", str(img)],
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 15
        line = ""
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "listening on" in line:
                break
        m = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", line)
        assert m, line
        assert int(m.group(1)) > 0
        # the export name defaults to the file name
        assert "'disk.raw'" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_embedding_example(tmp_path: Path) -> None:
    """examples/embed_server.py runs the server inside its own asyncio program."""
    nbdinfo = tools.require("nbdinfo")
    img = tmp_path / "disk.raw"
    img.write_bytes(pattern())
    sock = tmp_path / "embed.sock"
    example = Path(__file__).resolve().parents[2] / "examples" / "embed_server.py"
    proc = subprocess.Popen([sys.executable, str(example), str(img), str(sock)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = subprocess.run([nbdinfo, "--json", f"nbd+unix:///disk?socket={sock}"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        exp = json.loads(out.stdout)["exports"][0]
        assert exp["export-size"] == len(pattern())
        assert exp["description"] == "embedded example"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "server stopped" in err, err
    assert not os.path.exists(sock)


def test_systemd_socket_activation(tmp_path: Path) -> None:
    """LISTEN_FDS/LISTEN_PID (sd_listen_fds(3)): serve on the passed socket."""
    img = tmp_path / "disk.raw"
    img.write_bytes(pattern())
    path = str(tmp_path / "activated.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen()
    # The socket must be fd 3 and LISTEN_PID the server's own pid: a small
    # launcher moves the descriptor, sets the variables and execs the server
    # (same pid), as systemd does.
    launcher = (
        "import os, sys\n"
        f"os.dup2({lsock.fileno()}, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'nbdqcow', 'serve', '-x', 'disk',"
        f" {str(img)!r}])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], stderr=subprocess.PIPE,
                            text=True, pass_fds=(lsock.fileno(),))
    lsock.close()
    try:
        async def use() -> bool:
            for _ in range(200):
                try:
                    c = await NbdClient.connect(path)
                except (ConnectionError, FileNotFoundError):
                    await asyncio.sleep(0.05)  # still starting
                    continue
                assert await c.pread(0, 4096) == pattern()[:4096]
                await c.disconnect()
                return True
            return False

        served = asyncio.run(use())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert served, err
    assert proc.returncode == 0, err
    assert f"listening on unix:{path}" in err, err
    assert "10809" not in err  # no default TCP listener next to the passed socket


def _http_get(sock_path: str, path: str) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: nbdqcow\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_serve_from_config_file(tmp_path: Path) -> None:
    """--config: listeners, exports with policy, the admin endpoint and JSON logs
    all come from an exports.toml (nbdqcow.config)."""
    img = tmp_path / "disk.raw"
    img.write_bytes(pattern())
    cfg = tmp_path / "exports.toml"
    cfg.write_text(
        '[server]\n'
        'listen = ["unix:nbd.sock"]\n'
        'admin = "unix:admin.sock"\n'
        'log_format = "json"\n'
        '[exports.disk]\n'
        'image = "disk.raw"\n'
        'description = "from the config"\n'
        '[exports.hidden]\n'
        'image = "disk.raw"\n'
        'read_only = true\n'
        'allow_unix = false\n'
    )
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen([sys.executable, "-m", "nbdqcow", "serve", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not (tmp_path / "admin.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = subprocess.run([tools.require("nbdinfo"), "--list", "--json",
                              f"nbd+unix:///?socket={sock}"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        exports = json.loads(out.stdout)["exports"]
        assert [(e["export-name"], e.get("description")) for e in exports] == [
            ("disk", "from the config")]
        status, body = _http_get(str(tmp_path / "admin.sock"), "/exports")
        assert status == 200
        names = {e["name"] for e in json.loads(body)["exports"]}
        assert names == {"disk", "hidden"}
        status, body = _http_get(str(tmp_path / "admin.sock"), "/metrics")
        assert status == 200 and b"nbdqcow_connections_total" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines()]
    assert any("listening on unix:" in r["message"] for r in lines), err
    assert {r["level"] for r in lines} <= {"info", "warning"}


def test_config_and_images_are_exclusive(tmp_path: Path) -> None:
    cfg = tmp_path / "exports.toml"
    cfg.write_text("")
    r = nbdqcow("serve", "--config", str(cfg), str(cfg))
    assert r.returncode == 1 and "--config FILE replaces IMAGE" in r.stderr, r.stderr
    r = nbdqcow("serve")
    assert r.returncode == 1 and "no IMAGE to serve" in r.stderr, r.stderr

"""Socket activation, SIGTERM under load and the admin endpoint, each on the
real ``nbdqcow serve`` subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import tools
from tests.nbdclient import NbdClient
from tests.ops.conftest import LIBNBD_CLIENT, Spawn, free_port, make_image, run


def test_socket_activation_with_config(tmp_path: Path, spawn: Spawn) -> None:
    """The listening socket is made here and passed as fd 3 with LISTEN_PID set
    to the server's own pid (``exec`` keeps the launcher's pid), as systemd does."""
    make_image(tmp_path / "lab.qcow2", pattern=0x5A)
    cfg = tmp_path / "exports.toml"
    # the configured listener must not be bound under activation: make it busy
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{busy.getsockname()[1]}"]\n\n'
                   '[exports.lab]\nimage = "lab.qcow2"\n')
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    fd = lsock.fileno()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    launcher = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"  # dup2 makes fd 3 inheritable
        f"os.close({fd})\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='nbd')\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    s = spawn(command=[sys.executable, "-c", launcher, "-m", "nbdqcow",
                       "serve", "--config", str(cfg)],
              pass_fds=(fd,), env=env, wait_log="listening on")
    lsock.close()  # only the server holds it now
    assert f"listening on tcp:127.0.0.1:{port}" in s.log()
    r = run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M",
             f"nbd://127.0.0.1:{port}/lab"])
    assert "Pattern verification failed" not in r.stdout, r.stdout
    assert s.stop() == 0
    busy.close()


def test_sigterm_during_write_stream_leaves_clean_image(tmp_path: Path, spawn: Spawn) -> None:
    tools.require_libnbd_python()
    img = make_image(tmp_path / "d.qcow2", size="64M")
    sock = str(tmp_path / "nbd.sock")
    s = spawn("--socket", sock, "-x", "d", str(img), ready=sock)
    writer = subprocess.Popen(
        ["/usr/bin/python3", str(LIBNBD_CLIENT), "write_until_closed",
         f"nbd+unix:///d?socket={sock}", "1024"],
        stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "started"  # 32 writes acknowledged
    assert s.stop(signal.SIGTERM) == 0
    out, _ = writer.communicate(timeout=60)
    acked = json.loads(out.strip().splitlines()[-1])["acked"]
    assert len(acked) >= 32
    check = run(["qemu-img", "check", "--output=json", str(img)], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    # every acknowledged write is in the image (SIGTERM flushes before exit)
    cmds = []
    for i in sorted(acked)[:: max(1, len(acked) // 16)]:
        cmds += ["-c", f"read -P {i % 250 + 1} {i * 65536} 64k"]
    r = run(["qemu-io", "-f", "qcow2", *cmds, str(img)])
    assert "Pattern verification failed" not in r.stdout, r.stdout


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def test_admin_endpoint_json_metrics_and_drop(tmp_path: Path, spawn: Spawn) -> None:
    img = make_image(tmp_path / "d.raw", fmt="raw", size="4M")
    port, admin_port = free_port(), free_port()
    s = spawn("--port", str(port), "--admin", f"127.0.0.1:{admin_port}", "-x", "d", str(img),
              ready=("127.0.0.1", port))
    base = f"http://127.0.0.1:{admin_port}"
    c = NbdClient.connect_tcp("127.0.0.1", port)
    c.handshake()
    c.go("d")
    c.write(0, b"\x77" * 65536)
    assert c.read(0, 65536) == b"\x77" * 65536

    status, ctype, body = _get(f"{base}/exports")
    assert status == 200 and ctype.startswith("application/json")
    exports = json.loads(body)["exports"]
    assert [e["name"] for e in exports] == ["d"]
    clients = json.loads(_get(f"{base}/clients")[2])["clients"]
    assert len(clients) == 1 and clients[0]["export"] == "d", clients
    client_id = str(clients[0]["id"])

    _, ctype, body = _get(f"{base}/metrics")
    assert ctype.startswith("text/plain")
    samples = {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
               for m in text_string_to_metric_families(body.decode())
               for smp in m.samples}
    assert samples[("nbdqcow_requests_total",
                    (("command", "WRITE"), ("export", "d")))] == 1
    assert samples[("nbdqcow_request_bytes_total",
                    (("command", "READ"), ("export", "d")))] == 65536
    assert any(name == "nbdqcow_request_duration_seconds_bucket" for name, _ in samples)

    req = urllib.request.Request(f"{base}/clients/{client_id}/disconnect", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.loads(resp.read()) == {"disconnected": client_id}
    deadline = time.monotonic() + 10
    while json.loads(_get(f"{base}/clients")[2])["clients"]:
        assert time.monotonic() < deadline, "client still listed after the drop"
        time.sleep(0.05)
    with pytest.raises((EOFError, OSError)):  # the server hung up on it
        c.read(0, 512)
    c.close()
    assert s.stop() == 0

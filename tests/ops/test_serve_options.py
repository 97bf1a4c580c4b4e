"""``nbdqcow serve`` flags, each exercised on the real command with real clients."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest

from tests import tools
from tests.interop.certs import make_ca
from tests.nbdclient import NbdClient
from tests.ops.conftest import Spawn, free_port, libnbd, make_image, run


def test_export_pairs_with_descriptions(tmp_path: Path, spawn: Spawn) -> None:
    tools.require("nbdinfo")
    a = make_image(tmp_path / "a.qcow2", pattern=0xA1)
    b = make_image(tmp_path / "b.raw", fmt="raw", pattern=0xB2)
    sock = str(tmp_path / "nbd.sock")
    spawn("--socket", sock, "--export", f"alpha={a}", "--export", f"beta={b}",
          "-D", "first disk", "-D", "second disk", ready=sock)
    listed = json.loads(run(["nbdinfo", "--list", "--json",
                             f"nbd+unix:///?socket={sock}"]).stdout)
    got = {e["export-name"]: e.get("description") for e in listed["exports"]}
    assert got == {"alpha": "first disk", "beta": "second disk"}
    # each name reaches its own image, probed by magic (qcow2 and raw)
    for name, pat in (("alpha", "0xa1"), ("beta", "0xb2")):
        r = run(["qemu-io", "-f", "raw", "-c", f"read -P {pat} 0 1M",
                 f"nbd+unix:///{name}?socket={sock}"])
        assert "Pattern verification failed" not in r.stdout, r.stdout


def test_format_flag_is_obeyed_not_probed(tmp_path: Path, spawn: Spawn) -> None:
    img = make_image(tmp_path / "d.qcow2", size="4M")
    sock = str(tmp_path / "nbd.sock")
    # --export NAME without "=": the name of the positional IMAGE, like -x
    spawn("--socket", sock, "--format", "raw", "--export", "d", str(img), ready=sock)
    with NbdClient.connect_unix(sock) as c:
        c.handshake()
        info = c.go("d")
        # served as raw: the client sees the qcow2 file itself, magic and all
        assert info.size == img.stat().st_size
        assert c.read(0, 4) == b"QFI\xfb"
        c.disconnect()


def test_max_connections(tmp_path: Path, spawn: Spawn) -> None:
    img = make_image(tmp_path / "d.raw", fmt="raw", size="1M")
    sock = str(tmp_path / "nbd.sock")
    s = spawn("--socket", sock, "--max-connections", "1", "-x", "d", str(img), ready=sock)
    s.wait_log("connection 1 unix ")  # the readiness probe has gone
    first = NbdClient.connect_unix(sock)
    first.handshake()
    first.go("d")
    with NbdClient.connect_unix(sock) as second, pytest.raises((EOFError, OSError)):
        second.handshake()
        second.go("d")
    assert "refused: 1 clients already" in s.log()
    first.disconnect()
    first.close()
    s.wait_log("connection 2 unix closed")
    with NbdClient.connect_unix(sock) as third:  # the slot is free again
        third.handshake()
        assert third.go("d").size == 1 << 20
        third.disconnect()


def test_pid_file_and_quiet(tmp_path: Path, spawn: Spawn) -> None:
    img = make_image(tmp_path / "d.raw", fmt="raw", size="1M")
    sock, pid_file = str(tmp_path / "nbd.sock"), tmp_path / "run" / "nbdqcow.pid"
    pid_file.parent.mkdir()
    s = spawn("--socket", sock, "--quiet", "--pid-file", str(pid_file), str(img), ready=sock)
    assert pid_file.read_text() == f"{s.proc.pid}\n"
    run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", f"nbd+unix:///?socket={sock}"])
    assert s.stop(signal.SIGTERM) == 0
    assert s.log() == ""  # --quiet: no info lines
    assert not pid_file.exists()


def test_log_format_json_and_verbose(tmp_path: Path, spawn: Spawn) -> None:
    img = make_image(tmp_path / "d.raw", fmt="raw", size="1M")
    sock = str(tmp_path / "nbd.sock")
    s = spawn("--socket", sock, "-v", "--log-format", "json", str(img), ready=sock)
    run(["qemu-io", "-f", "raw", "-c", "read 0 4k", f"nbd+unix:///?socket={sock}"])
    assert s.stop() == 0
    records = [json.loads(line) for line in s.log().splitlines()]
    assert {"time", "level", "logger", "pid", "message"} <= set(records[0])
    assert any(r["message"].startswith("listening on unix:") for r in records)
    assert any(r["level"] == "debug" for r in records)  # -v


def test_tls_files_and_required_refuses_plaintext(tmp_path: Path, spawn: Spawn) -> None:
    certs = make_ca(tmp_path / "pki")
    img = make_image(tmp_path / "d.raw", fmt="raw", size="1M")
    port = free_port()
    spawn("--port", str(port), "--tls", "required", "--tls-cert",
          str(certs / "server-cert.pem"), "--tls-key", str(certs / "server-key.pem"),
          "--tls-ca", str(certs / "ca-cert.pem"), "-x", "d", str(img),
          ready=("127.0.0.1", port))
    plain = libnbd("plain", f"nbd://127.0.0.1:{port}/d")
    assert plain["connected"] is False, plain
    secured = libnbd("tls", f"nbds://127.0.0.1:{port}/d", str(certs))
    assert secured == {"connected": True, "tls": True, "roundtrip": True}


def test_create_demo_prints_working_commands(tmp_path: Path, spawn: Spawn) -> None:
    tools.require("nbdinfo")
    tools.require("nbd-client")
    img = tmp_path / "demo.qcow2"
    sock = str(tmp_path / "nbd.sock")
    s = spawn("--create", "1G", "--socket", sock, str(img), ready=sock)
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(img)]).stdout)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 1 << 30)
    s.wait_log("listening on")
    commands = [line.strip() for line in s.stdout().splitlines()[1:] if line.strip()]
    assert [c.split()[0] for c in commands] == ["qemu-io", "nbdinfo", "nbd-client"], commands
    qemu_io = run(shlex.split(commands[0]))
    assert "read 512/512 bytes" in qemu_io.stdout
    assert "1073741824" in run(shlex.split(commands[1])).stdout
    # no /dev/nbd0 here: list the exports through the same target instead
    argv = shlex.split(commands[2])
    target = argv[1:argv.index("/dev/nbd0")]
    assert "demo.qcow2" in run(["nbd-client", "-l", *target]).stdout
    assert s.stop() == 0
    # a second start finds the image and serves it as it is
    os.truncate(img, img.stat().st_size)
    s2 = spawn("--create", "1G", "--socket", sock, str(img), ready=sock)
    assert "created" not in s2.log()
    assert s2.stop() == 0


def test_snapshot_read_only_and_connection_limits(tmp_path: Path, spawn: Spawn) -> None:
    img = make_image(tmp_path / "d.qcow2", pattern=0x61)
    run(["qemu-img", "snapshot", "-c", "s1", str(img)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x62 0 1M", str(img)])
    port = free_port()
    s = spawn("--bind", "127.0.0.1", "--port", str(port), "-l", "s1", "--handshake-timeout",
              "1", "--max-in-flight", "4", "-x", "snap", str(img), ready=("127.0.0.1", port))
    uri = f"nbd://127.0.0.1:{port}/snap"
    r = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x61 0 1M", uri])
    assert "Pattern verification failed" not in r.stdout, r.stdout  # the snapshot's data
    w = run(["qemu-io", "-f", "raw", "-c", "write -P 0x63 0 4k", uri], check=False)
    assert w.returncode != 0 or "failed" in w.stdout + w.stderr, w
    # --handshake-timeout: a client that never answers the greeting is dropped
    with NbdClient.connect_tcp("127.0.0.1", port) as idle:
        idle.recv_exact(18)  # greeting; now say nothing
        t0 = time.monotonic()
        with pytest.raises(EOFError):
            idle.recv_exact(1)
        assert time.monotonic() - t0 < 10
    assert s.stop() == 0
    run(["qemu-img", "check", str(img)])
    r = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x62 0 1M", str(img)])
    assert "Pattern verification failed" not in r.stdout  # the active layer untouched


def test_tls_optional_with_cert_dir_and_client_certs(tmp_path: Path, spawn: Spawn) -> None:
    certs = make_ca(tmp_path / "pki")
    img = make_image(tmp_path / "d.raw", fmt="raw", size="1M")
    port = free_port()
    spawn("--port", str(port), "--tls", "optional", "--tls-certs", str(certs),
          "--tls-verify-peer", "-x", "d", str(img), ready=("127.0.0.1", port))
    plain = libnbd("plain", f"nbd://127.0.0.1:{port}/d")
    assert plain == {"connected": True, "size": 1 << 20}  # optional: plaintext allowed
    secured = libnbd("tls", f"nbds://127.0.0.1:{port}/d", str(certs))
    assert secured == {"connected": True, "tls": True, "roundtrip": True}


def test_create_raw(tmp_path: Path, spawn: Spawn) -> None:
    img = tmp_path / "demo.raw"
    port = free_port()
    s = spawn("--create", "8M", "--format", "raw", "--port", str(port), str(img),
              ready=("127.0.0.1", port))
    assert img.stat().st_size == 8 << 20 and img.stat().st_blocks == 0  # sparse
    with NbdClient.connect_tcp("127.0.0.1", port) as c:
        c.handshake()
        assert c.go("demo.raw").size == 8 << 20
        c.disconnect()
    assert f"nbdinfo nbd://127.0.0.1:{port}/demo.raw" in s.stdout()
    assert s.stop() == 0


def test_event_loop_uvloop_serves_reads_writes_and_tls(tmp_path: Path, spawn: Spawn) -> None:
    """The optional uvloop event loop runs the same server: qemu-io writes
    (inline, FUA, allocating) and reads back over a Unix socket, the image
    stays clean, and a TLS client is served too."""
    tools.require("qemu-io")
    img = make_image(tmp_path / "d.qcow2", size="16M", pattern=0x11)
    sock = str(tmp_path / "nbd.sock")
    server = spawn("--socket", sock, "--event-loop", "uvloop", str(img), ready=sock)
    uri = f"nbd+unix:///?socket={sock}"
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 4096 8192",
         "-c", "write -f -P 0x33 8M 64k", "-c", "flush", uri])
    r = run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 0 4096", "-c", "read -P 0x22 4096 8192",
             "-c", "read -P 0x33 8M 64k", "-c", "read -P 0 9M 1M", uri])
    assert "Pattern verification failed" not in r.stdout, r.stdout
    assert server.stop() == 0
    run(["qemu-img", "check", str(img)])
    certs = make_ca(tmp_path / "pki")
    port = free_port()
    spawn("--port", str(port), "--event-loop", "uvloop", "--tls", "required",
          "--tls-certs", str(certs), "-x", "d", str(img), ready=("127.0.0.1", port))
    secured = libnbd("tls", f"nbds://127.0.0.1:{port}/d", str(certs))
    assert secured == {"connected": True, "tls": True, "roundtrip": True}


def test_event_loop_uvloop_missing_is_a_clear_error(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.raw", fmt="raw", size="1M")
    code = ("import sys; sys.modules['uvloop'] = None; from nbdqcow.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = run([sys.executable, "-c", code, "serve", "--socket", str(tmp_path / "s"),
             "--event-loop", "uvloop", str(img)], check=False)
    assert r.returncode != 0
    assert "uvloop" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(("flag", "polls"), [(None, True), ("0", False)],
                         ids=["default", "off"])
def test_poll_max_us(tmp_path: Path, spawn: Spawn, flag: str | None, polls: bool) -> None:
    """Busy polling for a lone client's next request (nbdqcow.poll) is on
    by default and ``--poll-max-us 0`` turns it off: its probes are the
    server's ``recvfrom(..., MSG_PEEK)`` calls, seen with strace while
    qemu-io reads at queue depth 1."""
    strace = tools.require("strace")
    img = make_image(tmp_path / "d.raw", fmt="raw", size="1M", pattern=0x5C)
    sock = str(tmp_path / "nbd.sock")
    trace, pid_file = tmp_path / "trace", tmp_path / "pid"
    extra = [] if flag is None else ["--poll-max-us", flag]
    s = spawn(command=[strace, "-f", "-e", "trace=recvfrom", "-o", str(trace),
                       sys.executable, "-m", "nbdqcow", "serve", "--socket", sock,
                       "--pid-file", str(pid_file), *extra, str(img)], ready=sock)
    reads = [arg for i in range(20) for arg in ("-c", f"read -P 0x5c {i * 4096} 4096")]
    r = run(["qemu-io", "-f", "raw", *reads, f"nbd+unix:///?socket={sock}"])
    assert "Pattern verification failed" not in r.stdout, r.stdout
    os.kill(int(pid_file.read_text()), signal.SIGTERM)  # the server, not strace
    assert s.proc.wait(20) == 0
    peeks = trace.read_text().count("MSG_PEEK")
    assert (peeks > 0) == polls, peeks


def test_poll_max_us_is_checked(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.raw", fmt="raw", size="1M")
    r = run([sys.executable, "-m", "nbdqcow", "serve", "--socket", str(tmp_path / "s"),
             "--poll-max-us", "-1", str(img)], check=False)
    assert r.returncode == 1 and "--poll-max-us must be 0 to 1000, not -1" in r.stderr
    assert "Traceback" not in r.stderr

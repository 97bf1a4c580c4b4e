"""nbdqcow.healthcheck against real NBD servers (qemu-nbd, nbdkit) and real non-servers.

Our own server may not be ready when this runs, and the health check must
work against any conforming server anyway, so the references are qemu-nbd
and nbdkit; expected sizes come from ``qemu-img info``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tools
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdqcow.config import TcpAddress, UnixAddress
from nbdqcow.healthcheck import (
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC,
    ExportInfo,
    HealthError,
    ProbeResult,
    probe,
)

pytestmark = pytest.mark.interop


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until the server accepts on ``path`` (the file appears at bind(), before listen())."""
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {proc.communicate()[1]!r}") from None
            time.sleep(0.02)


def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {proc.communicate()[1]!r}") from None
            time.sleep(0.02)


@contextmanager
def running(cmd: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "golden.qcow2"
    subprocess.run([tools.require("qemu-img"), "create", "-q", "-f", "qcow2", str(path), "3M"],
                   check=True)
    return path


def virtual_size(path: Path) -> int:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(json.loads(out)["virtual-size"])


def healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    """The command exactly as the Dockerfile's HEALTHCHECK runs it."""
    return subprocess.run([sys.executable, "-m", "nbdqcow.healthcheck", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def qemu_nbd(tmp_path: Path, image: Path) -> Iterator[Path]:
    sock = tmp_path / "nbd.sock"
    cmd = [tools.require("qemu-nbd"), "--persistent", "--shared=4", "-k", str(sock),
           "-x", "golden", "-D", "installed base", "-f", "qcow2", str(image)]
    with running(cmd) as proc:
        wait_for_socket(sock, proc)
        yield sock


def test_list_over_unix_socket(qemu_nbd: Path) -> None:
    result = probe(UnixAddress(str(qemu_nbd)))
    assert result == ProbeResult(exports=(ExportInfo("golden", "installed base"),))
    r = healthcheck(f"unix:{qemu_nbd}")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"healthy: unix:{qemu_nbd}: 1 export(s): 'golden'\n"
    assert healthcheck("--quiet", f"unix:{qemu_nbd}").stdout == ""


def test_export_info(qemu_nbd: Path, image: Path) -> None:
    result = probe(UnixAddress(str(qemu_nbd)), export="golden")
    assert result.exports == (ExportInfo("golden", size=virtual_size(image)),)

    r = healthcheck("-x", "nope", f"unix:{qemu_nbd}")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"unhealthy: unix:{qemu_nbd}: export 'nope': server replied "
                               "ERR_UNKNOWN")


def test_tcp_and_polite_goodbye(tmp_path: Path, image: Path) -> None:
    """qemu-nbd complains on stderr about clients that vanish without NBD_OPT_ABORT."""
    from tests.interop.harness import free_port

    port = free_port()
    cmd = [tools.require("qemu-nbd"), "--persistent", "-b", "127.0.0.1", "-p", str(port),
           "-x", "golden", "-f", "qcow2", str(image)]
    with running(cmd) as proc:
        wait_for_port(port, proc)  # (this probe itself makes qemu-nbd log one complaint)
        for args in ([], ["-x", "golden"], ["-x", "missing"]):
            healthcheck(*args, f"127.0.0.1:{port}")
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    complaints = [line for line in err.decode().splitlines() if "negotiation failed" in line]
    assert len(complaints) == 1, err.decode()  # the bare connect of wait_for_port


def test_nbdkit_and_oldstyle(tmp_path: Path) -> None:
    nbdkit = tools.require("nbdkit")
    sock = tmp_path / "kit.sock"
    with running([nbdkit, "-f", "-U", str(sock), "memory", "1M"]) as proc:
        wait_for_socket(sock, proc)
        assert probe(UnixAddress(str(sock))).exports == (ExportInfo(""),)
        assert probe(UnixAddress(str(sock)), export="").exports[0].size == 1 << 20
    sock.unlink(missing_ok=True)
    with running([nbdkit, "-f", "--oldstyle", "-U", str(sock), "memory", "1M"]) as proc:
        wait_for_socket(sock, proc)
        assert probe(UnixAddress(str(sock))).oldstyle
        assert healthcheck(f"unix:{sock}").stdout.endswith(": oldstyle NBD server\n")


def test_tls_required_server_is_healthy(tmp_path: Path) -> None:
    from tests.interop.certs import make_ca

    certs = make_ca(tmp_path / "pki")
    sock = tmp_path / "tls.sock"
    cmd = [tools.require("nbdkit"), "-f", "--tls=require", f"--tls-certificates={certs}",
           "-U", str(sock), "memory", "1M"]
    with running(cmd) as proc:
        wait_for_socket(sock, proc)
        assert probe(UnixAddress(str(sock))).tls_required
        r = healthcheck(f"unix:{sock}")
        assert (r.returncode, r.stdout) == (0, f"healthy: unix:{sock}: NBD server (requires TLS)\n")


@contextmanager
def fake_server(behaviour: str) -> Iterator[int]:
    """A TCP server that is not a (working) NBD server."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(30)
    stop = threading.Event()

    def serve() -> None:
        try:
            conn, _ = srv.accept()  # the health check connects exactly once
        except OSError:
            return
        with conn:
            if behaviour == "ssh":
                conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            elif behaviour == "truncated":
                conn.sendall(b"NBDMAGIC")
            elif behaviour == "silent":
                stop.wait(5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        srv.close()
        thread.join(10)


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("ssh", "not an NBD server (greeting 0x5353482d322e302d)"),
        ("truncated", "the server closed the connection during the handshake"),
        ("silent", "no answer within 0.3s"),
    ],
)
def test_not_nbd_servers_are_unhealthy(behaviour: str, message: str) -> None:
    with fake_server(behaviour) as port:
        r = healthcheck("--timeout", "0.3", f"127.0.0.1:{port}")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"unhealthy: 127.0.0.1:{port}: {message}\n"


def test_nothing_listening(tmp_path: Path) -> None:
    from tests.interop.harness import free_port

    port = free_port()
    r = healthcheck(f"127.0.0.1:{port}")
    assert (r.returncode, r.stderr) == (1, f"unhealthy: 127.0.0.1:{port}: Connection refused\n")
    r = healthcheck(f"unix:{tmp_path}/none.sock")
    assert r.returncode == 1 and "No such file or directory" in r.stderr
    with pytest.raises(ConnectionRefusedError):
        probe(TcpAddress("127.0.0.1", port))


def test_bad_usage_is_one_line() -> None:
    r = healthcheck("host:notaport")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "port 'notaport' is not a number from 0 to 65535"
    )
    assert "Traceback" not in r.stderr



# -- whatever a server sends, the check answers healthy/unhealthy, never crashes --

GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)


def reply(opt: int, rtype: int, data: bytes) -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, opt, rtype, len(data)) + data


REPLIES = st.one_of(
    st.binary(max_size=64),
    st.tuples(
        st.sampled_from([3, 6, 2, 99]),
        st.sampled_from([1, 2, 3, 1 << 31, (1 << 31) + 5, (1 << 31) + 6, 7]),
        st.binary(max_size=24),
    ).map(lambda t: reply(*t)),
)


@settings(max_examples=80, deadline=None)
@given(
    prefix=st.sampled_from([GREETING, GREETING[:10], b"", struct.pack(">QQ", NBDMAGIC, 1)]),
    replies=st.lists(REPLIES, max_size=4),
    export=st.sampled_from([None, "x"]),
)
def test_any_server_bytes_give_a_verdict(
    prefix: bytes, replies: list[bytes], export: str | None
) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(30)

    def serve() -> None:
        conn, _ = srv.accept()
        # The client may hang up at any point (that is its verdict): ignore resets.
        with conn, contextlib.suppress(OSError):
            conn.sendall(prefix + b"".join(replies))
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(4096):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = probe(TcpAddress("127.0.0.1", srv.getsockname()[1]), export, timeout=5)
        assert isinstance(result, ProbeResult)
    except (HealthError, OSError):
        pass  # unhealthy, with a message: the only other allowed outcome
    finally:
        thread.join(10)
        srv.close()


def test_against_nbdqcow_serve(tmp_path: Path) -> None:
    """The check against our own server, started as an operator would."""
    pytest.importorskip("nbdqcow.server", reason="the NBD server is not in this tree yet")
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * (1 << 20))
    sock = tmp_path / "nbd.sock"
    cmd = [sys.executable, "-m", "nbdqcow", "serve", "--socket", str(sock), "--read-only",
           "-x", "disk", "-D", "a raw disk", str(image)]
    with running(cmd) as proc:
        wait_for_socket(sock, proc)
        assert probe(UnixAddress(str(sock))) == ProbeResult(
            exports=(ExportInfo("disk", "a raw disk"),)
        )
        assert probe(UnixAddress(str(sock)), export="disk").exports[0].size == 1 << 20
        r = healthcheck(f"unix:{sock}", "-x", "nope")
        assert r.returncode == 1 and "ERR_UNKNOWN" in r.stderr

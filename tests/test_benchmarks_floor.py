"""The floor server (``benchmarks/floor.py``) is a correct NBD server for
the clients the harness drives, so its figures are figures of real work.

Every check goes through a real client (qemu-io, qemu-img, nbdinfo,
nbdcopy) and compares bytes with the file served; one hand-made request
checks that a malformed header drops that client and nobody else.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tools

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parent.parent
SIZE = 64 << 20


class Floor:
    def __init__(self, image: Path, sock: Path, *, read_only: bool = False) -> None:
        argv = [sys.executable, "-m", "benchmarks.floor", "--socket", str(sock)]
        argv += ["--read-only", str(image)] if read_only else [str(image)]
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        self.proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "floor did not start"
            time.sleep(0.02)

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=10)
        return err.decode()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


@pytest.fixture
def floor(image: Path, tmp_path: Path) -> Iterator[Floor]:
    tools.require("qemu-io")
    server = Floor(image, tmp_path / "floor.sock")
    yield server
    err = server.stop()
    assert server.proc.returncode == 0 and "Traceback" not in err, err


def _qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run([*argv, uri], capture_output=True, text=True, timeout=120)


def test_qemu_io_writes_and_reads_back(floor: Floor, image: Path) -> None:
    # 4 KiB, 256 KiB (sendfile reads) and 4 MiB requests: the last grows the
    # receive buffer past its 1 MiB and fills the socket on the way back.
    r = _qemu_io(
        floor.uri,
        "write -P 0x11 4096 4096",
        "write -P 0x22 1M 256K",
        "write -P 0x33 8M 4M",
        "write -f -P 0x44 60M 64K",  # FUA
        "flush",
        "read -P 0x11 4096 4096",
        "read -P 0x22 1M 256K",
        "read -P 0x33 8M 4M",
        "read -P 0x44 60M 64K",
        "read -P 0 0 4096",
    )
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    data = image.read_bytes()
    assert data[4096:8192] == b"\x11" * 4096
    assert data[1 << 20 : (1 << 20) + (256 << 10)] == b"\x22" * (256 << 10)
    assert data[8 << 20 : 12 << 20] == b"\x33" * (4 << 20)
    assert data[60 << 20 : (60 << 20) + (64 << 10)] == b"\x44" * (64 << 10)
    assert data[:4096] == bytes(4096)


def test_nbdinfo_sees_the_export(floor: Floor) -> None:
    tools.require("nbdinfo")
    size = subprocess.run(["nbdinfo", "--size", floor.uri], capture_output=True, text=True)
    assert size.stdout.strip() == str(SIZE), size.stderr
    multi = subprocess.run(["nbdinfo", "--can", "multi-conn", floor.uri])
    assert multi.returncode == 0  # one file, one page cache: multi-conn is safe
    ro = subprocess.run(["nbdinfo", "--is", "read-only", floor.uri])
    assert ro.returncode == 2  # "false"


def test_nbdcopy_round_trip(floor: Floor, tmp_path: Path) -> None:
    tools.require("nbdcopy")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE))
    back = tmp_path / "back.raw"
    subprocess.run(["nbdcopy", str(src), floor.uri], check=True, timeout=120)
    subprocess.run(["nbdcopy", "-C4", floor.uri, str(back)], check=True, timeout=120)
    assert back.read_bytes() == src.read_bytes()


def _libnbd(uri: str, body: str) -> list[str]:
    """Run ``body`` against ``uri`` with libnbd's Python bindings, its own
    checks off (strict mode 0), so what is refused is refused by the server."""
    python = tools.require_libnbd_python()
    script = (
        "import nbd, sys\n"
        "h = nbd.NBD(); h.set_strict_mode(0); h.connect_uri(sys.argv[1])\n"
        "try:\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "except nbd.Error as e:\n"
        "    print('refused', e.errno)\n"
        "h.shutdown()\n"
    )
    r = subprocess.run([python, "-c", script, uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_read_only_refuses_writes(image: Path, tmp_path: Path) -> None:
    server = Floor(image, tmp_path / "ro.sock", read_only=True)
    try:
        assert _libnbd(server.uri, "h.pwrite(b'x' * 4096, 0)") == ["refused", "EPERM"]
        assert _libnbd(server.uri, "print(h.pread(4096, 0) == bytes(4096))") == ["True"]
    finally:
        assert "Traceback" not in server.stop()
    assert image.read_bytes()[:4096] == bytes(4096)


def test_out_of_bounds_read_is_an_error(floor: Floor) -> None:
    assert _libnbd(floor.uri, f"h.pread(4096, {SIZE} - 2048)") == ["refused", "EINVAL"]


def test_malformed_request_drops_only_that_client(floor: Floor) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(floor.sock))
        assert s.recv(18, socket.MSG_WAITALL)[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        name = b""
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(name) + 2) +
                  struct.pack(">I", 0) + name + struct.pack(">H", 0))
        # NBD_REP_INFO (20 + 12 bytes) then NBD_REP_ACK (20).
        replies = s.recv(52, socket.MSG_WAITALL)
        assert struct.unpack_from(">QII", replies)[0] == 0x3E889045565A9
        assert struct.unpack_from(">QII", replies, 32)[2] == 1  # ACK
        s.sendall(b"\xde\xad\xbe\xef" + bytes(24))  # wrong request magic
        assert s.recv(4096) == b""  # dropped
    r = _qemu_io(floor.uri, "read -P 0 0 4096")
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr

"""Helpers for end-to-end tests of the operator surface.

Every server here is the real ``nbdqcow`` command started as a subprocess
(``python -m nbdqcow serve ...``), the way an operator or systemd runs it;
clients are the real tools (qemu-io, qemu-img, nbdinfo, libnbd's Python
bindings run by /usr/bin/python3) or the test suite's own NBD client.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tools

REPO = Path(__file__).resolve().parents[2]
LIBNBD_CLIENT = REPO / "tests" / "interop" / "libnbd_client.py"


@dataclass
class Server:
    """A running ``nbdqcow serve`` and its captured stdout/stderr."""

    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path

    def log(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 15, count: int = 1) -> str:
        """Wait until ``text`` appears ``count`` times in the log."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never logged:\n{self.log()}")
            time.sleep(0.05)
        return self.log()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return tools.stop_process(self.proc, sig, timeout, self.log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reachable(target: str | tuple[str, int]) -> bool:
    try:
        if isinstance(target, str):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(target)
        else:
            socket.create_connection(target, timeout=1).close()
        return True
    except OSError:
        return False


Spawn = Callable[..., Server]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """``spawn(*serve_args, ready=PATH|(HOST, PORT), **popen_kw)``: start the
    real command and wait until it accepts connections; killed at teardown."""
    servers: list[Server] = []

    def start(*args: str, ready: str | tuple[str, int] | None = None,
              wait_log: str | None = None, timeout: float = 20,
              command: Sequence[str] | None = None, **popen: object) -> Server:
        n = len(servers)
        out, err = tmp_path / f"serve{n}.out", tmp_path / f"serve{n}.err"
        cmd = list(command) if command is not None else [
            sys.executable, "-m", "nbdqcow", "serve", *args]
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo,
                                    stderr=fe, **popen)  # type: ignore[call-overload]
        s = Server(proc, out, err)
        servers.append(s)
        deadline = time.monotonic() + timeout
        while ready is not None and not _reachable(ready):
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{s.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server never listened:\n{s.log()}")
            time.sleep(0.05)
        if wait_log is not None:
            s.wait_log(wait_log, timeout)
        return s

    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def libnbd(scenario: str, *args: str) -> dict[str, object]:
    """Run a scenario of tests/interop/libnbd_client.py with libnbd's bindings."""
    tools.require_libnbd_python()
    r = run(["/usr/bin/python3", str(LIBNBD_CLIENT), scenario, *args], timeout=120)
    result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def libnbd_snippet(code: str, *args: str) -> dict[str, object]:
    """Run ``code`` (which prints one JSON line) under /usr/bin/python3 with libnbd."""
    tools.require_libnbd_python()
    r = run(["/usr/bin/python3", "-c", code, *args], timeout=60)
    result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def make_image(path: Path, size: str = "16M", fmt: str = "qcow2",
               pattern: int | None = None) -> Path:
    """An image made by qemu-img, optionally filled (first 1 MiB) by qemu-io."""
    tools.require("qemu-img")
    run(["qemu-img", "create", "-q", "-f", fmt, str(path), size])
    if pattern is not None:
        tools.require("qemu-io")
        run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern} 0 1M", str(path)])
    return path


def env_without_activation() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}

"""Start a real NBD server for interop tests and build client URIs for it.

By default the server is ours, run exactly as an operator would
(``python -m nbdqcow serve ...`` in a subprocess).  Setting
``NBDQCOW_TEST_SERVER=qemu-nbd`` runs the same tests against qemu-nbd
serving the same file: that is how the expectations in these tests were
validated against the reference implementation.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests import tools

IMPL = os.environ.get("NBDQCOW_TEST_SERVER", "nbdqcow")


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def host_of(transport: str) -> str:
    """``tcp`` is IPv4 loopback, ``tcp6`` IPv6 loopback."""
    return "::1" if transport == "tcp6" else "127.0.0.1"


@dataclass
class Served:
    """A running server: where it listens and how clients name an export."""

    proc: subprocess.Popen[bytes]
    transport: str
    socket_path: str | None = None
    port: int | None = None
    stderr_path: str = ""
    stopped: bool = field(default=False)

    def uri(self, name: str = "disk", *, tls: bool = False) -> str:
        scheme = "nbds" if tls else "nbd"
        if self.transport == "unix":
            return f"{scheme}+unix:///{name}?socket={self.socket_path}"
        host = "[::1]" if self.transport == "tcp6" else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}/{name}"

    def nbd_client_target(self) -> list[str]:
        """Arguments naming the server for ``nbd-client -l``."""
        if self.transport == "unix":
            return ["-u", str(self.socket_path)]
        return [host_of(self.transport), str(self.port)]

    def stderr(self) -> str:
        try:
            return Path(self.stderr_path).read_text()
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Stop the server the way an operator would; return its exit status."""
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        return tools.stop_process(self.proc, sig, timeout, self.stderr)


def _command(
    image: str,
    *,
    transport: str,
    sock: str | None,
    port: int | None,
    names: Sequence[str],
    fmt: str,
    read_only: bool,
    tls_dir: str | None,
    tls_mode: str,
    verify_peer: bool,
    extra: Sequence[str],
    more_images: Sequence[str],
) -> list[str]:
    if IMPL == "qemu-nbd":
        cmd = ["qemu-nbd", "-t", "--shared=0", "-f", fmt, "-A", "-x", names[0]]
        cmd += ["-k", str(sock)] if transport == "unix" else [
            "-b", host_of(transport), "-p", str(port)]
        if read_only:
            cmd.append("-r")
        else:
            cmd.append("--discard=unmap")
        if tls_dir:
            vp = "on" if verify_peer else "off"
            cmd += [
                "--object",
                f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer={vp}",
                "--tls-creds",
                "tls0",
            ]
        return [*cmd, *extra, image]
    cmd = [sys.executable, "-m", "nbdqcow", "serve", "--format", fmt]
    cmd += ["--socket", str(sock)] if transport == "unix" else [
        "--bind", host_of(transport), "--port", str(port)]
    for n in names:
        cmd += ["-x", n]
    if read_only:
        cmd.append("--read-only")
    if tls_dir:
        cmd += ["--tls", tls_mode, "--tls-certs", tls_dir]
        if verify_peer:
            cmd.append("--tls-verify-peer")
    return [*cmd, *extra, image, *more_images]


def serve(
    tmp: Path,
    image: str | os.PathLike[str],
    *,
    transport: str = "unix",
    names: Sequence[str] = ("disk",),
    fmt: str = "raw",
    read_only: bool = False,
    tls_dir: str | None = None,
    tls_mode: str = "required",
    verify_peer: bool = False,
    extra: Sequence[str] = (),
    more_images: Sequence[str | os.PathLike[str]] = (),
    timeout: float = 15,
) -> Served:
    """Start a server on ``image`` and wait until it accepts connections."""
    sock = str(tmp / f"nbd-{time.monotonic_ns()}.sock") if transport == "unix" else None
    port = free_port(host_of(transport)) if transport != "unix" else None
    cmd = _command(
        os.fspath(image), transport=transport, sock=sock, port=port, names=names, fmt=fmt,
        read_only=read_only, tls_dir=tls_dir, tls_mode=tls_mode, verify_peer=verify_peer,
        extra=extra, more_images=[os.fspath(m) for m in more_images],
    )
    err = str(tmp / f"server-{time.monotonic_ns()}.log")
    with open(err, "wb") as ef:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=ef, stderr=ef)
    served = Served(proc, transport, sock, port, err)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{served.stderr()}")
        try:
            if transport == "unix":
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
            else:
                socket.create_connection((host_of(transport), int(str(port))),
                                         timeout=1).close()
            return served
        except OSError:
            if time.monotonic() > deadline:
                served.stop(signal.SIGKILL)
                raise AssertionError(f"server never listened:\n{served.stderr()}") from None
            time.sleep(0.05)


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 60,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client tool; on failure show its output in the assertion."""
    r = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout,
        input=None if input is None else input.decode(),
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
        )
    return r

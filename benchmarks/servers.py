"""The NBD servers under test and how to start, probe and stop them.

A *target* is one server serving one image format: ``qemu-nbd/qcow2``,
``nbdqcow/qcow2``, ``nbdkit/raw`` and ``nbdqcow/raw``.  Ratios compare
nbdqcow with the stock server of the same format (issue 6 "Targets"):
``qemu-nbd`` for qcow2 and ``nbdkit file`` for raw.

Every server runs in the foreground as a direct child, listening on a Unix
socket in the run's private temporary directory, so its PID is the PID whose
``/proc`` counters we read.  Children get ``PR_SET_PDEATHSIG`` so a killed
harness never leaves a server behind on the shared machine, and
:class:`RunningServer` always terminates the process on exit.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = [
    "BASELINES",
    "DEFAULT_SERVERS",
    "SERVERS",
    "SERVER_FORMATS",
    "Availability",
    "RunningServer",
    "ServerFailed",
    "ServerRefused",
    "Target",
    "nbdqcow_env",
    "probe",
    "server_argv",
    "uri",
]

SERVERS = ("qemu-nbd", "nbdqcow", "nbdkit", "floor")
#: What a run measures unless ``--servers`` says otherwise: the floor
#: (:mod:`benchmarks.floor`) is asked for by name.
DEFAULT_SERVERS = ("qemu-nbd", "nbdqcow", "nbdkit")
FORMATS = ("qcow2", "raw")

#: Which formats each server is benchmarked on.  qemu-nbd is the reference
#: for qcow2 and nbdkit's ``file`` plugin the reference for raw files.
SERVER_FORMATS: dict[str, tuple[str, ...]] = {
    "qemu-nbd": ("qcow2",),
    "nbdqcow": ("qcow2", "raw"),
    "nbdkit": ("raw",),
    "floor": ("raw",),
}

#: The server each format's ratios are computed against.
BASELINES: dict[str, str] = {"qcow2": "qemu-nbd", "raw": "nbdkit"}

#: qemu-nbd's default ``--shared=1`` would refuse nbdcopy's extra
#: connections; with more than one client allowed it also advertises
#: multi-conn, like nbdkit's file plugin does.
QEMU_NBD_SHARED = 16

_NBD_GREETING = b"NBDMAGIC"


class ServerFailed(RuntimeError):
    """A server did not start, or died while it was being measured."""


class ServerRefused(ServerFailed):
    """A server declined the configuration with an ordinary error message
    (say, "writing qcow2 images is not supported yet") and exited: a missing
    feature to report, not a crash."""


@dataclass(frozen=True)
class Target:
    """One server serving one image format."""

    server: str
    fmt: str

    @property
    def key(self) -> str:
        return f"{self.server}/{self.fmt}"

    @property
    def baseline(self) -> Target:
        return Target(BASELINES[self.fmt], self.fmt)


@dataclass
class Availability:
    """Whether a server can be run here, and its version string."""

    ok: bool
    version: str = ""
    reason: str = ""
    #: ``nbdqcow serve --help`` text, used to adapt to the options it has.
    help_text: str = ""
    extra_args: list[str] = field(default_factory=list)


#: The source tree this harness lives in.  nbdqcow is always run from here
#: (``PYTHONPATH``), so a snapshot (``git archive HEAD``) measures its own
#: server, not whatever the editable install points at.
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def nbdqcow_env() -> dict[str, str]:
    """Environment that makes ``python -m nbdqcow`` import :data:`SOURCE_ROOT`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    return env


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def probe(server: str, extra_args: Sequence[str] = ()) -> Availability:
    """Find out whether ``server`` can be benchmarked on this machine."""
    if server == "floor":
        # benchmarks/floor.py: part of this tree, nothing to install.
        return Availability(True, version=f"benchmarks.floor (Python {sys.version.split()[0]})")
    if server == "nbdqcow":
        # `nbdqcow serve` lands while this harness already exists: detect the
        # subcommand instead of assuming it, and show "not available" until
        # then rather than failing the whole run.
        r = subprocess.run(
            [sys.executable, "-m", "nbdqcow", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=nbdqcow_env(),
        )
        if r.returncode != 0:
            why = _first_line(r.stderr) or f"exit status {r.returncode}"
            return Availability(False, reason=f"`nbdqcow serve` not available ({why})")
        v = subprocess.run(
            [sys.executable, "-m", "nbdqcow", "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            env=nbdqcow_env(),
        )
        return Availability(
            True,
            version=v.stdout.strip(),
            help_text=r.stdout,
            extra_args=list(extra_args),
        )
    exe = shutil.which(server)
    if exe is None:
        return Availability(False, reason=f"{server} is not installed")
    v = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    version = v.stdout.strip().splitlines()[0] if v.stdout.strip() else ""
    return Availability(True, version=version)


def server_argv(
    target: Target,
    sock: Path,
    image: Path,
    avail: Availability,
    *,
    read_only: bool,
    tls: Path | None = None,
) -> list[str]:
    """The command line that serves ``image`` for ``target`` on ``sock``.

    Read workloads are served read-only by every server alike, so a server
    that cannot write a format yet can still be measured reading it.  With
    ``tls`` (a directory from :func:`benchmarks.tls.make_pki`) every server
    requires TLS and does not ask for client certificates.
    """
    if target.server == "qemu-nbd":
        # The configuration issue 6 measured: persistent, host page cache on,
        # and enough client slots for nbdcopy's four connections.
        argv = ["qemu-nbd", "-f", target.fmt, "-t", "--cache=writeback"]
        argv += [f"--shared={QEMU_NBD_SHARED}", "-k", str(sock)]
        if tls is not None:
            creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={tls},verify-peer=off"
            argv += ["--object", creds, "--tls-creds", "tls0"]
        return [*argv, "-r", str(image)] if read_only else [*argv, str(image)]
    if target.server == "nbdkit":
        if target.fmt != "raw":
            raise ValueError(f"nbdkit's file plugin serves raw files, not {target.fmt}")
        argv = ["nbdkit", "-f", "-U", str(sock)]
        if read_only:
            argv.append("-r")
        if tls is not None:
            argv += ["--tls=require", f"--tls-certificates={tls}"]
        return [*argv, "file", f"file={image}"]
    if target.server == "floor":
        if tls is not None:
            raise ServerRefused("the floor server (benchmarks/floor.py) has no TLS")
        argv = [sys.executable, "-m", "benchmarks.floor", "--socket", str(sock)]
        return [*argv, "--read-only", str(image)] if read_only else [*argv, str(image)]
    if target.server == "nbdqcow":
        argv = [sys.executable, "-m", "nbdqcow", "serve", "--socket", str(sock)]
        if read_only:
            argv.append("--read-only")
        if tls is not None:
            argv += ["--tls", "required", "--tls-certs", str(tls)]
        # Name the format when the server lets us, so a raw file is never
        # probed (a raw guest image may begin with qcow2's magic).
        if "--format" in avail.help_text:
            argv += ["--format", target.fmt]
        argv += avail.extra_args
        argv.append(str(image))
        return argv
    raise ValueError(f"unknown server {target.server!r}")


def uri(sock: Path, *, tls: bool = False) -> str:
    """The NBD URI (NBD's ``doc/uri.md``) of the default export on ``sock``."""
    return f"{'nbds' if tls else 'nbd'}+unix:///?socket={sock}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # PR_SET_PDEATHSIG (prctl(2) option 1): the kernel sends SIGKILL to the
    # server if the harness dies, so no server outlives an interrupted run.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)


class RunningServer:
    """A started server; use as a context manager so it is always stopped."""

    def __init__(
        self,
        argv: Sequence[str],
        sock: Path,
        log: Path,
        *,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ):
        self.argv = list(argv)
        self.env = env
        self.sock = sock
        self.log = log
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def pid(self) -> int:
        assert self._proc is not None, "server not started"
        return self._proc.pid

    def __enter__(self) -> RunningServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as logf:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def check_alive(self) -> None:
        """Raise :class:`ServerFailed` if the server has exited."""
        assert self._proc is not None
        rc = self._proc.poll()
        if rc is not None:
            raise ServerFailed(f"{self.argv[0]} exited with status {rc}: {self.log_tail()}")

    def _check_started(self) -> None:
        assert self._proc is not None
        rc = self._proc.poll()
        if rc is None:
            return
        tail = self.log_tail(1)
        # A clean refusal is one line of error and a non-zero status; a
        # traceback or a signal is a crash and stays an error.
        if rc > 0 and "Traceback" not in self._log_text():
            raise ServerRefused(tail)
        raise ServerFailed(f"{self.argv[0]} exited with status {rc}: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        """The last lines this server (not earlier ones) wrote to the log."""
        text = self._log_text()
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
        return " | ".join(tail) if tail else "(empty log)"

    def _log_text(self) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        # Ready means: accepts a connection and sends the NBD greeting.  The
        # socket file alone is not enough (it exists between bind and listen).
        deadline = time.monotonic() + self.timeout
        while True:
            self._check_started()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(max(0.1, deadline - time.monotonic()))
                    s.connect(str(self.sock))
                    greeting = s.recv(len(_NBD_GREETING), socket.MSG_WAITALL)
                if greeting == _NBD_GREETING:
                    return
                raise ServerFailed(f"{self.argv[0]} sent {greeting!r}, not the NBD greeting")
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"{self.argv[0]} not ready on {self.sock} after {self.timeout:.0f} s: "
                    f"{self.log_tail()}"
                )
            time.sleep(0.01)

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the process to exit by itself."""
        assert self._proc is not None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # qemu-nbd and nbdkit remove their socket; a crashed server does not.
        if os.path.lexists(self.sock):
            os.unlink(self.sock)

"""Syscalls the server makes per request: a cost measure that does not
depend on how busy the machine is (issue 6, "a regression guard in CI that
is not a timed test").

The server runs under ``strace -f`` from its first instruction (tracing a
child needs no ``CAP_SYS_PTRACE``, unlike attaching to a running process).
Three client connections follow: a warm-up that touches the same blocks as
the measurement (so the page cache and the qcow2 table cache are hot), the
measured connection of ``COUNT`` requests at queue depth 1, and an empty
marker connection.  Only the syscalls between the ``accept`` of the measured
connection and the ``accept`` of the marker are counted, so start-up,
warm-up and shutdown never enter the figure; the handshake and teardown of
the measured connection do, spread over ``COUNT`` requests.

``python -m benchmarks.syscalls IMAGE [--format F] [--op read|write|alloc]``
prints the breakdown for any server command (default: ``nbdqcow serve``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.servers import RunningServer, nbdqcow_env, uri
from benchmarks.workloads import SYSTEM_PYTHON

__all__ = ["SyscallProfile", "nbdqcow_argv", "profile_requests"]

_REQUESTS_SCRIPT = Path(__file__).with_name("libnbd_requests.py")

# One strace -f line: "PID  name(args...) = result ...".  Lines for resumed
# calls ("<... name resumed>"), signals ("---") and exits ("+++") do not
# start a syscall and are not matched.
_CALL = re.compile(r"^\d+\s+([a-z_0-9]+)\(")
_ACCEPT_OK = re.compile(r"^\d+\s+(?:<\.\.\. )?accept4?(?:\(| resumed>).*\)\s+=\s+\d+")


@dataclass(frozen=True)
class SyscallProfile:
    """Syscalls the server made while serving ``requests`` requests."""

    requests: int
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def per_request(self) -> float:
        return self.total / self.requests

    def of(self, *names: str) -> float:
        """Calls per request of the named syscalls together."""
        return sum(self.counts.get(n, 0) for n in names) / self.requests

    def describe(self) -> str:
        top = ", ".join(f"{name} {n / self.requests:.2f}" for name, n in self.most_common[:8])
        return f"{self.per_request:.2f} syscalls per request ({top})"

    @property
    def most_common(self) -> list[tuple[str, int]]:
        return Counter(self.counts).most_common()


def nbdqcow_argv(sock: Path, image: Path, fmt: str, *, read_only: bool) -> list[str]:
    argv = [sys.executable, "-m", "nbdqcow", "serve", "--socket", str(sock), "--format", fmt]
    if read_only:
        argv.append("--read-only")
    return [*argv, str(image)]


def _client(u: str, count: int, op: str, first: int = 0) -> None:
    argv = [SYSTEM_PYTHON, str(_REQUESTS_SCRIPT), u, str(count), op, str(first)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        raise RuntimeError(f"libnbd client failed: {lines[-1] if lines else r.returncode}")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def count_window(trace: str) -> Counter[str]:
    """Syscalls between the last two successful ``accept`` calls."""
    lines = trace.splitlines()
    accepts = [i for i, line in enumerate(lines) if _ACCEPT_OK.match(line)]
    if len(accepts) < 2:
        raise RuntimeError(f"strace saw {len(accepts)} accepted connections, expected >= 2")
    counts: Counter[str] = Counter()
    for line in lines[accepts[-2] + 1 : accepts[-1]]:
        m = _CALL.match(line)
        if m is not None:
            counts[m.group(1)] += 1
    return counts


def profile_requests(
    server_argv: Sequence[str],
    sock: Path,
    workdir: Path,
    *,
    op: str = "read",
    count: int = 2000,
) -> SyscallProfile:
    """Run ``server_argv`` under strace and count its syscalls per request."""
    trace = workdir / "strace.txt"
    argv = ["strace", "-f", "-qq", "-o", str(trace), *server_argv]
    u = uri(sock)
    log = workdir / "server.log"
    with RunningServer(argv, sock, log, timeout=60, env=nbdqcow_env()) as srv:
        try:
            if op == "alloc":
                # Warm the metadata caches with other clusters: the measured
                # writes must still allocate.
                _client(u, count, op, first=0)
                _client(u, count, op, first=count)
            else:
                _client(u, count, op)  # warm-up: the same blocks as measured
                _client(u, count, op)
            _client(u, 0, op)  # marker: its accept closes the window
        finally:
            # strace detaches from (and so would leak) its tracee when it is
            # signalled itself: stop the server, and strace ends with it.
            for child in _children(srv.pid):
                os.kill(child, signal.SIGTERM)
            srv.wait(timeout=30)
    return SyscallProfile(count, dict(count_window(trace.read_text(errors="replace"))))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.syscalls", description=__doc__)
    p.add_argument("image", type=Path)
    p.add_argument("--format", default="qcow2", choices=["qcow2", "raw"])
    p.add_argument("--op", default="read", choices=["read", "write", "alloc"])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nbdqcow-strace-") as wd:
        sock = Path(wd) / "nbd.sock"
        server = nbdqcow_argv(sock, args.image, args.format, read_only=args.op == "read")
        prof = profile_requests(server, sock, Path(wd), op=args.op, count=args.count)
    if args.json:
        print(json.dumps({"requests": prof.requests, "counts": prof.counts}, indent=2))
    else:
        print(prof.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())

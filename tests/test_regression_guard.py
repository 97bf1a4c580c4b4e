"""Performance regression guard that is not a timed test (issue 6).

Counts the syscalls ``nbdqcow serve`` makes per 4 KiB request at queue depth
1 on warm caches (see :mod:`benchmarks.syscalls`: the server runs under
``strace -f`` and only the measured connection is counted).  Syscall counts
do not depend on how loaded the machine is: on the shared 2-core machine
three runs of 2000 reads gave 10.01, 10.02 and 10.03 per request.

The ceilings are a ratchet: each sits just above what the server does today,
so any growth fails here.  When the server gets leaner, lower them.  For
reference, issue 6's prototype needs about four per read (``epoll_wait``,
``recv``, ``preadv``, ``sendmsg``); today's 10 are ``epoll_wait`` 3 times,
``recvfrom`` and ``epoll_ctl`` twice each, ``getpid``, ``preadv2`` and ``sendmsg``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import tools

from benchmarks.servers import ServerRefused
from benchmarks.syscalls import SyscallProfile, nbdqcow_argv, profile_requests

pytestmark = [pytest.mark.interop, pytest.mark.slow]

REQUESTS = 1000
SIZE = 64 << 20

#: Ceiling on all syscalls per request, by (format, op).
CEILING = {
    ("qcow2", "read"): 11.0,
    ("raw", "read"): 11.0,
    ("raw", "write"): 11.0,
    ("raw", "alloc"): 11.0,
    # Not measurable yet (qcow2 writes are refused today); allocation costs
    # an L2 update and refcount work, batched, so it may exceed a read but
    # not by an order of magnitude.  Tighten once measured.
    ("qcow2", "alloc"): 25.0,
}

#: Positional data I/O: one call per 4 KiB request, whichever call is used.
DATA_IO = ("pread64", "preadv", "preadv2", "pwrite64", "pwritev", "pwritev2", "sendfile")
#: Socket sends: one per reply.
SENDS = ("sendmsg", "sendto", "write", "writev", "sendfile")
#: Thread hand-offs: none on a warm page cache (reads and overwrites are
#: served inline, issue 6 "lessons").
THREADS = ("futex", "clone", "clone3")


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    for tool in ("strace", "qemu-img", "qemu-io"):
        tools.require(tool)
    tools.require_libnbd_python()


def _image(tmp_path: Path, fmt: str, *, filled: bool) -> Path:
    path = tmp_path / f"disk.{fmt}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, str(path), str(SIZE)], check=True, timeout=60
    )
    if filled:
        subprocess.run(
            ["qemu-io", "-f", fmt, "-c", f"write -q -P 0x5a 0 {SIZE}", str(path)],
            check=True,
            timeout=120,
        )
    return path


def _profile(tmp_path: Path, fmt: str, op: str) -> SyscallProfile:
    image = _image(tmp_path, fmt, filled=op != "alloc")
    sock = tmp_path / "nbd.sock"
    argv = nbdqcow_argv(sock, image, fmt, read_only=op == "read")
    try:
        return profile_requests(argv, sock, tmp_path, op=op, count=REQUESTS)
    except ServerRefused as exc:
        pytest.skip(f"server refuses {fmt} {op}: {exc}")


@pytest.mark.parametrize(
    ("fmt", "op"),
    [("qcow2", "read"), ("raw", "read"), ("raw", "write"), ("raw", "alloc"), ("qcow2", "alloc")],
)
def test_syscalls_per_request(tmp_path: Path, fmt: str, op: str) -> None:
    prof = _profile(tmp_path, fmt, op)
    what = f"{fmt} 4 KiB {op}: {prof.describe()}"
    assert prof.per_request <= CEILING[fmt, op], what
    # Shape, not just total: these catch a regression that a saving
    # elsewhere would hide in the sum.
    assert 0.95 <= prof.of(*DATA_IO) <= 1.05 or (fmt, op) == ("qcow2", "alloc"), what
    assert prof.of(*SENDS) <= 1.05, what
    if op != "alloc":
        assert prof.of(*THREADS) <= 0.05, what

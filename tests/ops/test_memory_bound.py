"""Issue 6's memory bound, checked on the real server with a real client.

"A 1 TiB virtual image under 4 KiB random reads across the whole disk stays
under 64 MiB RSS plus the configured L2 cache cap."  The image has one block
written under every L2 table (qemu-io, one 4 KiB write every 512 MiB), so
its 2048 L2 tables (128 MiB) are four times the default 32 MiB cache and
random reads across the disk keep missing it.  Not a timed test: the server
reports its peak resident set (``VmHWM``) and how much it read (``rchar``),
which do not depend on how busy the machine is.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import tools

from benchmarks import images
from nbdqcow.qcow2.image import DEFAULT_L2_CACHE_BYTES
from tests.ops.conftest import Spawn

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MiB = 1 << 20
SIZE = 1 << 40
READS = 12000


def _status(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def _rchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("rchar not in /proc/PID/io")


def test_random_reads_across_1tib_stay_within_the_memory_bound(
        tmp_path: Path, spawn: Spawn) -> None:
    for tool in ("qemu-img", "qemu-io", "fio"):
        tools.require(tool)
    image = images.create_spread(tmp_path / "huge.qcow2", "qcow2", SIZE)
    sock = str(tmp_path / "nbd.sock")
    server = spawn("--socket", sock, "--format", "qcow2", "--read-only", "-q", str(image),
                   ready=sock)
    pid = server.proc.pid
    before = _rchar(pid)
    r = subprocess.run(
        ["fio", "--name=huge", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
         "--rw=randread", "--bs=4k", "--iodepth=32", f"--size={SIZE}",
         f"--number_ios={READS}", "--randrepeat=1", "--output-format=terse"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("3;"))
    assert int(line.split(";")[7]) > 0  # read IOPS: the reads happened
    peak = _status(pid, "VmHWM")
    read = _rchar(pid) - before
    # The cache really was overrun: the server read far more table bytes
    # than the cache holds (12000 reads over 2048 tables of 64 KiB).
    assert read > 2 * DEFAULT_L2_CACHE_BYTES, read
    assert peak < 64 * MiB + DEFAULT_L2_CACHE_BYTES, f"peak RSS {peak / MiB:.1f} MiB"
    assert server.stop() == 0

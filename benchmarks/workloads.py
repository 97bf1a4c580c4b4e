"""The workloads of issue 6, each driven by a real NBD client.

=====================  =====================================================
``seq-read``           ``nbdcopy -C1 --no-extents URI null:`` over a filled image
``seq-read-4c``        the same with ``-C4`` (four connections when the server
                       advertises multi-conn; nbdcopy falls back to one)
``seq-write``          ``nbdcopy SOURCE URI``: a filled raw file copied into a
                       fresh empty image (nbdcopy's default connections)
``randread-qd1``       ``fio --ioengine=nbd`` 4 KiB random reads, iodepth 1
``randread-qd32``      the same, iodepth 32
``randwrite-alloc``    4 KiB random writes, iodepth 32, into a fresh sparse
                       image: every write allocates (bounded by volume)
``randwrite-prealloc`` 4 KiB random writes, iodepth 32, over a filled image
``handshakes``         libnbd connect + ``NBD_OPT_GO`` + shutdown in a loop
``randread-huge``      4 KiB random reads, iodepth 32, across a 1 TiB image
                       whose every L2 table is allocated: the memory bound
=====================  =====================================================

A workload returns a :class:`Sample`: the figure of merit plus the amount of
work done, which the runner divides the server's CPU time by.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.config import GiB, MiB, Params

__all__ = ["WORKLOADS", "Client", "Sample", "Workload", "WorkloadFailed"]

SYSTEM_PYTHON = "/usr/bin/python3"
_HANDSHAKE_SCRIPT = Path(__file__).with_name("libnbd_handshakes.py")


class WorkloadFailed(RuntimeError):
    """A client exited with an error or produced no usable figure."""


@dataclass(frozen=True)
class Client:
    """What a workload needs to drive one server."""

    uri: str
    params: Params
    workdir: Path
    #: A filled raw file on the host: nbdcopy's source for ``seq-write``.
    source: Path
    #: Size of the export being served.
    export_size: int
    #: Environment of the client processes (TLS runs point HOME at the CA).
    env: dict[str, str] | None = None


@dataclass(frozen=True)
class Sample:
    value: float  #: the figure of merit, in the workload's ``unit``
    work: float  #: amount of work, in the workload's ``work_unit``
    elapsed: float  #: seconds the client measured over


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    unit: str  #: "MiB/s", "IOPS" or "handshakes/s"
    work_unit: str  #: "GiB", "I/O" or "handshake": server CPU is per this
    #: "data" (shared, filled), "seq" (filled, ``Params.seq_read_size``: the
    #: data image itself unless that differs), "huge" (shared, 1 TiB with
    #: all L2 tables),
    #: "empty" or "sparse" (fresh per run)
    image: str
    tools: tuple[str, ...]
    run: Callable[[Client], Sample]
    #: Read workloads are served read-only (by every server alike).
    writes: bool = False

    @property
    def cpu_unit(self) -> str:
        return "s/GiB" if self.work_unit == "GiB" else f"µs/{self.work_unit}"

    def cpu_per_unit(self, cpu_seconds: float, work: float) -> float:
        """Server CPU per unit of work, scaled to :attr:`cpu_unit`."""
        per = cpu_seconds / work
        return per if self.work_unit == "GiB" else per * 1e6


def _run_client(argv: list[str], timeout: float, env: dict[str, str] | None) -> tuple[str, float]:
    """Run a client; return its stdout and wall-clock seconds."""
    start = time.monotonic()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise WorkloadFailed(f"{argv[0]} did not finish within {timeout:.0f} s") from exc
    elapsed = time.monotonic() - start
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        raise WorkloadFailed(
            f"{argv[0]} exited with status {r.returncode}: {lines[-1] if lines else '(no output)'}"
        )
    return r.stdout, elapsed


def _copy_timeout(nbytes: int) -> float:
    # Generous: a pathological 5 MiB/s still finishes; a hang does not block
    # the run forever.
    return 60.0 + nbytes / (5 * MiB)


def _nbdcopy_read(connections: int) -> Callable[[Client], Sample]:
    def run(c: Client) -> Sample:
        argv = ["nbdcopy", f"-C{connections}", "--no-extents", c.uri, "null:"]
        _, elapsed = _run_client(argv, _copy_timeout(c.export_size), c.env)
        return Sample(c.export_size / MiB / elapsed, c.export_size / GiB, elapsed)

    return run


def _nbdcopy_write(c: Client) -> Sample:
    # No --flush: the figure is the write path, as in issue 6's evidence; an
    # fsync of the whole image would measure the disk, the same for everyone.
    argv = ["nbdcopy", str(c.source), c.uri]
    _, elapsed = _run_client(argv, _copy_timeout(c.export_size), c.env)
    return Sample(c.export_size / MiB / elapsed, c.export_size / GiB, elapsed)


def _fio(rw: str, iodepth: int, *, volume: int | None = None) -> Callable[[Client], Sample]:
    def run(c: Client) -> Sample:
        out = c.workdir / "fio.json"
        argv = [
            "fio",
            "--name=bench",
            "--ioengine=nbd",
            f"--uri={c.uri}",
            f"--rw={rw}",
            "--bs=4k",
            f"--iodepth={iodepth}",
            "--numjobs=1",
            "--output-format=json",
            f"--output={out}",
        ]
        if volume is None:
            ms = max(1, round(c.params.seconds * 1000))
            argv += ["--time_based", f"--runtime={ms}ms"]
            timeout = c.params.seconds + 120
        else:
            argv.append(f"--io_size={volume}")
            timeout = 600.0
        _run_client(argv, timeout, c.env)
        try:
            report = json.loads(out.read_text())
            job = report["jobs"][0]
            side = job["read" if "read" in rw else "write"]
            iops, ios, runtime_ms = float(side["iops"]), int(side["total_ios"]), side["runtime"]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise WorkloadFailed(f"fio wrote no usable JSON report: {exc}") from exc
        finally:
            out.unlink(missing_ok=True)
        if job.get("error"):
            raise WorkloadFailed(f"fio job failed with error {job['error']}")
        if ios <= 0 or iops <= 0:
            raise WorkloadFailed("fio completed no I/O")
        return Sample(iops, ios, runtime_ms / 1000)

    return run


def _handshakes(c: Client) -> Sample:
    argv = [SYSTEM_PYTHON, str(_HANDSHAKE_SCRIPT), c.uri, repr(c.params.seconds)]
    out, _ = _run_client(argv, c.params.seconds + 120, c.env)
    try:
        result = json.loads(out)
        count, elapsed = int(result["count"]), float(result["elapsed"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WorkloadFailed(f"handshake loop printed no usable result: {out[:200]!r}") from exc
    return Sample(count / elapsed, count, elapsed)


def _alloc(c: Client) -> Sample:
    return _fio("randwrite", 32, volume=c.params.alloc_io)(c)


WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "seq-read",
        "sequential read, nbdcopy -C1 --no-extents",
        "MiB/s",
        "GiB",
        "seq",
        ("nbdcopy",),
        _nbdcopy_read(1),
    ),
    Workload(
        "seq-read-4c",
        "sequential read, 4 connections (nbdcopy -C4 --no-extents)",
        "MiB/s",
        "GiB",
        "seq",
        ("nbdcopy",),
        _nbdcopy_read(4),
    ),
    Workload(
        "randread-qd1",
        "4 KiB random read QD1 (fio nbd)",
        "IOPS",
        "I/O",
        "data",
        ("fio",),
        _fio("randread", 1),
    ),
    Workload(
        "randread-qd32",
        "4 KiB random read QD32 (fio nbd)",
        "IOPS",
        "I/O",
        "data",
        ("fio",),
        _fio("randread", 32),
    ),
    Workload(
        "handshakes",
        "handshakes: libnbd connect + GO + shutdown",
        "handshakes/s",
        "handshake",
        "data",
        (SYSTEM_PYTHON,),
        _handshakes,
    ),
    Workload(
        "randread-huge",
        "4 KiB random read QD32 across a 1 TiB image, every L2 table allocated",
        "IOPS",
        "I/O",
        "huge",
        ("fio",),
        _fio("randread", 32),
    ),
    Workload(
        "seq-write",
        "sequential write into an empty image (nbdcopy)",
        "MiB/s",
        "GiB",
        "empty",
        ("nbdcopy",),
        _nbdcopy_write,
        writes=True,
    ),
    Workload(
        "randwrite-alloc",
        "4 KiB random write QD32, sparse image (allocating)",
        "IOPS",
        "I/O",
        "sparse",
        ("fio",),
        _alloc,
        writes=True,
    ),
    Workload(
        "randwrite-prealloc",
        "4 KiB random write QD32, preallocated",
        "IOPS",
        "I/O",
        "data",
        ("fio",),
        _fio("randwrite", 32),
        writes=True,
    ),
)

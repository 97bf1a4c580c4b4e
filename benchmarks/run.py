"""``python -m benchmarks.run``: nbdqcow side by side with qemu-nbd and nbdkit.

For every workload, every repetition runs every target in the same order
(A B A B ...), each on a freshly started server, so slow drift of the shared
machine touches all servers alike.  The server's CPU time and peak RSS come
from ``/proc`` (see :mod:`benchmarks.procstat`).  Issue 6 defines the
workloads, the reference servers and the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import images, machine, pagecache, procstat, tls
from benchmarks.config import FULL, QUICK, Params, parse_size
from benchmarks.report import render
from benchmarks.results import Cell, Measurement, summarize
from benchmarks.servers import (
    BASELINES,
    DEFAULT_SERVERS,
    FORMATS,
    SERVER_FORMATS,
    SERVERS,
    Availability,
    RunningServer,
    ServerFailed,
    ServerRefused,
    Target,
    nbdqcow_env,
    probe,
    server_argv,
    uri,
)
from benchmarks.workloads import SYSTEM_PYTHON, WORKLOADS, Client, Workload, WorkloadFailed

__all__ = ["main"]

SCHEMA_VERSION = 1


def _list_arg(value: str, choices: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in choices]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(choices)}"
        )
    return items


def build_parser() -> argparse.ArgumentParser:
    names = [w.name for w in WORKLOADS]
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark nbdqcow against qemu-nbd (qcow2) and nbdkit file (raw).",
    )
    p.add_argument("--quick", action="store_true", help="small images, 1 s runs, 1 repetition")
    p.add_argument("--json", metavar="OUT", type=Path, help="write the full report as JSON")
    p.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        type=lambda v: _list_arg(v, SERVERS, "server"),
        help=f"comma-separated subset of {','.join(SERVERS)}",
    )
    p.add_argument(
        "--formats",
        default=",".join(FORMATS),
        type=lambda v: _list_arg(v, FORMATS, "format"),
        help="comma-separated subset of qcow2,raw",
    )
    p.add_argument(
        "--workloads",
        default=",".join(names),
        type=lambda v: _list_arg(v, names, "workload"),
        help=f"comma-separated subset of {','.join(names)}",
    )
    p.add_argument("--reps", type=int, help="repetitions per cell (median is reported)")
    p.add_argument("--size", type=parse_size, help="size of the filled and empty images")
    p.add_argument("--sparse-size", type=parse_size, help="size of the sparse image")
    p.add_argument("--alloc-io", type=parse_size, help="bytes of allocating random writes")
    p.add_argument("--seconds", type=float, help="duration of the timed workloads")
    p.add_argument("--huge-size", type=parse_size, help="size of the randread-huge image")
    p.add_argument(
        "--seq-size",
        type=parse_size,
        help="size of the images the sequential reads copy (default: 1G in --quick, "
        "else --size; --size alone sets both)",
    )
    p.add_argument(
        "--nbdqcow-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `nbdqcow serve` (repeatable)",
    )
    p.add_argument("--workdir", type=Path, help="parent directory for images and sockets")
    p.add_argument(
        "--tls",
        action="store_true",
        help="every server requires TLS (X.509, made with openssl); report it separately",
    )
    return p


def _params(args: argparse.Namespace) -> Params:
    base = QUICK if args.quick else FULL
    fields = {
        "size": args.size,
        "sparse_size": args.sparse_size,
        "alloc_io": args.alloc_io,
        "seconds": args.seconds,
        "reps": args.reps,
        "huge_size": args.huge_size,
        "seq_size": args.seq_size,
    }
    overrides: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    if args.size is not None and args.seq_size is None:
        overrides["seq_size"] = None  # --size alone sizes the sequential reads too
    if overrides:
        base = dataclasses.replace(base, mode=f"{base.mode}+custom", **overrides)
    if args.tls:
        base = dataclasses.replace(base, mode=f"{base.mode}+tls")
    if base.reps < 1 or base.seconds <= 0:
        raise SystemExit("error: --reps must be at least 1 and --seconds positive")
    return base


def _targets(servers: Sequence[str], formats: Sequence[str]) -> list[Target]:
    """Targets grouped by format, the reference server first in each group."""
    out: list[Target] = []
    for fmt in formats:
        group = [Target(s, fmt) for s in servers if fmt in SERVER_FORMATS[s]]
        group.sort(key=lambda t: t.server != BASELINES[fmt])
        out += group
    return out


def _missing_tool(tool: str) -> str:
    """Why ``tool`` cannot be used here, or "" when it can."""
    if tool == SYSTEM_PYTHON:
        r = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
        return "" if r.returncode == 0 else "libnbd's Python bindings (python3-libnbd) missing"
    if shutil.which(tool) is None:
        return f"{tool} is not installed"
    if tool == "fio":
        engines = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True)
        if "nbd" not in engines.stdout.split():
            return "this fio has no nbd engine"
    return ""


class Harness:
    def __init__(self, params: Params, workdir: Path, targets: list[Target]):
        self.params = params
        self.workdir = workdir
        self.targets = targets
        self.avail: dict[str, Availability] = {}
        self.data: dict[str, Path] = {}
        self.huge: dict[str, Path] = {}
        #: images of the sequential reads: ``data`` itself unless their size differs
        self.seq: dict[str, Path] = {}
        self.multi_conn: dict[str, bool | None] = {}
        self.counter = 0
        self.tls: Path | None = None
        (workdir / "logs").mkdir()

    def prepare_images(self, formats: Sequence[str]) -> None:
        for fmt in formats:
            t0 = time.monotonic()
            self.data[fmt] = images.create_filled(
                self.workdir / f"data.{fmt}", fmt, self.params.size
            )
            _log(f"created {self.data[fmt].name} in {time.monotonic() - t0:.1f} s")

    def prepare_seq(self, formats: Sequence[str]) -> None:
        for fmt in formats:
            if self.params.seq_read_size == self.params.size:
                self.seq[fmt] = self.data[fmt]
                continue
            t0 = time.monotonic()
            path = self.workdir / f"seq.{fmt}"
            self.seq[fmt] = images.create_filled(path, fmt, self.params.seq_read_size)
            _log(f"created {path.name} in {time.monotonic() - t0:.1f} s")

    def prepare_huge(self, formats: Sequence[str]) -> None:
        for fmt in formats:
            t0 = time.monotonic()
            path = self.workdir / f"huge.{fmt}"
            self.huge[fmt] = images.create_spread(path, fmt, self.params.huge_size)
            _log(f"created {path.name} in {time.monotonic() - t0:.1f} s")

    def measure(self, w: Workload, t: Target) -> Measurement:
        self.counter += 1
        sock = self.workdir / f"{t.server}-{t.fmt}-{self.counter}.sock"
        log = self.workdir / "logs" / f"{t.server}-{t.fmt}.log"
        fresh = w.image in ("empty", "sparse")
        # This VM's balloon driver hands idle page cache back to the host
        # within minutes, so "page cache warm" is re-established before
        # every run instead of trusted from image creation.
        if w.image == "data":
            image = images.warm(self.data[t.fmt])
        elif w.image == "seq":
            image = images.warm(self.seq[t.fmt])
        elif w.image == "huge":
            image = images.warm(self.huge[t.fmt])
        elif w.image == "empty":
            images.warm(self.data["raw"])  # nbdcopy's source
            image = images.create_empty(self.workdir / f"empty.{t.fmt}", t.fmt, self.params.size)
        else:
            image = images.create_empty(
                self.workdir / f"sparse.{t.fmt}", t.fmt, self.params.sparse_size
            )
        size = {
            "sparse": self.params.sparse_size,
            "huge": self.params.huge_size,
            "seq": self.params.seq_read_size,
        }.get(w.image, self.params.size)
        env = tls.client_env(self.tls) if self.tls is not None else None
        u = uri(sock, tls=self.tls is not None)
        client = Client(u, self.params, self.workdir, self.data["raw"], size, env)
        try:
            argv = server_argv(
                t, sock, image, self.avail[t.server], read_only=not w.writes, tls=self.tls
            )
            server_env = nbdqcow_env() if t.server in ("nbdqcow", "floor") else None
            with RunningServer(argv, sock, log, env=server_env) as srv:
                if t.key not in self.multi_conn:
                    self.multi_conn[t.key] = _can_multi_conn(client.uri, env)
                cpu0 = procstat.cpu_seconds(srv.pid)
                try:
                    sample = w.run(client)
                except WorkloadFailed as exc:
                    # The server's side of the story is usually the useful one.
                    raise WorkloadFailed(f"{exc}; server log: {srv.log_tail(3)}") from exc
                srv.check_alive()
                cpu = procstat.cpu_seconds(srv.pid) - cpu0
                rss = procstat.peak_rss_kib(srv.pid)
        finally:
            if fresh:
                images.remove(image)
            else:
                images.settle(image)
        return Measurement(
            value=sample.value,
            work=sample.work,
            elapsed=sample.elapsed,
            cpu_seconds=cpu,
            cpu_per_unit=w.cpu_per_unit(cpu, sample.work),
            peak_rss_kib=rss,
        )


def _can_multi_conn(u: str, env: dict[str, str] | None) -> bool | None:
    # Recorded because nbdcopy -C4 silently uses one connection when the
    # server does not advertise multi-conn.
    try:
        r = subprocess.run(
            ["nbdinfo", "--can", "multi-conn", u], capture_output=True, timeout=30, env=env
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {0: True, 2: False}.get(r.returncode)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    params = _params(args)
    started = datetime.datetime.now(datetime.UTC)
    t_start = time.monotonic()
    info = machine.describe()
    targets = _targets(args.servers, args.formats)
    workloads = [w for w in WORKLOADS if w.name in args.workloads]
    avail = {s: probe(s, args.nbdqcow_arg) for s in args.servers}
    for s, a in avail.items():
        _log(f"{s}: {a.version if a.ok else 'not available: ' + a.reason}")
    missing = {tool: _missing_tool(tool) for w in workloads for tool in w.tools}
    cells = {w.name: {t.key: Cell() for t in targets} for w in workloads}
    for w in workloads:
        for t in targets:
            why = avail[t.server].reason or "; ".join(filter(None, (missing[x] for x in w.tools)))
            cells[w.name][t.key].unavailable = why
    live = [t for t in targets if avail[t.server].ok]
    with tempfile.TemporaryDirectory(prefix="nbdqcow-bench-", dir=args.workdir) as wd:
        # The kernel's own price of a 4 KiB overwrite here (pagecache.py).
        info["pagecache_write_us"] = pagecache.write_probe(Path(wd), 20000)
        h = Harness(params, Path(wd), live)
        h.avail = avail
        if args.tls:
            h.tls = tls.make_pki(Path(wd))
        # The raw data image is also nbdcopy's source for seq-write.
        h.prepare_images(sorted({t.fmt for t in live} | {"raw"}))
        if any(w.image == "seq" for w in workloads):
            h.prepare_seq(sorted({t.fmt for t in live}))
        if any(w.image == "huge" for w in workloads):
            h.prepare_huge(sorted({t.fmt for t in live}))
        for w in workloads:
            for rep in range(params.reps):
                for t in live:
                    cell = cells[w.name][t.key]
                    if cell.unavailable or cell.unsupported:
                        continue
                    try:
                        m = h.measure(w, t)
                    except ServerRefused as exc:
                        cell.unsupported = str(exc)
                        _log(f"{w.name:20} {t.key:16} rep {rep + 1}: unsupported: {exc}")
                        continue
                    except (ServerFailed, WorkloadFailed, OSError, RuntimeError) as exc:
                        cell.errors.append(f"rep {rep + 1}: {exc}")
                        _log(f"{w.name:20} {t.key:16} rep {rep + 1}: ERROR {exc}")
                        continue
                    cell.runs.append(m)
                    _log(
                        f"{w.name:20} {t.key:16} rep {rep + 1}: {m.value:12.1f} {w.unit:13}"
                        f" cpu {m.cpu_per_unit:8.3f} {w.cpu_unit:14}"
                        f" rss {m.peak_rss_kib / 1024:6.1f} MiB"
                    )
        multi_conn = h.multi_conn
    results: dict[str, dict[str, dict[str, object]]] = {}
    for w in workloads:
        row: dict[str, dict[str, object]] = {}
        for t in targets:
            base_cell = cells[w.name].get(t.baseline.key)
            summary = summarize(cells[w.name][t.key], base_cell, cpu_unit=w.cpu_unit)
            summary["key"] = t.key
            summary["baseline"] = t.baseline.key
            row[t.key] = summary
        results[w.name] = row
    return {
        "schema": SCHEMA_VERSION,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": time.monotonic() - t_start,
        "params": params.as_json(),
        "tls": bool(args.tls),
        "machine": info,
        "loadavg_end": machine.loadavg(),
        "targets": [
            {
                "key": t.key,
                "server": t.server,
                "format": t.fmt,
                "baseline": t.baseline.key,
                "available": avail[t.server].ok,
                "reason": avail[t.server].reason,
                "version": avail[t.server].version,
                "multi_conn": multi_conn.get(t.key),
            }
            for t in targets
        ],
        "workloads": [
            {
                "name": w.name,
                "title": w.title,
                "unit": w.unit,
                "work_unit": w.work_unit,
                "cpu_unit": w.cpu_unit,
                "image": w.image,
            }
            for w in workloads
        ],
        "results": results,
    }


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the running
    # server is stopped and the work directory's images are removed.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        report = run(args)
    except (OSError, RuntimeError) as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    errors = any(c["status"] == "error" for row in report["results"].values() for c in row.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

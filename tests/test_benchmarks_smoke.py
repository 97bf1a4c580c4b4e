"""The benchmark harness (``benchmarks/``, issue 6) runs end to end.

A tiny pass (8 MiB images, 0.2 s timed workloads, one repetition) against
every server installed here, checking the JSON report's shape and that each
workload produced a positive figure with CPU and memory beside it.  The
numbers themselves are not judged: a timed assertion would be flaky on a
shared machine (that is what ``tests/test_regression_guard.py`` avoids).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tools

from benchmarks.config import parse_size
from benchmarks.report import render
from benchmarks.results import Cell, Measurement, summarize
from benchmarks.syscalls import count_window
from benchmarks.workloads import WORKLOADS

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--quick",
    *("--servers", "qemu-nbd,nbdqcow,nbdkit,floor"),
    *("--size", "8M", "--sparse-size", "1G", "--alloc-io", "2M", "--huge-size", "1G"),
    *("--seconds", "0.2"),
]


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


Tiny = tuple[dict[str, Any], str, int]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "nbdkit", "nbdcopy", "nbdinfo", "fio"):
        tools.require(tool)
    tools.require_libnbd_python()
    out = tmp_path_factory.mktemp("bench") / "report.json"
    r = _bench(*TINY, "--json", str(out), "--workdir", str(out.parent))
    # Status 1 means "some measurement failed" and still writes the report;
    # which cells failed is judged by the tests below.
    assert r.returncode in (0, 1), f"harness failed:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    # Nothing is left behind in the work directory: images, sockets, logs.
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.json"]
    return json.loads(out.read_text()), r.stdout, r.returncode


def _check_ok(name: str, key: str, cell: dict[str, Any]) -> None:
    assert cell["status"] == "ok", (name, key, cell.get("reason"))
    assert cell["median"] > 0, (name, key)
    assert len(cell["samples"]) == 1
    assert cell["cpu_per_unit"] >= 0
    assert cell["peak_rss_mib"] > 0
    run = cell["runs"][0]
    assert run["work"] > 0 and run["elapsed"] > 0
    if key == cell["baseline"]:
        assert cell["ratio"] == pytest.approx(1.0)
    else:
        assert cell["ratio"] > 0


def test_report_shape(tiny_report: Tiny) -> None:
    report, _, _ = tiny_report
    assert report["schema"] == 1
    assert report["params"]["size"] == 8 << 20
    assert report["params"]["reps"] == 1
    assert report["machine"]["nproc"] >= 1
    assert report["machine"]["kernel"]
    # The kernel's price of a 4 KiB overwrite, measured in the work directory.
    probe = report["machine"]["pagecache_write_us"]
    assert probe["large"] > 0 and probe["small"] > 0
    keys = [t["key"] for t in report["targets"]]
    # Grouped by format, the reference server first: ratios read left to right.
    assert keys[0] == "qemu-nbd/qcow2"
    assert keys.index("nbdkit/raw") > keys.index("qemu-nbd/qcow2")
    assert {"nbdqcow/qcow2", "nbdqcow/raw"} <= set(keys)
    assert [w["name"] for w in report["workloads"]] == [w.name for w in WORKLOADS]
    assert set(report["results"]) == {w.name for w in WORKLOADS}


def test_reference_servers_measured(tiny_report: Tiny) -> None:
    """qemu-nbd and nbdkit serve every workload: the harness itself works."""
    report, _, _ = tiny_report
    for name, row in report["results"].items():
        for key in ("qemu-nbd/qcow2", "nbdkit/raw"):
            _check_ok(name, key, row[key])


def test_nbdqcow_measured(tiny_report: Tiny) -> None:
    """Every nbdqcow cell is a figure: every workload of issue 6 is served
    (qcow2 writes included), so "unsupported" is a failure too."""
    report, _, _ = tiny_report
    for t in report["targets"]:
        if t["server"] == "nbdqcow":
            assert t["available"], t["reason"]
    failures = []
    for name, row in report["results"].items():
        for key in ("nbdqcow/qcow2", "nbdqcow/raw"):
            cell = row[key]
            if cell["status"] in ("unsupported", "error"):
                failures.append(f"{name} on {key}: {cell['reason']}")
            else:
                _check_ok(name, key, cell)
    assert not failures, "\n".join(failures)


def test_floor_measured(tiny_report: Tiny) -> None:
    """The floor (benchmarks/floor.py) serves every workload but TLS: its
    ratios beside nbdqcow's are what a bare Python server reaches here."""
    report, _, _ = tiny_report
    assert "floor/raw" in [t["key"] for t in report["targets"]]
    for name, row in report["results"].items():
        _check_ok(name, "floor/raw", row["floor/raw"])


def test_exit_status(tiny_report: Tiny) -> None:
    report, _, rc = tiny_report
    failed = any(c["status"] == "error" for row in report["results"].values() for c in row.values())
    assert rc == (1 if failed else 0)


def test_table_printed(tiny_report: Tiny) -> None:
    report, stdout, _ = tiny_report
    header = "| workload | unit | " + " | ".join(t["key"] for t in report["targets"]) + " |"
    assert stdout.count(header) == 3  # figures, CPU per unit, peak RSS
    probe = report["machine"]["pagecache_write_us"]
    assert f"Kernel cost of one 4 KiB overwrite in the work directory " \
        f"(benchmarks/pagecache.py): {probe['large']} us" in stdout
    for t in report["targets"]:
        if not t["available"]:
            assert "not available" in stdout


def test_bad_arguments_are_one_line_errors() -> None:
    r = _bench("--servers", "qemu-nbd,bogus", timeout=60)
    assert r.returncode == 2
    assert "unknown server bogus" in r.stderr
    assert "Traceback" not in r.stderr
    r = _bench("--size", "12X", timeout=60)
    assert r.returncode == 2
    assert "12X" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("text", "value"), [("4096", 4096), ("8M", 8 << 20), ("1G", 1 << 30), ("1.5KiB", 1536)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1M", "1Q", "M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


# -- pure parts of the harness -------------------------------------------------


def _m(value: float) -> Measurement:
    return Measurement(
        value=value, work=1.0, elapsed=1.0, cpu_seconds=0.5, cpu_per_unit=0.5, peak_rss_kib=2048
    )


def test_summarize_median_spread_ratio() -> None:
    base = Cell(runs=[_m(100), _m(110), _m(90)])
    cell = Cell(runs=[_m(300), _m(200), _m(250)])
    s = summarize(cell, base, cpu_unit="s/GiB")
    assert s["status"] == "ok"
    assert s["median"] == 250
    assert s["spread_pct"] == pytest.approx(20.0)  # half of (300 - 200), over 250
    assert s["ratio"] == pytest.approx(2.5)
    assert s["peak_rss_mib"] == 2.0
    assert s["samples"] == [300, 200, 250]


def test_summarize_statuses() -> None:
    assert summarize(Cell(unavailable="x"), None, cpu_unit="")["status"] == "not available"
    assert summarize(Cell(unsupported="y"), None, cpu_unit="")["status"] == "unsupported"
    failed = summarize(Cell(runs=[_m(1)], errors=["rep 2: boom"]), None, cpu_unit="")
    assert failed["status"] == "error" and "boom" in failed["reason"]
    # No ratio against a baseline that failed.
    broken = Cell(runs=[_m(1)], errors=["rep 1: boom"])
    assert summarize(Cell(runs=[_m(5)]), broken, cpu_unit="")["ratio"] is None


def test_count_window_takes_the_measured_connection_only() -> None:
    trace = "\n".join(
        [
            "10 accept4(5, {sa_family=AF_UNIX}, [2], SOCK_CLOEXEC) = 7",  # warm-up
            "10 recvfrom(7, ..., 65536, 0, NULL, NULL) = 28",
            "10 accept4(5,  <unfinished ...>",
            "11 futex(0x1, FUTEX_WAKE_PRIVATE, 1) = 0",
            "10 <... accept4 resumed>{sa_family=AF_UNIX}, [2], SOCK_CLOEXEC) = 8",  # measured
            "10 recvfrom(8, ..., 65536, 0, NULL, NULL) = 28",
            "10 preadv2(6, [...], 1, 4096, RWF_NOWAIT) = 4096",
            "10 epoll_wait(3,  <unfinished ...>",
            "10 <... epoll_wait resumed>[], 1, 0) = 0",
            "--- SIGCHLD {si_signo=SIGCHLD} ---",
            "10 accept4(5, 0x7ff, [2], SOCK_CLOEXEC) = -1 EAGAIN (Resource busy)",
            "10 sendmsg(8, {...}, 0) = 4112",
            "10 accept4(5, {sa_family=AF_UNIX}, [2], SOCK_CLOEXEC) = 9",  # marker
            "10 close(9) = 0",
        ]
    )
    counts = count_window(trace)
    assert counts == {"recvfrom": 1, "preadv2": 1, "epoll_wait": 1, "accept4": 1, "sendmsg": 1}
    with pytest.raises(RuntimeError, match="1 accepted"):
        count_window(trace.splitlines()[0])


def test_render_marks_missing_columns() -> None:
    report: dict[str, Any] = {
        "machine": {
            "nproc": 2,
            "cpu_model": "cpu",
            "kernel": "k",
            "mem_total_mib": 1,
            "python": "3",
            "loadavg_start": [0.0, 0.0, 0.0],
        },
        "loadavg_end": [0.0, 0.0, 0.0],
        "params": {
            "mode": "quick",
            "size": 1 << 20,
            "sparse_size": 1 << 30,
            "alloc_io": 1 << 20,
            "seconds": 1.0,
            "reps": 1,
            "huge_size": 1 << 40,
        },
        "duration_s": 1.0,
        "targets": [
            {"key": "qemu-nbd/qcow2", "available": True, "reason": ""},
            {"key": "nbdqcow/qcow2", "available": False, "reason": "`nbdqcow serve` missing"},
        ],
        "workloads": [{"name": "seq-read", "unit": "MiB/s", "cpu_unit": "s/GiB"}],
        "results": {
            "seq-read": {
                "qemu-nbd/qcow2": {
                    **summarize(Cell(runs=[_m(1500)]), None, cpu_unit="s/GiB"),
                    "key": "qemu-nbd/qcow2",
                    "baseline": "qemu-nbd/qcow2",
                },
                "nbdqcow/qcow2": {"status": "not available", "reason": "missing"},
            }
        },
    }
    text = render(report)
    assert "| seq-read | MiB/s | 1500 ±0% | not available |" in text
    assert "nbdqcow/qcow2: not available: `nbdqcow serve` missing" in text


def test_tls_run(tmp_path: Path) -> None:
    """``--tls``: every server requires TLS, clients trust a throw-away CA."""
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "fio", "openssl"):
        tools.require(tool)
    tools.require_libnbd_python()
    out = tmp_path / "tls.json"
    r = _bench(
        *TINY,
        *("--tls", "--servers", "qemu-nbd,nbdqcow", "--formats", "qcow2"),
        *("--workloads", "randread-qd1,handshakes", "--json", str(out)),
    )
    assert "Traceback" not in r.stderr, r.stderr
    report = json.loads(out.read_text())
    assert report["tls"] is True and report["params"]["mode"].endswith("+tls")
    for name, row in report["results"].items():
        _check_ok(name, "qemu-nbd/qcow2", row["qemu-nbd/qcow2"])
        _check_ok(name, "nbdqcow/qcow2", row["nbdqcow/qcow2"])
    assert r.returncode == 0, r.stderr

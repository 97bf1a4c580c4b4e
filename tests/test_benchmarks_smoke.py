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
from benchmarks.workloads import WORKLOADS

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--quick",
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
    """Every nbdqcow cell is a figure, or a configuration the server refused
    with a one-line message (a feature not built yet); never a failure."""
    report, _, _ = tiny_report
    for t in report["targets"]:
        if t["server"] == "nbdqcow":
            assert t["available"], t["reason"]
    failures = []
    for name, row in report["results"].items():
        for key in ("nbdqcow/qcow2", "nbdqcow/raw"):
            cell = row[key]
            if cell["status"] == "unsupported":
                assert cell["reason"].startswith("nbdqcow: error:"), cell["reason"]
            elif cell["status"] == "error":
                failures.append(f"{name} on {key}: {cell['reason']}")
            else:
                _check_ok(name, key, cell)
    assert not failures, "\n".join(failures)


def test_exit_status(tiny_report: Tiny) -> None:
    report, _, rc = tiny_report
    failed = any(c["status"] == "error" for row in report["results"].values() for c in row.values())
    assert rc == (1 if failed else 0)


def test_table_printed(tiny_report: Tiny) -> None:
    report, stdout, _ = tiny_report
    header = "| workload | unit | " + " | ".join(t["key"] for t in report["targets"]) + " |"
    assert stdout.count(header) == 3  # figures, CPU per unit, peak RSS
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

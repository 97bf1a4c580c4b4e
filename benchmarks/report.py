"""Render a benchmark JSON report as Markdown tables.

The same text is printed at the end of a run and pasted into
``benchmarks/README.md``; ``python -m benchmarks.report OUT.json`` re-renders
a saved report.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["render"]

Report = Mapping[str, Any]


def _fmt(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.1f} k"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _table(
    report: Report,
    title: str,
    cell_text: Callable[[Mapping[str, Any], Mapping[str, Any]], str],
    unit_of: Callable[[Mapping[str, Any]], str],
) -> list[str]:
    targets = [t["key"] for t in report["targets"]]
    lines = [f"**{title}**", ""]
    lines.append("| workload | unit | " + " | ".join(targets) + " |")
    lines.append("|---|---|" + "---:|" * len(targets))
    for w in report["workloads"]:
        row = report["results"].get(w["name"], {})
        cells = []
        for key in targets:
            c = row.get(key, {"status": "not run"})
            if c["status"] == "ok":
                cells.append(cell_text(c, w))
            elif c["status"] == "error":
                cells.append("error")
            else:
                cells.append(str(c["status"]))
        lines.append(f"| {w['name']} | {unit_of(w)} | " + " | ".join(cells) + " |")
    return lines


def _throughput(c: Mapping[str, Any], w: Mapping[str, Any]) -> str:
    text = f"{_fmt(c['median'])} ±{c['spread_pct']:.0f}%"
    if c.get("ratio") is not None and c.get("baseline") != c.get("key"):
        text += f" (**{c['ratio']:.2f}\N{MULTIPLICATION SIGN}**)"
    return text


def _cpu(c: Mapping[str, Any], w: Mapping[str, Any]) -> str:
    return _fmt(c["cpu_per_unit"])


def _rss(c: Mapping[str, Any], w: Mapping[str, Any]) -> str:
    return f"{c['peak_rss_mib']:.0f}"


def _seq(p: Mapping[str, Any]) -> str:
    seq = p.get("seq_size")
    return f" ({seq >> 20} MiB for sequential reads)" if seq and seq != p["size"] else ""


def _machine(report: Report) -> list[str]:
    m = report["machine"]
    p = report["params"]
    return [
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"{m['mem_total_mib']} MiB RAM, Python {m['python']}; "
        f"load average {m['loadavg_start']} at start, {report.get('loadavg_end')} at end.",
        f"Mode {p['mode']}: {p['size'] >> 20} MiB images"
        f"{_seq(p)}, sparse image {p['sparse_size'] >> 30} "
        f"GiB with {p['alloc_io'] >> 20} MiB of allocating writes, timed workloads "
        f"{p['seconds']:g} s, median of {p['reps']}, huge image "
        f"{p.get('huge_size', 1 << 40) >> 30} GiB; run took {report['duration_s']:.0f} s.",
        *_pagecache(m),
    ]


def _pagecache(m: Mapping[str, Any]) -> list[str]:
    probe = m.get("pagecache_write_us")
    if not probe:
        return []
    return [
        f"Kernel cost of one 4 KiB overwrite in the work directory "
        f"(benchmarks/pagecache.py): {probe['large']} us in a file cached in 1 MiB "
        f"requests like the images, {probe['small']} us in one written 4 KiB at a time.",
    ]


def render(report: Report) -> str:
    """The Markdown text for ``report``."""
    lines = [*_machine(report), ""]
    unavailable = [t for t in report["targets"] if not t["available"]]
    for t in unavailable:
        lines.append(f"- {t['key']}: not available: {t['reason']}")
    if unavailable:
        lines.append("")
    lines += _table(
        report,
        "Median ±half-range (ratio vs the stock server of the same format: "
        "qemu-nbd for qcow2, nbdkit file for raw)",
        _throughput,
        lambda w: str(w["unit"]),
    )
    lines.append("")
    lines += _table(
        report, "Server CPU per unit of work (median)", _cpu, lambda w: str(w["cpu_unit"])
    )
    lines.append("")
    lines += _table(report, "Server peak RSS (VmHWM), MiB", _rss, lambda w: "MiB")
    for status, heading in (("unsupported", "Refused by the server"), ("error", "Errors")):
        notes = [
            f"- {name} on {key}: {c['reason']}"
            for name, row in report["results"].items()
            for key, c in row.items()
            if c["status"] == status
        ]
        if notes:
            lines += ["", f"{heading}:", *notes]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m benchmarks.report REPORT.json", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as f:
        sys.stdout.write(render(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

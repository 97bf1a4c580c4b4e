"""Measurements and their summary: median, spread, ratio against the stock
server, and server CPU and memory per unit of work.

Everything here is plain data that becomes the JSON report; ratios are only
ever computed between servers measured in the same run (issue 6: "ratios
only within one run").
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

__all__ = ["Cell", "Measurement", "summarize"]


@dataclass(frozen=True)
class Measurement:
    """One repetition of one workload against one target."""

    value: float
    work: float
    elapsed: float
    cpu_seconds: float
    cpu_per_unit: float
    peak_rss_kib: int


@dataclass
class Cell:
    """All repetitions of one workload against one target."""

    runs: list[Measurement] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unavailable: str = ""
    #: The server refused this configuration (a feature it lacks).
    unsupported: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(r.value for r in self.runs) if self.runs else None


def summarize(cell: Cell, baseline: Cell | None, *, cpu_unit: str) -> dict[str, object]:
    """The JSON form of ``cell``; ``baseline`` is the stock server's cell."""
    if cell.unavailable:
        return {"status": "not available", "reason": cell.unavailable}
    if cell.unsupported:
        return {"status": "unsupported", "reason": cell.unsupported}
    if cell.errors or not cell.runs:
        return {
            "status": "error",
            "reason": "; ".join(cell.errors) or "no runs",
            "runs": [asdict(r) for r in cell.runs],
        }
    values = [r.value for r in cell.runs]
    med = statistics.median(values)
    base = baseline.median if baseline is not None and not baseline.errors else None
    return {
        "status": "ok",
        "median": med,
        "min": min(values),
        "max": max(values),
        # Half the range relative to the median: "±x %" in the table.
        "spread_pct": 100.0 * (max(values) - min(values)) / (2 * med) if med else 0.0,
        "ratio": med / base if base else None,
        "cpu_per_unit": statistics.median(r.cpu_per_unit for r in cell.runs),
        "cpu_unit": cpu_unit,
        "peak_rss_mib": max(r.peak_rss_kib for r in cell.runs) / 1024,
        "samples": values,
        "runs": [asdict(r) for r in cell.runs],
    }

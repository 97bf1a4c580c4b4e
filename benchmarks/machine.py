"""A description of the machine and tool versions a run was made on, so a
table is never read without knowing where it came from."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

__all__ = ["describe", "loadavg"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (the machine may be shared)."""
    return [round(x, 2) for x in os.getloadavg()]


def _version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0].strip() if out else "unknown"


def describe() -> dict[str, object]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "mem_total_mib": _mem_total_mib(),
        "python": sys.version.split()[0],
        "loadavg_start": loadavg(),
        "tools": {
            "qemu-img": _version(["qemu-img", "--version"]),
            "nbdcopy": _version(["nbdcopy", "--version"]),
            "fio": _version(["fio", "--version"]),
            "nbdkit": _version(["nbdkit", "--version"]),
            "qemu-nbd": _version(["qemu-nbd", "--version"]),
        },
    }

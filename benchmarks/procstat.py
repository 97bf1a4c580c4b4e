"""Per-process accounting read from ``/proc`` (proc(5): ``/proc/PID/stat``,
``/proc/PID/status``).

The harness samples the *server's* CPU time just before and just after a
client runs, so the difference is the work the server did for that workload
(all of its threads, including ones that exited, are summed by the kernel
into ``utime``/``stime``).  ``VmHWM`` is the resident-set high-water mark.
"""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "peak_rss_kib"]

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by process ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) is parenthesised and may itself contain
    # spaces or parentheses, so split after the *last* ')'.  Counting from
    # field 3 (state) at index 0, utime is field 14 and stime field 15.
    fields = raw[raw.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size (``VmHWM``) of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")

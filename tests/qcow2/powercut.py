"""Power-cut replay for qcow2 tests: log what reaches an image file, and
rebuild what a disk may hold after a cut (QCOW2.md section 7)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from nbdqcow.io import HostFile

__all__ = ["record", "replay"]


def record(monkeypatch: pytest.MonkeyPatch, f: HostFile, *,
           syncs: bool = True) -> list[tuple[Any, ...]]:
    """Log every write ("w", offset, bytes), truncate ("t", size) and, with
    ``syncs``, sync ("s",) of the image file ``f``, in order."""
    ops: list[tuple[Any, ...]] = []
    fd = f.fd
    real_pwritev, real_ftruncate = os.pwritev, os.ftruncate
    real_sync = f._fdatasync_raw

    def pwritev(fd_: int, bufs: Sequence[Any], off: int, *a: Any) -> int:
        n = real_pwritev(fd_, bufs, off, *a)
        if fd_ == fd:
            ops.append(("w", off, b"".join(bytes(b) for b in bufs)[:n]))
        return n

    def ftruncate(fd_: int, size: int) -> None:
        real_ftruncate(fd_, size)
        if fd_ == fd:
            ops.append(("t", size))

    def sync() -> None:
        real_sync()
        ops.append(("s",))

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    if syncs:
        monkeypatch.setattr(f, "_fdatasync_raw", sync)
    return ops


def replay(base: Path, ops: Sequence[tuple[Any, ...]], crash: Path) -> None:
    """``crash`` := ``base`` with the writes and truncates of ``ops``."""
    shutil.copy(base, crash)
    with open(crash, "r+b") as out:
        for o in ops:
            if o[0] == "w":
                out.seek(o[1])
                out.write(o[2])
            elif o[0] == "t":
                out.truncate(o[1])

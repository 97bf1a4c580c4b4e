"""Fresh test images, made by qemu's own tools (``qemu-img create``,
``qemu-io write -P``) so nbdqcow never judges images it wrote itself.

* ``data`` images are filled end to end with non-zero patterns (every qcow2
  cluster allocated), then fsynced so no writeback runs during a measurement;
  :func:`warm` reads them back into the page cache ("page cache warm",
  issue 6) before each run.
* ``empty`` and ``sparse`` images are created fresh for every write run and
  deleted right after it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

__all__ = ["create_empty", "create_filled", "remove", "settle", "warm"]

#: qemu-io writes the pattern in chunks of this size so it never needs a
#: buffer as large as the image.
_CHUNK = 64 << 20


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise RuntimeError(f"{argv[0]} failed (status {r.returncode}): {msg[-1] if msg else ''}")


def create_empty(path: Path, fmt: str, size: int) -> Path:
    """A new image of ``size`` bytes with nothing allocated."""
    remove(path)
    _run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)])
    return path


def create_filled(path: Path, fmt: str, size: int) -> Path:
    """A new image whose every byte is written with a non-zero pattern."""
    create_empty(path, fmt, size)
    argv = ["qemu-io", "-f", fmt]
    for i, off in enumerate(range(0, size, _CHUNK)):
        length = min(_CHUNK, size - off)
        # Vary the byte per chunk (1..255, never 0): a zero-detecting
        # writer could otherwise skip the data.
        argv += ["-c", f"write -q -P {i % 255 + 1} {off} {length}"]
    argv.append(str(path))
    _run(argv)
    settle(path)
    warm(path)
    return path


def settle(path: Path) -> None:
    """Write back dirty pages of ``path`` now, not during the next run."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def warm(path: Path) -> Path:
    """Pull ``path`` into the page cache; return it."""
    buf = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return path


def remove(path: Path) -> None:
    # Deleting a freshly written image drops its dirty pages without writing
    # them back, which keeps write runs from slowing down later runs.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

"""Fresh test images, made by qemu's own tools (``qemu-img create``,
``qemu-io write -P``) so nbdqcow never judges images it wrote itself.

* ``data`` images are filled end to end with non-zero patterns (every qcow2
  cluster allocated), then fsynced so no writeback runs during a measurement;
  :func:`warm` reads them back into the page cache ("page cache warm",
  issue 6) before each run.
* ``empty`` and ``sparse`` images are created fresh for every write run and
  deleted right after it.
* the ``huge`` image (1 TiB) has one block written under every L2 table.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

__all__ = ["create_empty", "create_filled", "create_spread", "remove", "settle", "warm"]

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


#: One write per this many bytes puts a data cluster under every L2 table
#: of a qcow2 image with the default 64 KiB clusters (8192 entries each).
L2_SPAN = 512 << 20


def create_spread(path: Path, fmt: str, size: int) -> Path:
    """A new image with one 4 KiB block written every 512 MiB.

    For qcow2 that allocates every L2 table of the image (128 MiB of tables
    for 1 TiB), so random reads across the disk keep missing the server's L2
    cache: the workload that shows whether its memory stays bounded.
    """
    create_empty(path, fmt, size)
    script = "".join(f"write -q -P 7 {off} 4096\n" for off in range(0, size, L2_SPAN))
    r = subprocess.run(
        ["qemu-io", "-f", fmt, str(path)],
        input=script,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        raise RuntimeError(f"qemu-io failed (status {r.returncode}): {r.stderr.strip()[-200:]}")
    settle(path)
    return warm(path)


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
    """Pull the allocated parts of ``path`` into the page cache; return it.

    Holes are skipped (``SEEK_DATA``/``SEEK_HOLE``): a sparse 1 TiB raw image
    has a few MiB to read, not a terabyte of zeroes.
    """
    buf = memoryview(bytearray(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            stop = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < stop:
                n = os.preadv(fd, [buf[: min(len(buf), stop - pos)]], pos)
                if n <= 0:
                    break
                pos += n
    finally:
        os.close(fd)
    return path


def remove(path: Path) -> None:
    # Deleting a freshly written image drops its dirty pages without writing
    # them back, which keeps write runs from slowing down later runs.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

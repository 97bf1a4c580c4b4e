"""open_backend: open a disk image file as a BlockBackend, qcow2 or raw.

Used by the CLI and the NBD server for the images an *operator* names.  The
format is probed (qcow2 magic, else raw) only when the caller does not give
one; images an image refers to (backing and data files) are never probed
unless the policy says so (see :mod:`nbdqcow.qcow2.backing`).
"""

from __future__ import annotations

import os

from nbdqcow.backends.base import BlockBackend
from nbdqcow.backends.raw import RawBackend
from nbdqcow.errors import ImageError
from nbdqcow.qcow2.backing import BackingPolicy
from nbdqcow.qcow2.image import open_image
from nbdqcow.qcow2.layout import MAGIC

__all__ = ["FORMATS", "open_backend", "probe_format"]

FORMATS = ("qcow2", "raw")


def probe_format(path: str | os.PathLike[str]) -> str:
    """"qcow2" if the file starts with the qcow2 magic, else "raw"."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == MAGIC.to_bytes(4, "big") else "raw"


def open_backend(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    read_only: bool = True,
    snapshot: str | None = None,
    policy: BackingPolicy | None = None,
    l2_cache_bytes: int | None = None,
) -> BlockBackend:
    """Open ``path`` as a backend.

    Args:
        path: the image.
        fmt: "qcow2" or "raw"; ``None`` probes by magic.
        read_only: open without write access.
        snapshot: internal snapshot to open (qcow2 only, read-only).
        policy: backing/data-file policy for qcow2 images.
        l2_cache_bytes: qcow2 L2 cache cap.

    Raises:
        ImageError and its subclasses, OSError.
    """
    if fmt is None:
        fmt = probe_format(path)
    if fmt not in FORMATS:
        raise ImageError(f"unknown image format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt == "raw":
        if snapshot is not None:
            raise ImageError("raw images have no snapshots")
        return RawBackend(path, read_only=read_only)
    return open_image(
        path,
        read_only=read_only,
        snapshot=snapshot,
        policy=policy,
        l2_cache_bytes=l2_cache_bytes,
    )

"""Opening a qcow2 image (qemu ``qcow2_do_open``): :func:`open_image`
and :func:`read_header`.

Reads cluster 0 and validates every header field (qcow2.txt "Header",
"Header extensions"; :mod:`~nbdqcow.qcow2.validate`), reads the snapshot
table (qcow2.txt "Snapshots") and the L1 table (active or a snapshot's),
opens the external data file and the backing chain under the operator's
:class:`~nbdqcow.qcow2.backing.BackingPolicy` (QCOW2.md, backing files),
and builds the :class:`~nbdqcow.qcow2.image.Qcow2Image`; a writable open
is finished by ``Qcow2Image.writer`` (:mod:`~nbdqcow.qcow2.writable`).
"""

from __future__ import annotations

import os
import struct
import sys
from array import array

from nbdqcow.backends.base import BlockBackend
from nbdqcow.errors import BackingRefused, ImageError, UnsupportedImage
from nbdqcow.io import HostFile
from nbdqcow.qcow2.backing import BackingPolicy, ChainGuard, resolve_reference
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.image import Qcow2Image
from nbdqcow.qcow2.layout import MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, Header
from nbdqcow.qcow2.snapshot import (
    SnapshotEntry,
    check_snapshot_l1,
    find_snapshot,
    read_snapshot_table,
)
from nbdqcow.qcow2.validate import validate_header

__all__ = ["open_image", "read_header"]

_SWAP = sys.byteorder == "little"


def read_header(file: HostFile, file_size: int, *, writable: bool = False) -> Header:
    """Read cluster 0 of ``file`` and validate the header (see
    :func:`~nbdqcow.qcow2.validate.validate_header`)."""
    head = file.pread_sync(0, min(file_size, 4096))
    if len(head) >= 24 and struct.unpack_from(">I", head)[0] == MAGIC:
        bits = struct.unpack_from(">I", head, 20)[0]
        if MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS and (1 << bits) > len(head):
            head = file.pread_sync(0, min(file_size, 1 << bits))
    h = Header.unpack(head)
    validate_header(h, file_size, writable=writable)
    return h


def _read_l1(file: HostFile, offset: int, entries: int) -> array:  # type: ignore[type-arg]
    l1 = array("Q")
    if entries:
        l1.frombytes(file.pread_sync(offset, entries * 8))
        if _SWAP:
            l1.byteswap()
    return l1


def open_image(
    path: str | os.PathLike[str],
    *,
    read_only: bool = True,
    snapshot: str | None = None,
    policy: BackingPolicy | None = None,
    l2_cache_bytes: int | None = None,
    _guard: ChainGuard | None = None,
) -> Qcow2Image:
    """Open a qcow2 image (synchronous: it only reads metadata).

    Args:
        path: the image file.
        read_only: must be ``True`` until the write engine is present.
        snapshot: open this internal snapshot (by ID or name), read-only.
        policy: what backing/data files may be followed (default: the
            image's directory only, format from the header extension).
        l2_cache_bytes: cap of the L2 cache (default 32 MiB).

    Raises:
        UnsupportedImage, CorruptImage, BackingRefused, ImageError, OSError.
    """
    policy = policy or BackingPolicy()
    spath = os.fspath(path)
    if snapshot is not None and not read_only:
        raise ImageError(f"snapshot {snapshot!r} can only be opened read-only")
    if not read_only and Qcow2Image.writer is None:
        raise UnsupportedImage("writing qcow2 images is not supported yet; open it read-only")
    guard = _guard or ChainGuard(policy)
    file = HostFile(spath, writable=not read_only)
    data: HostFile | None = None
    backing: BlockBackend | None = None
    try:
        guard.enter(spath, file.fd)
        fsize = file.size()
        h = read_header(file, fsize, writable=not read_only)
        geo = Geometry.from_header(h)
        snapshots = read_snapshot_table(file, h, fsize)
        chosen: SnapshotEntry | None = None
        size, l1_off, l1_size = h.size, h.l1_table_offset, h.l1_size
        if snapshot is not None:
            chosen = find_snapshot(snapshots, snapshot)
            # Like ``qemu-img convert -l``: the snapshot's L1 table seen at the
            # image's current virtual size (clusters past the snapshot's own
            # disk size read as unallocated).
            snap_size = chosen.disk_size if chosen.disk_size is not None else h.size
            check_snapshot_l1(chosen, geo, min(snap_size, h.size), fsize)
            l1_off, l1_size = chosen.l1_table_offset, chosen.l1_size
        l1 = _read_l1(file, l1_off, l1_size)
        data = file
        if h.has_data_file:
            assert h.data_file is not None
            dpath = resolve_reference(h.data_file, spath, policy, kind="data file")
            if os.path.samefile(dpath, spath):
                # Guest data would land on the image's own metadata.
                raise BackingRefused(f"data file of {spath!r} is the image file itself")
            data = HostFile(dpath, writable=not read_only)
        if h.backing_file is not None:
            backing = _open_backing(h, spath, policy, guard, l2_cache_bytes)
        img = Qcow2Image(
            spath, file, h, read_only=read_only, l1=l1, size=size, snapshots=snapshots,
            snapshot=chosen, data=data, backing=backing, l2_cache_bytes=l2_cache_bytes,
        )  # fmt: skip
        if not read_only and Qcow2Image.writer is not None:
            Qcow2Image.writer(img)
        return img
    except BaseException:
        if data is not None and data is not file:
            data.close()
        file.close()
        if backing is not None:
            _close_sync(backing)
        raise


def _close_sync(b: BlockBackend) -> None:
    if isinstance(b, Qcow2Image):
        b.close_files()
        if b.backing is not None:
            _close_sync(b.backing)
    else:
        close = getattr(getattr(b, "_file", None), "close", None)
        if close is not None:
            close()


def _open_backing(
    h: Header, path: str, policy: BackingPolicy, guard: ChainGuard, l2_cache_bytes: int | None
) -> BlockBackend:
    from nbdqcow.backends.raw import RawBackend  # local: raw has no qcow2 deps

    assert h.backing_file is not None
    bpath = resolve_reference(h.backing_file, path, policy, kind="backing file")
    fmt = h.backing_format
    if fmt is None:
        if not policy.probe_format:
            raise BackingRefused(
                f"backing file {h.backing_file.decode('utf-8', 'replace')!r} of {path!r} has "
                f"no format (no backing format header extension) and format probing is off"
            )
        with open(bpath, "rb") as f:
            fmt = "qcow2" if f.read(4) == MAGIC.to_bytes(4, "big") else "raw"
    if fmt == "qcow2":
        return open_image(bpath, policy=policy, l2_cache_bytes=l2_cache_bytes, _guard=guard)
    if fmt == "raw":
        guard.enter(bpath)
        return RawBackend(bpath, read_only=True)
    raise UnsupportedImage(f"backing file {bpath!r} has unsupported format {fmt!r}")

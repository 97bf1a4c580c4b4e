"""Opening a qcow2 image for writing (qemu ``qcow2_do_open`` with
``BDRV_O_RDWR``, and ``raw_apply_lock_bytes`` for the locks).

:func:`install` registers :func:`attach` as ``Qcow2Image.writer``, the hook
:func:`~nbdqcow.qcow2.image.open_image` calls for ``read_only=False``.
:func:`attach` runs once, synchronously, before any request:

* refuses what the engine does not write (external data file, encryption);
* locks the image for writing and every backing file against writers, in
  qemu's byte-range scheme (:mod:`nbdqcow.qcow2.lock`), so neither a second
  nbdqcow nor qemu can write them meanwhile;
* repairs a dirty image (lazy refcounts left stale by a crash): refcounts
  rebuilt from the metadata, then the dirty bit cleared with one synced
  header write;
* clears every autoclear bit (unknown ones, and the bitmaps bit since we
  do not keep bitmaps up to date) before the first write;
* installs the :class:`~nbdqcow.qcow2.write.WriteEngine` and the writable
  capabilities.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import replace

from nbdqcow.errors import CorruptImage, UnsupportedImage
from nbdqcow.qcow2.image import Qcow2Image, read_header
from nbdqcow.qcow2.layout import IncompatFeature
from nbdqcow.qcow2.lock import LOCK_READ, LOCK_WRITE, lock_image, unlock_image
from nbdqcow.qcow2.write import WriteEngine, chain_fds

__all__ = ["attach", "install"]


def install() -> None:
    """Register :func:`attach` as the writable-open hook of Qcow2Image."""
    Qcow2Image.writer = attach


def attach(img: Qcow2Image) -> None:
    """Finish a writable open (synchronous, before any request).

    Locks the image (and its backing chain against writers), repairs a
    dirty image, clears autoclear bits we do not maintain, and installs the
    engine.
    """
    h = img.header
    if img.data is not img.file or h.has_data_file:
        raise UnsupportedImage(
            f"{img.path}: writing images with an external data file is not supported"
        )
    if h.crypt_method:
        raise UnsupportedImage(f"{img.path}: writing encrypted images is not supported")
    locked: list[int] = []
    try:
        lock_image(img.file.fd, img.path, LOCK_WRITE)
        locked.append(img.file.fd)
        for fd, path in chain_fds(img):
            lock_image(fd, path, LOCK_READ)
            locked.append(fd)
        if h.dirty:
            _repair_dirty(img)
        engine = WriteEngine(img)
        h = img.header
        if h.autoclear_features:
            # Unknown autoclear bits, and the bitmaps bit (we do not keep
            # bitmaps up to date), must be cleared before the first write,
            # or qemu would trust stale data (qcow2.txt, autoclear_features).
            engine.meta.write_header(replace(h, autoclear_features=0))
        img.engine = engine
        # The server calls try_pwritev once per small write: bound here to
        # the engine's method, the call skips Qcow2Image.try_pwritev's
        # frame (which only delegates to it).
        img.try_pwritev = engine.try_pwritev  # type: ignore[method-assign]
        img._caps = replace(
            img.caps, read_only=False, flush=True, fua=True, trim=True, zero=True,
            fast_zero=True,
        )  # fmt: skip
    except BaseException:
        for fd in locked:
            unlock_image(fd)
        raise


def _repair_dirty(img: Qcow2Image) -> None:
    """A dirty lazy-refcounts image: rebuild refcounts before writing
    (qemu runs ``check -r all`` on such an open), then clear the bit."""
    from nbdqcow.qcow2.check import Repair, check_image

    # We hold the image's write lock through img.file already.
    res = check_image(img.path, Repair.ALL, lock=False)
    if res.exit_code not in (0, 3):
        raise CorruptImage(
            f"{img.path}: the image was dirty and could not be repaired "
            f"({res.corruptions} corruptions left)"
        )
    fresh = read_header(img.file, img.file.size(), writable=True)
    h = replace(fresh, incompatible_features=fresh.incompatible_features & ~IncompatFeature.DIRTY)
    img.file.pwrite_sync(0, h.pack())
    img.file.fdatasync_sync()
    img.header = h.layout()
    raw = img.file.pread_sync(h.l1_table_offset, h.l1_size * 8)
    l1 = array("Q", [e for (e,) in struct.iter_unpack(">Q", raw)])
    img.l1[:] = l1
    img.l2_cache.clear()

"""The qcow2 format engine, split by concern like qemu's ``block/qcow2*.c``.

Public entry point: :func:`open_image` (synchronous; returns a
:class:`Qcow2Image`, which implements
:class:`~nbdqcow.backends.base.BlockBackend`).  Backing and data-file
references are followed under a :class:`BackingPolicy`.
"""

from nbdqcow.qcow2.backing import BackingPolicy
from nbdqcow.qcow2.image import Qcow2Image, open_image
from nbdqcow.qcow2.writable import install as _install_writer

# Registers the write engine as Qcow2Image.writer (writable opens).
_install_writer()

__all__ = ["BackingPolicy", "Qcow2Image", "open_image"]

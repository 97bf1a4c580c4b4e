"""The exception tree shared by every layer.

Every error a user can cause (a bad image, a refused backing file, a bad
command line, a misbehaving peer) is an :class:`NbdqcowError`; its message is
meant for the user and names the problem.  The CLI prints it as one line and
exits non-zero; the server maps it to an NBD error reply.  Anything that is not
an ``NbdqcowError`` (or an ``OSError`` from the host) is a bug.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "BackingRefused",
    "CorruptImage",
    "ImageError",
    "ImageLocked",
    "NbdqcowError",
    "UnsupportedImage",
]


class NbdqcowError(Exception):
    """Base class; ``str(exc)`` is a complete, user-facing sentence."""

    #: errno an NBD server reports when this error fails a request.
    errno: int = _errno.EIO


class ImageError(NbdqcowError):
    """An image cannot be opened or used as it is (format or policy)."""


class UnsupportedImage(ImageError):
    """The image uses a feature nbdqcow does not implement (refused at open)."""

    errno = _errno.ENOTSUP


class CorruptImage(ImageError):
    """Image metadata is inconsistent (at open, or found during a request)."""


class BackingRefused(ImageError):
    """A backing or data-file reference was not opened, by policy or because
    it does not resolve to a usable file."""

    errno = _errno.EACCES


class ImageLocked(ImageError):
    """Another process holds a conflicting lock on the image."""

    errno = _errno.EBUSY

"""Policy for the files an image refers to: backing files and external data
files (QCOW2.md section 10, "The backing file name is attacker data").

A qcow2 image names other files, and whoever wrote the image chose those
names.  Followed blindly, a name such as ``/etc/shadow`` or ``/dev/sda``
exports a host file through the NBD server; a raw file whose first sector
was overwritten with a qcow2 header would, if its format were probed, pull in
yet another file (CVE-2008-2004).  So, by default:

* a name is a plain path: protocol and ``json:`` pseudo-names are refused;
* it resolves relative to the referring image's directory, symlinks resolved,
  and the result must lie inside that directory or one of the operator's
  allow-listed directories (:attr:`BackingPolicy.allow_dirs`);
* the result must be an existing regular file (no devices, FIFOs, sockets);
* the backing format comes from the backing-format header extension; a
  reference without one is refused unless the operator opts into probing;
* backing files are opened read-only, chains are at most
  :attr:`BackingPolicy.max_depth` deep, and a file already in the chain
  (same device and inode) is a loop.

:func:`resolve_reference` applies all of that and says why it refused.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from nbdqcow.errors import BackingRefused

__all__ = ["DEFAULT_MAX_DEPTH", "BackingPolicy", "ChainGuard", "resolve_reference"]

DEFAULT_MAX_DEPTH = 16

# "nbd:", "json:{...}", "https://" -- qemu's protocol syntax.  A relative file
# name containing a colon before any slash would be read by qemu as a
# protocol too, so refusing it matches what qemu would not open as a file.
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


@dataclass(frozen=True, slots=True)
class BackingPolicy:
    """What implicit references an opened image may follow.

    Attributes:
        follow: open backing files and data files at all; with ``False``
            any image that has one is refused.
        allow_dirs: directories (besides the image's own) whose regular files
            may be referenced.
        probe_format: probe the format (qcow2 magic, else raw) of a backing
            file whose referrer does not name its format.  Unsafe for
            untrusted images; off by default.
        max_depth: longest allowed backing chain, counting the top image.
    """

    follow: bool = True
    allow_dirs: tuple[str, ...] = ()
    probe_format: bool = False
    max_depth: int = DEFAULT_MAX_DEPTH


class ChainGuard:
    """Tracks the files of one chain being opened: depth and loops."""

    def __init__(self, policy: BackingPolicy) -> None:
        self.policy = policy
        self._seen: dict[tuple[int, int], str] = {}
        self.depth = 0

    def enter(self, path: str, fd: int | None = None) -> None:
        """Register the file ``path`` (open as ``fd`` if given) as the next
        layer of the chain."""
        st = os.fstat(fd) if fd is not None else os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in self._seen:
            raise BackingRefused(
                f"backing chain loop: {path!r} is already in the chain "
                f"(as {self._seen[key]!r})"
            )
        self._seen[key] = path
        self.depth += 1
        if self.depth > self.policy.max_depth:
            raise BackingRefused(
                f"backing chain is deeper than the limit of {self.policy.max_depth} "
                f"images at {path!r}"
            )


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def resolve_reference(name: bytes, referrer: str, policy: BackingPolicy, *, kind: str) -> str:
    """Turn a file name stored in an image into a path we may open.

    Args:
        name: the stored name (backing file or data file name).
        referrer: path of the image that stores it.
        policy: the operator's policy.
        kind: "backing file" or "data file", for messages.

    Returns:
        The resolved real path of a regular file.

    Raises:
        BackingRefused: with the reason.
    """
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise BackingRefused(f"{kind} name {name!r} is not valid UTF-8") from None
    if not policy.follow:
        raise BackingRefused(
            f"image {referrer!r} refers to {kind} {text!r}, and following references is disabled"
        )
    if not text or "\0" in text:
        raise BackingRefused(f"{kind} name {text!r} is empty or contains NUL")
    if _PROTOCOL.match(text):
        raise BackingRefused(
            f"{kind} name {text!r} is a protocol or json: reference; only file names are allowed"
        )
    base_dir = os.path.realpath(os.path.dirname(os.path.abspath(referrer)))
    candidate = os.path.realpath(os.path.join(base_dir, text))
    allowed = [base_dir, *(os.path.realpath(d) for d in policy.allow_dirs)]
    if not any(_inside(candidate, d) for d in allowed):
        raise BackingRefused(
            f"{kind} {text!r} of {referrer!r} resolves to {candidate!r}, outside the image's "
            f"directory and the allowed directories"
        )
    try:
        st = os.stat(candidate)
    except OSError as e:
        raise BackingRefused(
            f"{kind} {text!r} of {referrer!r} cannot be opened: {e.strerror}"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise BackingRefused(f"{kind} {text!r} of {referrer!r} is not a regular file")
    return candidate

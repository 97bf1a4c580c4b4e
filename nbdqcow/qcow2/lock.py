"""Image locking compatible with qemu's (``block/file-posix.c``,
``raw_apply_lock_bytes``/``raw_check_lock_bytes``).

qemu expresses what an open image needs and what it lets others do as
open-file-description (OFD) byte-range locks: a shared lock on byte
``100 + p`` means "I hold permission p", a shared lock on byte ``200 + p``
means "I do not let anyone else hold permission p".  Permission bits: 0
consistent read, 1 write, 2 write-unchanged, 3 resize, 4 graph-mod.  Taking
the same scheme means qemu refuses to write an image we serve writable (and
we refuse one qemu is writing), with no lock file anywhere.

OFD locks belong to the open file description, so they vanish with the
last fd of it (a crash releases them), and they do not conflict with other
locks of the same description.  ``F_OFD_GETLK`` reports no PID for OFD
locks, so to name the holder we look for processes that have the file open.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct

from nbdqcow.errors import ImageLocked

__all__ = ["LOCK_READ", "LOCK_WRITE", "lock_image", "unlock_image"]

_PERM_BASE = 100
_SHARED_BASE = 200
_CONSISTENT_READ = 0
_WRITE = 1

#: (permissions held, permissions not shared with others)
LOCK_WRITE = ((_CONSISTENT_READ, _WRITE), (_WRITE,))
#: a backing file we read and whose contents must not change under us.
LOCK_READ = ((_CONSISTENT_READ,), (_WRITE,))

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (padded to 32 bytes on x86-64 Linux).
_FLOCK = struct.Struct("hhqqi4x")


def _lock(fd: int, cmd: int, ltype: int, byte: int) -> int:
    req = _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0)
    out = fcntl.fcntl(fd, cmd, req)
    return int(_FLOCK.unpack(out)[0])


def _conflicts(fd: int, byte: int) -> bool:
    """Would a shared lock on ``byte`` meet someone else's lock?  Tested
    with an exclusive request, as qemu does: any foreign lock on the byte
    means that permission is held (or unshared) elsewhere."""
    return _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def holders(path: str) -> list[str]:
    """``pid (command)`` of every other process that has ``path`` open."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    me = os.getpid()
    out: list[str] = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    s = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                    with open(f"/proc/{pid}/comm") as f:
                        out.append(f"pid {pid} ({f.read().strip()})")
                    break
        except OSError:
            continue
    return out


def _who(path: str) -> str:
    # No other process has it open: the conflicting lock is ours, through
    # another open of the same file (e.g. the image served twice).
    return ", ".join(holders(path)) or "another open file of this process"


def lock_image(fd: int, path: str, mode: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    """Take qemu-style locks for ``mode`` on the open file ``fd``.

    Raises:
        ImageLocked: another open file holds a conflicting permission; the
            message names the processes that have the file open.
    """
    perms, unshared = mode
    clash: list[str] = []
    for p in perms:
        if _conflicts(fd, _SHARED_BASE + p):
            clash.append("write" if p == _WRITE else "consistent read")
    for p in unshared:
        if _conflicts(fd, _PERM_BASE + p):
            clash.append("write" if p == _WRITE else "consistent read")
    if clash:
        who = _who(path)
        raise ImageLocked(
            f"{path} is in use: failed to get a shared {clash[0]!r} lock "
            f"(held by {who}); is another nbdqcow or qemu process using the image?"
        )
    try:
        for p in perms:
            _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _PERM_BASE + p)
        for p in unshared:
            _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _SHARED_BASE + p)
    except OSError as exc:
        # Lost a race with another opener between the test and the lock.
        unlock_image(fd)
        who = _who(path)
        raise ImageLocked(f"{path} is in use (held by {who}): {exc.strerror}") from None


def unlock_image(fd: int) -> None:
    """Drop every lock byte we may hold on ``fd``."""
    for base in (_PERM_BASE, _SHARED_BASE):
        for p in range(5):
            with contextlib.suppress(OSError):
                _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, base + p)

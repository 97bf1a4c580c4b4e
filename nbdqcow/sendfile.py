"""Read replies sent straight from the image file with ``os.sendfile``.

Issue 6: on the CI machine ``sendfile`` after the reply header moved a raw
file at 9.9 GiB/s against 3.6-4.6 GiB/s for ``preadv`` + ``sendmsg``.  The
protocol core builds replies from buffers (:meth:`reply_read` references,
never copies, a single run covering the request), so the session gives it a
*placeholder*: a slice of a read-only, never-touched zero mapping of the
right length.  At the flush, :meth:`SendfileReplies.swap` replaces each
placeholder in the core's output with the :class:`~nbdqcow.stream.FileSpan`
it stands for, and :class:`~nbdqcow.stream.PlainStream` sends that with
``os.sendfile`` after the header (``MSG_MORE``).

``sendfile`` runs on the event loop, so a range is sent this way only when
it looks cached (:func:`resident`: one ``preadv2(..., RWF_NOWAIT)`` of one
byte, about 1.2 us from Python on the CI machine; the session probes both
ends of a read, or only the last when the read continues the previous one).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence

from nbdqcow.backends.base import Buffer
from nbdqcow.io import memory_backed
from nbdqcow.stream import FileSpan

__all__ = ["MAX", "MIN", "SendfileReplies", "page_cached", "resident"]

#: Reads at least this long use sendfile; smaller ones are cheaper to batch:
#: many replies per ``sendmsg`` beat one ``sendfile`` each.
MIN = 64 * 1024
#: The longest placeholder (proto.md's usual 32 MiB payload cap; longer reads
#: take the copying path).
MAX = 32 << 20
#: Placeholders cost address space only: the pages are never written, and
#: reading them (a pad, see FileSpan) maps the shared zero page.
_ZEROS = mmap.mmap(-1, MAX, prot=mmap.PROT_READ)

_HAVE_NOWAIT = hasattr(os, "RWF_NOWAIT")


#: Where :func:`resident` reads its one byte: never looked at, so one shared
#: scratch byte serves every connection.
_SCRATCH = [memoryview(bytearray(1))]


def resident(fd: int, offset: int) -> bool:
    """Is the byte at ``offset`` in the page cache?  One ``preadv2(...,
    RWF_NOWAIT)`` of one byte; ``False`` at or past the end of the file, or
    when the kernel cannot tell.  On tmpfs, which refuses ``RWF_NOWAIT``,
    every page is in memory: ``True``."""
    if not _HAVE_NOWAIT:
        return False
    try:
        return os.preadv(fd, _SCRATCH, offset, os.RWF_NOWAIT) == 1
    except BlockingIOError:  # not cached
        return False
    except OSError as e:  # EOPNOTSUPP: cannot tell, unless it lives in memory
        return e.errno == errno.EOPNOTSUPP and memory_backed(fd) \
            and os.preadv(fd, _SCRATCH, offset) == 1


def page_cached(fd: int, offset: int, length: int, probe: bytearray) -> bool:
    """Are the first and last byte of the range in the page cache?

    ``sendfile`` runs on the event loop: a read from disk there would stall
    every client, so a range that looks cold takes the copying path (which
    reads in a thread on a miss).  A heuristic: the middle could still be
    cold, but reads of a cold file usually miss at the first page, and
    readahead fills ranges whole.  At or past the end of the file it says
    no, so a short file's zeroes come from the copying path.
    """
    if not _HAVE_NOWAIT:
        return False
    view = [memoryview(probe)[:1]]
    try:
        return (os.preadv(fd, view, offset, os.RWF_NOWAIT) == 1
                and os.preadv(fd, view, offset + length - 1, os.RWF_NOWAIT) == 1)
    except BlockingIOError:  # not cached
        return False
    except OSError as e:  # EOPNOTSUPP: cannot tell, unless it lives in memory
        return e.errno == errno.EOPNOTSUPP and memory_backed(fd) \
            and os.preadv(fd, view, offset + length - 1) == 1


class SendfileReplies:
    """The placeholders of one connection whose replies are queued."""

    __slots__ = ("_spans",)

    def __init__(self) -> None:
        self._spans: dict[int, FileSpan] = {}

    def __bool__(self) -> bool:
        return bool(self._spans)

    @staticmethod
    def placeholder(length: int) -> memoryview:
        """A run of ``length`` bytes to hand to ``reply_read`` (``MIN`` to
        ``MAX``); :meth:`register` it once the reply is queued."""
        return memoryview(_ZEROS)[:length]

    @staticmethod
    def is_placeholder(run: object) -> bool:
        return type(run) is memoryview and run.obj is _ZEROS

    def register(self, run: memoryview, fd: int, offset: int) -> None:
        """``run``, queued in the core, stands for ``fd`` from ``offset``."""
        self._spans[id(run)] = FileSpan(fd, offset, run.nbytes, run)

    def clear(self) -> None:
        self._spans.clear()

    def swap(self, bufs: Sequence[Buffer]) -> list[Buffer | FileSpan]:
        """The core's output with each placeholder replaced by its span.

        A placeholder is zeroes: sending one as data would hand the client
        wrong bytes, so one not registered (the core copied or sliced it,
        against its documented contract) ends the connection instead.

        Raises:
            ConnectionAbortedError: an unknown placeholder.
        """
        spans = self._spans
        out: list[Buffer | FileSpan] = []
        for b in bufs:
            if type(b) is memoryview and b.obj is _ZEROS:
                span = spans.pop(id(b), None)
                if span is None or span.pad is not b:
                    spans.clear()
                    raise ConnectionAbortedError(errno.ECONNABORTED,
                                                 "internal error: a sendfile reply lost its place")
                out.append(span)
            else:
                out.append(b)
        spans.clear()  # replies the core dropped (shutdown): nothing to send
        return out

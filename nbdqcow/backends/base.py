"""The block-backend interface (ARCHITECTURE.md section 8.4).

One interface serves every storage layer: raw files, qcow2 images, and later
overlays and filters that wrap another backend (nbdkit's plugin/filter chain).
It is positional (no file position), vectored (a list of caller-owned
``memoryview`` buffers per call, so payloads are never concatenated) and
async, so that an implementation may hand blocking work to a thread.

Contract, as in nbdkit's ``backend.c``: the caller (the NBD server, the CLI)
validates every request before it gets here -- ``offset`` and ``length`` lie
inside ``[0, size)``, writes only reach writable backends, ``fast=True`` only
when ``caps.fast_zero``.  A backend may ``assert`` those.  What a backend
reports is failure of the operation itself, as ``OSError`` carrying an errno
(``ENOSPC``, ``EIO``, ``ENOTSUP`` for a zero that cannot be fast) or as an
:class:`nbdqcow.errors.NbdqcowError` (corrupt metadata, mapped to ``EIO``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "MAX_REQUEST",
    "BlockBackend",
    "Buffer",
    "Capabilities",
    "Extent",
    "ExtentFlag",
    "InlineIO",
]

#: A byte buffer as accepted by ``os.pwritev``/``socket.sendmsg``.
Buffer = bytes | bytearray | memoryview

#: Largest single read/write a backend is asked to do by default (32 MiB, the
#: Linux kernel client's maximum request and nbdkit's default).
MAX_REQUEST = 32 * 1024 * 1024


class ExtentFlag(enum.IntFlag):
    """Status of an extent; the bits are those of NBD ``base:allocation``.

    ``HOLE`` (``NBD_STATE_HOLE``): no storage is allocated for the range at
    any layer that would be read; ``ZERO`` (``NBD_STATE_ZERO``): the range
    reads as zeroes.  ``DATA`` (no bit) is allocated data of unknown content.
    """

    DATA = 0
    HOLE = 1
    ZERO = 2


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest bytes with one status.

    Attributes:
        offset: guest (virtual disk) offset of the run.
        length: number of bytes, always > 0.
        flags: allocation status (see :class:`ExtentFlag`).
        depth: the layer that decides what the run reads as, for
            ``qemu:allocation-depth``: 1 is this image, 2 its backing file,
            and so on; 0 means no layer of the chain allocates it (it reads as
            zeroes because nothing is there).
        host_offset: where the run's data lies in the file of layer
            ``depth`` when it is stored there uncompressed, else ``None``
            (the ``offset`` of ``qemu-img map --output=json``).
    """

    offset: int
    length: int
    flags: ExtentFlag
    depth: int = 1
    host_offset: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; queried once per export and cached (nbdkit's
    ``can_*`` callbacks).  Maps onto NBD transmission flags.

    The block sizes are those of ``NBD_INFO_BLOCK_SIZE``: requests not aligned
    to ``min_block`` are refused at the edge; ``max_block`` bounds a payload.
    """

    read_only: bool
    flush: bool = True
    fua: bool = True
    trim: bool = False
    zero: bool = False
    fast_zero: bool = False
    cache: bool = False
    extents: bool = True
    #: FLUSH on one connection makes every connection's completed writes
    #: durable: true whenever all connections share one backend object.
    multi_conn: bool = True
    rotational: bool = False
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_REQUEST


@runtime_checkable
class BlockBackend(Protocol):
    """A random-access virtual disk of ``size`` bytes."""

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        ...

    @property
    def caps(self) -> Capabilities:
        """Capabilities; constant for the life of the object."""
        ...

    async def preadv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` entirely, in order, from guest bytes at ``offset``."""
        ...

    async def pwritev(self, offset: int, bufs: Sequence[Buffer], *, fua: bool = False) -> None:
        """Write all of ``bufs``, in order, at ``offset``; with ``fua`` the
        data is durable when this returns (``NBD_CMD_FLAG_FUA``)."""
        ...

    async def flush(self) -> None:
        """Make every completed write durable (``NBD_CMD_FLUSH``)."""
        ...

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Advise that the range is no longer needed (``NBD_CMD_TRIM``).

        Afterwards the range may read as anything, but reads must be stable.
        """
        ...

    async def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        """Make the range read as zeroes (``NBD_CMD_WRITE_ZEROES``).

        ``may_trim`` is the inverse of ``NBD_CMD_FLAG_NO_HOLE``.  With
        ``fast`` (``NBD_CMD_FLAG_FAST_ZERO``) the backend must raise
        ``OSError(errno.ENOTSUP)`` without changing anything if zeroing
        would be no faster than writing zeroes.
        """
        ...

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch the range (``NBD_CMD_CACHE``); advisory."""
        ...

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Describe ``[offset, offset+length)``.

        Returns contiguous extents starting exactly at ``offset``; the first
        is non-empty, the total is at most ``length`` (a backend may stop
        early when describing more would be costly), and neighbours with
        equal ``flags`` and ``depth`` should be merged.
        """
        ...

    async def aclose(self) -> None:
        """Flush if writable and release every resource.  Idempotent."""
        ...


@runtime_checkable
class InlineIO(Protocol):
    """Optional synchronous fast path of a backend (issue 6).

    A 4 KiB read of cached data costs a few microseconds of syscall; the
    coroutine frames, futures and task hand-offs of the ``async`` methods cost
    several times that.  The server therefore first offers each small READ
    and each WRITE to these methods, called on the event-loop thread, and
    takes the ``async`` path only when they decline.

    The contract, for both methods:

    * **All or nothing.**  ``True``: the operation is complete, exactly as
      the ``async`` method would have completed it (same bytes, same
      durability, same metadata).  ``False``: nothing observable happened
      (buffers passed to a read may have been scribbled on); the caller then
      runs the ``async`` method.  Declining is always allowed.
    * **Never block, never suspend.**  No disk read (use ``RWF_NOWAIT``;
      ``BlockingIOError`` means decline), no ``fsync``, no lock wait, no
      metadata that is not cached, nothing that awaits.  A backend may
      decline on any cache miss.  A buffered ``pwritev`` into the page
      cache counts as not blocking, as it does in the ``async`` path.
    * **Errors** are raised as the ``async`` method would raise them; the
      caller may also simply retry through the ``async`` path to report them.
    * The caller has validated the request (range, read-only, alignment).
    """

    def try_preadv(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        """Fill ``bufs`` from ``offset`` without blocking, or decline."""
        ...

    def try_pwritev(self, offset: int, bufs: Sequence[Buffer], fua: bool) -> bool:
        """Write ``bufs`` at ``offset`` without blocking, or decline (a
        backend declines every ``fua`` write that needs a sync)."""
        ...

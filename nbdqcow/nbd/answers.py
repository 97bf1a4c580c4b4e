"""Data the application gives the core: an export's description, list
entries, and the runs of a read reply.

:class:`ExportInfo` turns backend :class:`~nbdqcow.backends.base.Capabilities`
into the transmission flags and ``NBD_INFO_BLOCK_SIZE`` values of proto.md
("Transmission flags", "Block size constraints").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nbdqcow.backends.base import Buffer, Capabilities
from nbdqcow.nbd.constants import TransmissionFlag

__all__ = [
    "ALLOCATION_DEPTH",
    "BASE_ALLOCATION",
    "ExportInfo",
    "ExportListing",
    "Hole",
    "ReadRun",
]

_T = TransmissionFlag
_HAS_FLAGS, _READ_ONLY, _SEND_FLUSH = int(_T.HAS_FLAGS), int(_T.READ_ONLY), int(_T.SEND_FLUSH)
_SEND_FUA, _ROTATIONAL, _SEND_TRIM = int(_T.SEND_FUA), int(_T.ROTATIONAL), int(_T.SEND_TRIM)
_SEND_WRITE_ZEROES, _SEND_FAST_ZERO = int(_T.SEND_WRITE_ZEROES), int(_T.SEND_FAST_ZERO)
_SEND_DF, _CAN_MULTI_CONN, _SEND_CACHE = int(_T.SEND_DF), int(_T.CAN_MULTI_CONN), int(_T.SEND_CACHE)
# int -> TransmissionFlag, filled as exports are negotiated (at most 2**13).
_FLAGS: dict[int, TransmissionFlag] = {}

#: The one context proto.md defines ("Metadata contexts").
BASE_ALLOCATION = "base:allocation"
#: qemu's context: the backing-chain depth that allocates a range.
ALLOCATION_DEPTH = "qemu:allocation-depth"


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the core needs to know about an export to negotiate it.

    Attributes:
        name: the export's canonical name (sent as ``NBD_INFO_NAME``).
        size: virtual size in bytes.
        caps: the backend's capabilities (flags, block sizes).
        description: human text for ``NBD_INFO_DESCRIPTION``/``LIST``.
        meta_contexts: contexts offered; ``None`` means both
            ``base:allocation`` and ``qemu:allocation-depth`` when
            ``caps.extents``, none otherwise.
        require_block_size: answer ``GO``/``INFO`` that did not request
            ``NBD_INFO_BLOCK_SIZE`` with ``ERR_BLOCK_SIZE_REQD``.  ``None``
            (default) means "when ``caps.min_block`` > 512": every Linux
            block-layer client (the kernel, qemu) issues 512-aligned I/O
            without asking, so refusing them for a 512-byte minimum would only
            break them.
        memo: the core's answers for this export, built at their first use
            (:mod:`nbdqcow.nbd.decisions`: INFO/GO replies, the negotiated
            export state).  Everything above is immutable, so they stay
            valid for as long as the object lives: an application that keeps
            one ``ExportInfo`` per export (and makes a new one when the
            export changes, e.g. its size) negotiates each client from it.
    """

    name: str
    size: int
    caps: Capabilities
    description: str = ""
    meta_contexts: tuple[str, ...] | None = None
    require_block_size: bool | None = None
    memo: dict[Any, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @property
    def contexts(self) -> tuple[str, ...]:
        """The metadata contexts this export offers."""
        if self.meta_contexts is not None:
            return self.meta_contexts
        return (BASE_ALLOCATION, ALLOCATION_DEPTH) if self.caps.extents else ()

    @property
    def needs_block_size(self) -> bool:
        if self.require_block_size is not None:
            return self.require_block_size
        return self.caps.min_block > 512

    def transmission_flags(self, structured: bool) -> TransmissionFlag:
        """The 16-bit transmission flags for this export.

        Write-type commands are advertised only on writable exports (qemu
        does the same); ``SEND_DF`` only with structured replies (proto.md:
        "MUST leave this flag clear if structured replies have not been
        negotiated").
        """
        # Computed on plain ints and converted once (through a cache): each
        # "|=" on the IntFlag built a new enum object, a dozen per handshake.
        c = self.caps
        f = _HAS_FLAGS
        if c.read_only:
            f |= _READ_ONLY
        if c.flush:
            f |= _SEND_FLUSH
        if c.fua:
            f |= _SEND_FUA
        if c.rotational:
            f |= _ROTATIONAL
        if not c.read_only:
            if c.trim:
                f |= _SEND_TRIM
            if c.zero:
                f |= _SEND_WRITE_ZEROES
                if c.fast_zero:
                    f |= _SEND_FAST_ZERO
        if structured:
            f |= _SEND_DF
        if c.multi_conn:
            f |= _CAN_MULTI_CONN
        if c.cache:
            f |= _SEND_CACHE
        flags = _FLAGS.get(f)
        if flags is None:
            flags = _FLAGS[f] = TransmissionFlag(f)
        return flags


@dataclass(frozen=True, slots=True)
class ExportListing:
    """One ``NBD_REP_SERVER`` entry of ``NBD_OPT_LIST``."""

    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class Hole:
    """A run of a read that reads as zeroes and has no buffer.

    With structured replies it becomes an ``NBD_REPLY_TYPE_OFFSET_HOLE``
    chunk; with simple replies (or ``DF``) it is sent as slices of one shared
    zero buffer, so no zero-filled payload is ever built.
    """

    length: int


#: One piece of a read reply: a caller-owned buffer of data, or a hole.
ReadRun = Buffer | Hole

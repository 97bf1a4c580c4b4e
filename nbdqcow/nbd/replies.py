"""Transmission replies as lists of buffers (proto.md "Simple reply
message", "Structured reply chunk message", "Structured reply types";
extended reply headers from the ``extension-ext-header`` branch).

Each builder returns one complete reply: small header ``bytes`` and the
caller's payload buffers, never joined, ready for one vectored send.

Which header a reply uses:

* nothing negotiated: simple replies only;
* structured replies: chunks for READ and for errors (so the message
  reaches the user), simple replies for other successes (allowed, and what
  qemu sends);
* extended headers: extended chunks for everything (simple replies are
  forbidden), each echoing the request's offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from nbdqcow.backends.base import Buffer
from nbdqcow.nbd.answers import Hole, ReadRun
from nbdqcow.nbd.constants import (
    EXTENDED_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Errno,
    ReplyFlag,
    ReplyType,
)
from nbdqcow.nbd.options import encode_message
from nbdqcow.nbd.wire import (
    ERROR_HEAD,
    EXTENDED_DATA_HEAD,
    OFFSET_DATA_HEAD,
    OFFSET_HOLE,
    SIMPLE_REPLY,
    STRUCTURED_DATA_HEAD,
    pack_block_status,
    pack_extended_reply,
    pack_simple_reply,
    pack_structured_reply,
)

__all__ = [
    "MAX_CHUNK",
    "ReplyMode",
    "block_status",
    "empty",
    "error",
    "ok",
    "read",
    "read_header",
]

#: Largest data or hole run put in one chunk.  Compact chunk lengths are 32
#: bits and include the 8-byte offset; 2 GiB keeps chunks 512-aligned.
MAX_CHUNK = 1 << 31

_DONE = int(ReplyFlag.DONE)
_NONE, _ERROR = int(ReplyType.NONE), int(ReplyType.ERROR)
_DATA, _HOLE = int(ReplyType.OFFSET_DATA), int(ReplyType.OFFSET_HOLE)

# One shared buffer of zeroes; holes in simple or DF replies are sent as
# slices of it, so no zero-filled payload is ever allocated per request.
_ZEROES = memoryview(bytes(1 << 20))


class ReplyMode(NamedTuple):
    """The reply style negotiated on a connection."""

    structured: bool = False
    extended: bool = False


def _chunk(mode: ReplyMode, flags: int, type_: int, cookie: int, req_offset: int, n: int) -> bytes:
    if mode.extended:
        return pack_extended_reply(flags, type_, cookie, req_offset, n)
    return pack_structured_reply(flags, type_, cookie, n)


def _zeroes(n: int) -> list[Buffer]:
    out: list[Buffer] = []
    while n > 0:
        k = min(n, _ZEROES.nbytes)
        out.append(_ZEROES[:k])
        n -= k
    return out


def _bytes_view(run: Buffer) -> memoryview:
    mv = memoryview(run)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def ok(mode: ReplyMode, cookie: int, req_offset: int) -> list[Buffer]:
    """Success without payload."""
    if mode.extended:
        return [_chunk(mode, _DONE, _NONE, cookie, req_offset, 0)]
    return [pack_simple_reply(0, cookie)]


def empty(mode: ReplyMode, cookie: int, req_offset: int, read: bool) -> list[Buffer]:
    """Success for a zero-length request.  A READ with structured replies
    must not get a simple reply ("even for the case of an early EINVAL"), and
    has no content to send: a lone ``NONE`` chunk ("implies that the overall
    client request is successful")."""
    if mode.structured and read and not mode.extended:
        return [pack_structured_reply(_DONE, _NONE, cookie, 0)]
    return ok(mode, cookie, req_offset)


def error(mode: ReplyMode, cookie: int, req_offset: int, err: Errno, message: str) -> list[Buffer]:
    """An error; the message is sent only in a structured ``ERROR`` chunk."""
    if not mode.structured:
        return [pack_simple_reply(err, cookie)]
    msg = encode_message(message)
    payload = ERROR_HEAD.pack(err, len(msg)) + msg
    head = _chunk(mode, _DONE, _ERROR, cookie, req_offset, len(payload))
    return [head + payload]


def _pieces(runs: Sequence[ReadRun]) -> list[memoryview | Hole]:
    """Normalise runs: drop empty ones, merge adjacent holes, cut at MAX_CHUNK."""
    if len(runs) == 1 and not isinstance(runs[0], Hole):
        mv = _bytes_view(runs[0])  # the common case: one buffer
        if 0 < mv.nbytes <= MAX_CHUNK:
            return [mv]
    out: list[memoryview | Hole] = []
    for run in runs:
        if isinstance(run, Hole):
            if run.length <= 0:
                continue
            if out and isinstance(out[-1], Hole):
                out[-1] = Hole(out[-1].length + run.length)
            else:
                out.append(run)
            continue
        mv = _bytes_view(run)
        if mv.nbytes:
            out.append(mv)
    cut: list[memoryview | Hole] = []
    for p in out:
        if isinstance(p, Hole):
            n = p.length
            while n > MAX_CHUNK:
                cut.append(Hole(MAX_CHUNK))
                n -= MAX_CHUNK
            cut.append(Hole(n))
        else:
            for i in range(0, p.nbytes, MAX_CHUNK):
                cut.append(p[i : i + MAX_CHUNK])
    return cut


def read_header(mode: ReplyMode, cookie: int, offset: int, length: int) -> bytes:
    """The header that precedes the data of a READ answered by one buffer:
    a simple reply, or one final ``OFFSET_DATA`` chunk (header and offset
    field in a single ``pack``).  The same bytes :func:`read` produces for
    one buffer, without building the general case's lists."""
    if not mode.structured:
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
    if mode.extended:
        return EXTENDED_DATA_HEAD.pack(
            EXTENDED_REPLY_MAGIC, _DONE, _DATA, cookie, offset, 8 + length, offset
        )
    return STRUCTURED_DATA_HEAD.pack(
        STRUCTURED_REPLY_MAGIC, _DONE, _DATA, cookie, 8 + length, offset
    )


def read_total(runs: Sequence[ReadRun]) -> int:
    """Bytes covered by ``runs``."""
    if len(runs) == 1 and not isinstance(runs[0], Hole):
        return _bytes_view(runs[0]).nbytes
    return sum(r.length if isinstance(r, Hole) else _bytes_view(r).nbytes for r in runs)


def read(
    mode: ReplyMode, cookie: int, offset: int, length: int, runs: Sequence[ReadRun], df: bool
) -> list[Buffer]:
    """A successful READ of ``length`` bytes at ``offset`` (runs already
    checked to total ``length``)."""
    pieces = _pieces(runs)
    if not mode.structured:
        out: list[Buffer] = [pack_simple_reply(0, cookie)]
        for p in pieces:
            out += _zeroes(p.length) if isinstance(p, Hole) else [p]
        return out
    if df:
        # "If the area being read contains both data and a hole, the server
        # MUST use NBD_REPLY_TYPE_OFFSET_DATA with the zeroes explicitly
        # present": one content chunk, DONE.
        head = _chunk(mode, _DONE, _DATA, cookie, offset, 8 + length)
        out = [head + OFFSET_DATA_HEAD.pack(offset)]
        for p in pieces:
            out += _zeroes(p.length) if isinstance(p, Hole) else [p]
        return out
    out = []
    pos = offset
    # The data is all in hand, so no error can follow: the last content
    # chunk may carry DONE (proto.md allows it) and saves a NONE chunk.
    for i, p in enumerate(pieces):
        flags = _DONE if i == len(pieces) - 1 else 0
        if isinstance(p, Hole):
            payload = OFFSET_HOLE.pack(pos, p.length)
            out.append(_chunk(mode, flags, _HOLE, cookie, offset, len(payload)) + payload)
            pos += p.length
        else:
            head = _chunk(mode, flags, _DATA, cookie, offset, 8 + p.nbytes)
            out.append(head + OFFSET_DATA_HEAD.pack(pos))
            out.append(p)
            pos += p.nbytes
    return out


def block_status(
    mode: ReplyMode,
    cookie: int,
    offset: int,
    chunks: Sequence[tuple[int, Sequence[tuple[int, int]]]],
) -> list[Buffer]:
    """One BLOCK_STATUS(_EXT) chunk per ``(context id, descriptors)``; the
    last carries DONE."""
    type_ = ReplyType.BLOCK_STATUS_EXT if mode.extended else ReplyType.BLOCK_STATUS
    out: list[Buffer] = []
    for i, (ctx, descs) in enumerate(chunks):
        flags = _DONE if i == len(chunks) - 1 else 0
        payload = pack_block_status(ctx, descs, mode.extended)
        out.append(_chunk(mode, flags, type_, cookie, offset, len(payload)) + payload)
    return out

"""Metadata-context queries and BLOCK_STATUS descriptors (proto.md
"Metadata querying", ``NBD_OPT_LIST_META_CONTEXT``/``SET_META_CONTEXT``,
``NBD_REPLY_TYPE_BLOCK_STATUS``; qemu ``docs/interop/nbd.rst`` for
``qemu:allocation-depth``).

Query rules implemented here:

* LIST with no query lists every context the export offers.
* A query that is only a namespace (``"base:"``, ``"qemu:"``) is a wildcard
  for that namespace in LIST, and selects nothing in SET (proto.md: "base:"
  MUST act as wildcard in LIST and be ignored in SET; qemu does the same for
  "qemu:").
* Otherwise a query selects the context of exactly that name, if offered.
* Unknown namespaces and names are ignored, never an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nbdqcow.backends.base import Extent
from nbdqcow.nbd.answers import ALLOCATION_DEPTH, BASE_ALLOCATION
from nbdqcow.nbd.constants import StateFlag

__all__ = ["MAX_DESCRIPTORS", "descriptors", "match_queries", "status_function"]

#: proto.md: a server SHOULD NOT send more than 2^20 extents in one chunk.
MAX_DESCRIPTORS = 1 << 20


def match_queries(queries: Sequence[str], offered: Sequence[str], listing: bool) -> list[str]:
    """The offered contexts the queries select, in order of first match."""
    if listing and not queries:
        return list(offered)
    out: list[str] = []
    for q in queries:
        _ns, colon, leaf = q.partition(":")
        if not colon:
            continue  # no namespace: nothing we know
        if not leaf:
            if listing:
                out += [c for c in offered if c.startswith(q) and c not in out]
            continue
        if q in offered and q not in out:
            out.append(q)
    return out


def _allocation(e: Extent) -> int:
    return int(e.flags) & (StateFlag.HOLE | StateFlag.ZERO)


def _depth(e: Extent) -> int:
    return e.depth


def status_function(context: str) -> Callable[[Extent], int]:
    """How a context's 32-bit status is derived from a backend extent.

    Contexts the core does not know report 0, which proto.md calls always
    safe.
    """
    if context == BASE_ALLOCATION:
        return _allocation
    if context == ALLOCATION_DEPTH:
        return _depth
    return lambda e: 0


def descriptors(
    extents: Sequence[Extent],
    offset: int,
    length: int,
    status: Callable[[Extent], int],
    req_one: bool,
    max_length: int,
) -> list[tuple[int, int]]:
    """(length, status) pairs for ``[offset, offset+length)``.

    Extents are clipped to the request, neighbours with equal status merged,
    and the walk stops at the first gap (the backend may stop early).  Each
    descriptor is at most ``max_length`` (2^32-1 for compact replies), so a
    long run is split rather than truncated.  With ``req_one`` only the first
    descriptor is kept.

    Raises:
        ValueError: ``extents`` is empty or does not start at ``offset``.
    """
    if not extents or extents[0].offset > offset or extents[0].end <= offset:
        raise ValueError(f"extents do not start at the request offset {offset}")
    end = offset + length
    out: list[tuple[int, int]] = []
    pos = offset
    for e in extents:
        if e.offset > pos or pos >= end:
            break
        if e.end <= pos:
            continue
        n = min(e.end, end) - pos
        s = status(e) & 0xFFFFFFFF
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0] + n, s)
        else:
            out.append((n, s))
        pos += n
    split: list[tuple[int, int]] = []
    for n, s in out:
        while n > max_length:
            split.append((max_length, s))
            n -= max_length
        split.append((n, s))
        if len(split) >= MAX_DESCRIPTORS:
            break
    if req_one:
        return split[:1]
    return split[:MAX_DESCRIPTORS]

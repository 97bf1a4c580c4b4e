"""Reply building under random inputs (proto.md "Structured reply types",
``NBD_REPLY_TYPE_BLOCK_STATUS``): whatever runs or extents the application
gives, the bytes on the wire obey the chunk rules, which the strict test
client checks (non-overlapping content chunks inside the request that cover
it, DONE last, holes non-empty, extents non-empty and within the request)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdqcow.backends.base import Extent, ExtentFlag
from nbdqcow.nbd import Command, CommandFlag, Disconnect, EndOfStream, Hole
from nbdqcow.nbd.answers import ReadRun
from nbdqcow.nbd.meta import descriptors
from tests.nbd.helpers import Disk, MemoryApp, memory_client
from tests.nbdclient import NbdClient

BOTH = ["base:allocation", "qemu:allocation-depth"]


def manual(mode: str) -> tuple[NbdClient, MemoryApp]:
    c, app = memory_client(Disk.make("", size=1 << 22))
    c.handshake()
    if mode == "extended":
        c.extended_headers()
    elif mode == "structured":
        c.structured_reply()
    if mode != "simple":
        c.set_meta_context("", BOTH)
    c.go("")
    app.override = lambda app, ev: not isinstance(ev, Disconnect | EndOfStream)
    return c, app


run_st = st.one_of(
    st.integers(1, 5000).map(Hole),
    st.binary(min_size=1, max_size=5000),
    st.just(b""),  # empty runs are allowed and dropped
    st.just(Hole(0)),
)


@settings(max_examples=80, deadline=None)
@given(
    runs=st.lists(run_st, min_size=1, max_size=12),
    mode=st.sampled_from(["simple", "structured", "extended"]),
    df=st.booleans(),
    offset=st.integers(0, 1 << 20),
)
def test_any_runs_reassemble(runs: list[ReadRun], mode: str, df: bool, offset: int) -> None:
    expected = b"".join(bytes(r.length) if isinstance(r, Hole) else bytes(r) for r in runs)
    if not expected:
        return
    c, app = manual(mode)
    flags = CommandFlag.DF if df and mode != "simple" else 0
    cookie = c.send_request(Command.READ, offset, len(expected), flags)
    app.conn.reply_read(cookie, runs)
    c.stream.flush_output()  # type: ignore[attr-defined]
    reply = c.recv_reply()  # raises ServerMisbehaved on any broken chunk rule
    assert reply.error == 0 and reply.data == expected
    content = [t for _, t, _ in reply.chunks if t in (1, 2)]
    if df:
        assert len(content) <= 1  # "at most one content chunk"


extent_st = st.lists(
    st.tuples(
        st.integers(1, 1 << 16),
        st.sampled_from([ExtentFlag.DATA, ExtentFlag.HOLE | ExtentFlag.ZERO, ExtentFlag.ZERO]),
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=20,
)


def build(start: int, spec: list[tuple[int, ExtentFlag, int]]) -> list[Extent]:
    out, pos = [], start
    for n, f, d in spec:
        out.append(Extent(pos, n, f, d))
        pos += n
    return out


@settings(max_examples=150, deadline=None)
@given(
    spec=extent_st,
    skip=st.integers(0, 1000),
    length=st.integers(1, 1 << 18),
    req_one=st.booleans(),
)
def test_descriptors(
    spec: list[tuple[int, ExtentFlag, int]], skip: int, length: int, req_one: bool
) -> None:
    offset = 10_000
    # The first extent may begin before the request offset (backends report
    # whole clusters); it must contain the offset.
    skip = min(skip, spec[0][0] - 1)
    extents = build(offset - skip, spec)
    for status in (lambda e: int(e.flags), lambda e: e.depth):
        d = descriptors(extents, offset, length, status, req_one, 0xFFFFFFFF)
        assert d and all(n > 0 for n, _ in d)
        assert sum(n for n, _ in d) <= length
        assert all(a[1] != b[1] for a, b in itertools.pairwise(d))  # merged
        if req_one:
            assert len(d) == 1
        # Each descriptor's status is that of the extents it covers.
        pos = offset
        for n, s in d:
            for e in extents:
                if e.offset < pos + n and e.end > pos:
                    assert status(e) == s
            pos += n


def test_long_runs_are_split_not_truncated() -> None:
    e = [Extent(0, 10 * 1000, ExtentFlag.DATA)]
    assert descriptors(e, 0, 10_000, lambda e: 0, False, 4096) == [
        (4096, 0),
        (4096, 0),
        (1808, 0),
    ]

"""Random sessions through the whole core against a bytearray model: any
sequence of writes, zeroes, trims and reads, in every reply mode, chunked
any way on input, reads back what the model says (the core carries data
faithfully in both directions)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.nbd import CommandFlag
from tests.nbd.helpers import Disk, memory_client

SIZE = 64 * 1024

ranges = st.integers(0, SIZE - 1).flatmap(
    lambda off: st.tuples(st.just(off), st.integers(1, min(SIZE - off, 9000)))
)
op = st.one_of(
    st.tuples(st.just("write"), ranges, st.integers(1, 255)),
    st.tuples(st.just("zero"), ranges, st.booleans()),
    st.tuples(st.just("trim"), ranges, st.just(0)),
    st.tuples(st.just("read"), ranges, st.booleans()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    ops=st.lists(op, min_size=1, max_size=25),
    mode=st.sampled_from(["simple", "structured", "extended"]),
    chunk=st.sampled_from([0, 1, 7, 100, 4096]),
    buffered=st.booleans(),
)
def test_random_session_matches_model(
    ops: list[tuple[str, tuple[int, int], int]], mode: str, chunk: int, buffered: bool
) -> None:
    c, app = memory_client(Disk.make("", size=SIZE), chunk=chunk, buffered=buffered)
    c.handshake()
    if mode == "extended":
        c.extended_headers()
    elif mode == "structured":
        c.structured_reply()
    c.go("")
    model = bytearray(SIZE)
    for kind, (off, n), arg in ops:
        if kind == "write":
            data = bytes([arg]) * n
            c.write(off, data, CommandFlag.FUA if arg & 1 else 0)
            model[off : off + n] = data
        elif kind in ("zero", "trim"):
            if kind == "zero":
                c.zero(off, n, CommandFlag.NO_HOLE if arg else 0)
            else:
                c.trim(off, n)
            model[off : off + n] = bytes(n)  # the in-memory app zeroes both
        else:
            df = CommandFlag.DF if arg and mode != "simple" else 0
            assert c.read(off, n, df) == bytes(model[off : off + n])
    assert c.read(0, SIZE) == bytes(model)
    assert app.conn.in_flight == 0
    c.disconnect()

"""Bounded fuzzing of the protocol core in every test run (the harness and
its invariant are in ``fuzz/harness.py``; ``fuzz/fuzz_core.py`` runs the same
target standalone, with atheris when installed).

Invariant: for any byte stream, split any way, through either input path and
in any TLS mode, the core proceeds or raises ``RemoteProtocolError`` --
never anything else (``run`` lets every other exception propagate).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.fuzz_core import test_one_input as fuzz_target
from fuzz.harness import SEEDS, run

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

mutation = st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=16))


def apply(seed: bytes, mutations: list[tuple[int, int, bytes]]) -> bytes:
    b = bytearray(seed)
    for op, where, blob in mutations:
        i = where % (len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= blob[0] or 1
        elif op == 1:
            b[i:i] = blob
        elif op == 2:
            del b[i : i + len(blob)]
        else:
            b[i : i + len(blob)] = blob
    return bytes(b)


def test_seeds_reach_transmission() -> None:
    # The seeds are valid sessions: they must run to the end cleanly.
    assert all(run(s) > 10 for s in SEEDS[:3])


@FAST
@given(
    seed=st.sampled_from(SEEDS),
    mutations=st.lists(mutation, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 2048), max_size=12),
    buffered=st.booleans(),
    tls=st.sampled_from(["off", "optional", "required"]),
)
def test_mutated_sessions(
    seed: bytes, mutations: list[tuple[int, int, bytes]], cuts: list[int], buffered: bool, tls: str
) -> None:
    # run() lets any exception but RemoteProtocolError escape (-1), and
    # checks the connection ended after EOF.
    assert run(apply(seed, mutations), cuts, buffered, tls) >= -1


@FAST
@given(
    prefix=st.sampled_from([b"", b"\0\0\0\x03", b"\0\0\0\x01", SEEDS[0][:200], SEEDS[1][:120]]),
    tail=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 800), max_size=8),
    buffered=st.booleans(),
)
def test_random_bytes(prefix: bytes, tail: bytes, cuts: list[int], buffered: bool) -> None:
    assert run(prefix + tail, cuts, buffered) >= -1


@FAST
@given(st.binary(max_size=1024))
def test_atheris_target(data: bytes) -> None:
    fuzz_target(data)  # raises on a finding (see fuzz/harness.py)

#!/usr/bin/env python3
"""Standalone fuzzer for the NBD protocol core.

With atheris installed (optional, not a dependency)::

    python fuzz/fuzz_core.py [corpus_dir] [-atheris_runs=N ...]

Without it, the same target runs over random mutations of the seed
transcripts for ``--iterations`` rounds (default 2000)::

    python fuzz/fuzz_core.py --iterations 20000

The invariant checked is in :mod:`fuzz.harness`: any input either proceeds
or raises ``RemoteProtocolError``; anything else propagates and is reported.
"""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz.harness import SEEDS, run


def test_one_input(data: bytes) -> None:
    """The fuzz target: the first byte picks chunking, input path and TLS mode."""
    if not data:
        return
    ctl, body = data[0], data[1:]
    step = (ctl & 0x1F) + 1
    cuts = list(range(step, len(body), step)) if ctl & 0x20 else []
    tls = ("off", "optional", "required", "off")[ctl >> 6]
    run(body, cuts, buffered=bool(ctl & 0x20 and ctl & 1), tls=tls)


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 2:
            del b[i : i + rng.randint(1, 16)]
        else:
            b = b[:i]
    return bytes(b)


def main() -> int:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        atheris = None
    if atheris is not None and "--iterations" not in sys.argv:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
        return 0
    n = int(sys.argv[sys.argv.index("--iterations") + 1]) if "--iterations" in sys.argv else 2000
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "0")))
    for i in range(n):
        seed = rng.choice(SEEDS)
        test_one_input(bytes([rng.randrange(256)]) + mutate(rng, seed))
        if i and i % 1000 == 0:
            print(f"{i} inputs, no finding", flush=True)
    print(f"{n} inputs, no finding")
    return 0


if __name__ == "__main__":
    sys.exit(main())

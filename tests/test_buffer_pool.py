"""BufferPool's 4 KiB fast paths (issue 6) keep the bounds of the general
path: ``keep`` buffers per size, ``keep_bytes`` in all, and a recycled view
is released."""

from __future__ import annotations

import pytest

from nbdqcow.buffers import BufferPool


def test_4k_fast_path_bounds_and_reuse() -> None:
    pool = BufferPool(keep=3, keep_bytes=5 * 4096)
    views = [pool.get(4096) for _ in range(6)]
    assert all(v.nbytes == 4096 and not v.readonly for v in views)
    bases = [v.obj for v in views]
    assert pool.release(list(views)) == 6 * 4096
    assert len(pool._free[4096]) == 3 and pool._kept == 3 * 4096
    for v in views:
        with pytest.raises(ValueError):
            v.tobytes()
    again = [pool.get(4096) for _ in range(4)]
    assert {id(v.obj) for v in again[:3]} <= {id(b) for b in bases}
    assert pool._kept == 0 and not pool._free[4096]
    # The byte bound: 8 KiB buffers fill it, 4 KiB ones then are let go.
    big = [pool.get(8192) for _ in range(2)]
    pool.release(big)
    assert pool._kept == 4 * 4096
    pool.release(again)
    assert pool._kept == 5 * 4096 and len(pool._free[4096]) == 1
    # get() of a smaller size still takes a 4 KiB buffer (the general path).
    small = pool.get(100)
    assert small.nbytes == 100 and len(small.obj) == 4096 and pool._kept == 4 * 4096


def test_no_4k_list_when_keep_max_is_below() -> None:
    pool = BufferPool(keep_max=2048)
    v = pool.get(4096)
    assert pool.release([v]) == 4096
    assert pool._kept == 0 and not pool._free.get(4096)

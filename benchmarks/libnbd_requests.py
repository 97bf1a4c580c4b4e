"""A fixed number of 4 KiB requests at queue depth 1, for counting what the
server does per request (``tests/test_regression_guard.py``).

Runs under ``/usr/bin/python3`` (libnbd's Python bindings).  Usage:
``libnbd_requests.py URI COUNT read|write|alloc [FIRST]``.

* ``read``: reads at pseudo-random 4 KiB-aligned offsets (fixed seed);
* ``write``: writes at the same kind of offsets;
* ``alloc``: one write at the start of each successive 64 KiB cluster,
  beginning with cluster ``FIRST`` (default 0), so on a fresh sparse qcow2
  image every request allocates a cluster.

The read and write offsets depend only on ``COUNT``, so running the same
command twice touches the same blocks: the first run warms the caches.

Prints ``{"count": N, "elapsed": S}``.
"""

from __future__ import annotations

import json
import random
import sys
import time

import nbd  # type: ignore[import-not-found]  # python3-libnbd, system Python only

BLOCK = 4096
CLUSTER = 65536


def main() -> int:
    uri, count, op = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    first = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    rng = random.Random(6)
    payload = bytes(range(256)) * (BLOCK // 256)
    if op == "alloc":
        offsets = [i * CLUSTER % size for i in range(first, first + count)]
    else:
        offsets = [rng.randrange(size // BLOCK) * BLOCK for _ in range(count)]
    start = time.monotonic()
    for offset in offsets:
        if op == "read":
            h.pread(BLOCK, offset)
        else:
            h.pwrite(payload, offset)
    elapsed = time.monotonic() - start
    h.shutdown()
    json.dump({"count": count, "elapsed": elapsed}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

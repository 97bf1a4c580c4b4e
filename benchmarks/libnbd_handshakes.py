"""Handshake rate: libnbd connect (newstyle + ``NBD_OPT_GO``) and shutdown
in a loop for a fixed time.

Runs under the system interpreter (``/usr/bin/python3``), the only one with
libnbd's Python bindings, so it imports nothing from the project.  Usage:
``libnbd_handshakes.py URI SECONDS``; prints ``{"count": N, "elapsed": S}``.
"""

from __future__ import annotations

import json
import sys
import time

import nbd  # type: ignore[import-not-found]  # python3-libnbd, system Python only


def main() -> int:
    uri, seconds = sys.argv[1], float(sys.argv[2])
    count = 0
    start = time.monotonic()
    deadline = start + seconds
    while True:
        h = nbd.NBD()
        h.connect_uri(uri)  # returns once GO succeeded: ready to transmit
        h.shutdown()  # NBD_CMD_DISC, then wait for the server to close
        del h  # closes the socket now rather than at the next collection
        count += 1
        now = time.monotonic()
        if now >= deadline:
            break
    json.dump({"count": count, "elapsed": now - start}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

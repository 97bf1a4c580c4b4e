"""The protocol core's per-connection object stays within CPython's inline
attribute values (issue 6).

CPython 3.11 stores an instance's attributes as inline values, which the
specialized ``self._x`` loads and stores read directly, only while the
class's shared keys hold fewer than 30 names; the instance that adds the
30th falls back to a dict, and every attribute access of the core becomes a
dict lookup (``LOAD_ATTR_WITH_HINT``).  Callgrind, the pump's read path in
process: 46.5k instructions per QD1 read at 30 names, 45.5k at 29.  A new
attribute on :class:`~nbdqcow.nbd.ServerConnection` pushes a busy
connection over the limit; this test says so before the benchmarks do.
"""

from __future__ import annotations

import sys

import pytest

from nbdqcow.nbd import ServerConnection
from tests.nbd.helpers import Disk, memory_client

#: Fewer names than this keep the inline values (CPython 3.11's
#: ``SHARED_KEYS_MAX_SIZE`` is 30, and the instance inserting the 30th
#: converts to a dict).
INLINE_LIMIT = 30


def _names_of_a_busy_connection(mode: str) -> set[str]:
    c, app = memory_client(Disk.make(""))
    c.handshake()
    if mode == "extended":
        c.extended_headers()
    else:
        c.structured_reply()
    c.set_meta_context("", ["base:allocation", "qemu:allocation-depth"])
    c.go("")
    c.write(0, b"x" * 8192)
    assert c.read(0, 8192) == b"x" * 8192
    c.zero(8192, 4096)
    c.trim(16384, 4096)
    c.block_status(0, 65536)
    c.flush()
    c.disconnect()
    assert isinstance(app.conn, ServerConnection)
    return set(vars(app.conn))


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_a_served_connection_has_fewer_attributes_than_the_inline_limit(mode: str) -> None:
    names = _names_of_a_busy_connection(mode)
    # Names are shared by every instance in the order first set: one set
    # only by a busy connection would come after those of __init__ and
    # could push the count over for everyone; all are set in __init__.
    assert names == set(vars(ServerConnection())), "a busy connection has names __init__ lacks"
    assert len(names) < INLINE_LIMIT, (
        f"ServerConnection instances carry {len(names)} attributes: from "
        f"{INLINE_LIMIT} on, CPython {sys.version_info.major}.{sys.version_info.minor} "
        "turns every attribute access of the core into a dict lookup "
        "(make a rarely set one a class default, or merge two)"
    )

"""The core's transmission-phase input fast paths (issue 6):
``get_buffer``/``buffer_updated`` without the reader's calls and the batch
parser consuming the buffer itself keep the reader's contract -- misuse
still raises, a full receive grows the staging buffer, and a batch that
stops deep in a large buffer compacts it without losing a byte."""

from __future__ import annotations

import pytest

from nbdqcow.nbd import LocalProtocolError, Read
from nbdqcow.nbd.reader import COMPACT_AT
from nbdqcow.nbd.wire import pack_request
from tests.nbd.bench_core import connect


def _feed(conn: object, data: bytes) -> None:
    view = memoryview(data)
    while view:
        dest = conn.get_buffer()  # type: ignore[attr-defined]
        n = min(len(dest), len(view))
        dest[:n] = view[:n]
        conn.buffer_updated(n)  # type: ignore[attr-defined]
        view = view[n:]


def test_misuse_still_raises_in_transmission() -> None:
    conn = connect("structured")
    conn.get_buffer()
    with pytest.raises(LocalProtocolError):
        conn.get_buffer()
    conn.buffer_updated(0)
    with pytest.raises(LocalProtocolError):
        conn.buffer_updated(1)  # no get_buffer() before it
    dest = conn.get_buffer()
    with pytest.raises(LocalProtocolError):
        conn.buffer_updated(len(dest) + 1)


def test_full_receive_grows_the_staging_buffer() -> None:
    conn = connect("structured")
    first = conn.get_buffer()
    size = len(first)
    reqs = b"".join(pack_request(0, 0, i, i * 4096, 4096) for i in range(size // 28 + 1))
    first[:] = reqs[:size]
    conn.buffer_updated(size)
    assert len(conn.get_buffer()) > size  # the full-size staging buffer
    conn.buffer_updated(0)


def test_batches_stopping_past_the_compaction_point() -> None:
    """Headers for more than COMPACT_AT bytes, taken in small batches: the
    parser consumes (and compacts) the buffer itself; every request comes
    out once, in order."""
    conn = connect("structured")
    count = COMPACT_AT // 28 + 500
    _feed(conn, b"".join(pack_request(0, 0, i, (i % 1000) * 4096, 4096) for i in range(count)))
    seen: list[int] = []
    buf = memoryview(bytearray(4096))
    while evs := conn.next_events(7):
        for ev in evs:
            assert type(ev) is Read
            seen.append(ev.cookie)
            conn.reply_read(ev.cookie, [buf])
        conn.data_to_send()
        if len(evs) < 7:
            break
    assert seen == list(range(count))
    assert conn._reader._pos == 0 and len(conn._reader._buf) == 0

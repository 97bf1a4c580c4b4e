"""``ByteReader``: the generator primitives and the in-place receive path."""

from __future__ import annotations

from collections.abc import Generator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdqcow.nbd import LocalProtocolError, RemoteProtocolError
from nbdqcow.nbd.reader import RECEIVE_LARGE, RECEIVE_SMALL, ByteReader


def drive(gen: Generator[None, None, object]) -> tuple[bool, object]:
    """Run a primitive until it needs input: (finished, value)."""
    try:
        next(gen)
    except StopIteration as e:
        return True, e.value
    return False, None


def test_read_exact_waits_then_returns() -> None:
    r = ByteReader()
    g = r.read_exact(5, "a thing")
    r.feed(b"ab")
    assert drive(g) == (False, None)
    r.feed(b"cdefg")
    with pytest.raises(StopIteration) as si:
        next(g)
    assert si.value.value == b"abcde"
    assert r.buffered == 2


def test_eof_mid_read_names_what_was_read() -> None:
    r = ByteReader()
    r.feed(b"xy")
    r.feed(b"")
    with pytest.raises(RemoteProtocolError, match=r"a header \(2 of 4 bytes"):
        drive(r.read_exact(4, "a header"))


def test_clean_eof() -> None:
    r = ByteReader()
    r.feed(b"")
    assert drive(r.at_clean_eof()) == (True, True)
    r2 = ByteReader()
    r2.feed(b"z")
    assert drive(r2.at_clean_eof()) == (True, False)


def test_read_into_lends_the_destination() -> None:
    r = ByteReader()
    dest = bytearray(10)
    r.feed(b"0123")
    g = r.read_into(memoryview(dest), "payload")
    assert drive(g) == (False, None)
    view = r.get_buffer()
    assert view.obj is dest and view.nbytes == 6  # the unfilled tail itself
    view[:6] = b"456789"
    r.buffer_updated(6)
    assert drive(g)[0]
    assert dest == b"0123456789"
    assert r.get_buffer().obj is not dest  # lent back to the internal buffer
    r.buffer_updated(0)


def test_skip_discards_without_buffering() -> None:
    r = ByteReader()
    g = r.skip(100_000, "a refused payload")
    assert drive(g) == (False, None)
    for _ in range(10):
        r.feed(bytes(10_000))
    r.feed(b"next")
    assert drive(g)[0]
    assert r.buffered == 4


def test_misuse() -> None:
    r = ByteReader()
    r.get_buffer()
    with pytest.raises(LocalProtocolError):
        r.get_buffer()
    with pytest.raises(LocalProtocolError):
        r.feed(b"x")
    r.buffer_updated(1)
    with pytest.raises(LocalProtocolError):
        r.buffer_updated(1)
    r.feed(b"")
    with pytest.raises(LocalProtocolError):
        r.feed(b"more")
    with pytest.raises(LocalProtocolError):
        r.get_buffer()


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=12),
    chunk=st.integers(1, 100_000),
    buffered=st.booleans(),
)
def test_long_streams_survive_compaction(sizes: list[int], chunk: int, buffered: bool) -> None:
    """Reads of many sizes over a long stream return exactly the stream."""
    data = bytes(i % 251 for i in range(sum(sizes)))
    r = ByteReader()
    pos = 0
    got = bytearray()
    for n in sizes:
        g = r.read_exact(n, "x")
        while True:
            done, value = drive(g)
            if done:
                assert isinstance(value, bytes)
                got += value
                break
            piece = data[pos : pos + chunk]
            pos += len(piece)
            if buffered:
                view = r.get_buffer()
                k = min(view.nbytes, len(piece))
                view[:k] = piece[:k]
                r.buffer_updated(k)
                pos -= len(piece) - k
            else:
                r.feed(piece)
    assert bytes(got) == data


def test_unpack_now_and_read_into_now_use_only_buffered_bytes() -> None:
    import struct

    layout = struct.Struct(">IH")
    r = ByteReader()
    r.feed(b"\x00\x00\x00\x07\x00")  # one byte short of the layout
    assert r.unpack_now(layout) is None and r.buffered == 5  # nothing consumed
    r.feed(b"\x09payload!")
    assert r.unpack_now(layout) == (7, 9)
    dest = memoryview(bytearray(9))
    assert not r.read_into_now(dest) and r.buffered == 8  # 8 of 9: untouched
    assert bytes(dest) == bytes(9)
    r.feed(b"?tail")
    assert r.read_into_now(dest) and bytes(dest) == b"payload!?"
    assert r.take_now(4) == b"tail" and r.buffered == 0


def test_receive_size_limits_the_view_and_the_growth() -> None:
    """``recv_size`` (reader.RECEIVE_SMALL): the staging buffer grows only
    up to it, the view offered is cut to it, and a count past the view is
    refused even where the buffer behind it is bigger."""
    r = ByteReader()
    assert r.recv_size == RECEIVE_SMALL

    def fill() -> int:
        view = r.get_buffer()
        n = len(view)
        view[:] = bytes(n)
        r.buffer_updated(n)
        return n

    assert [fill() for _ in range(3)] == [4096, RECEIVE_SMALL, RECEIVE_SMALL]
    r.recv_size = RECEIVE_LARGE
    assert [fill() for _ in range(2)] == [RECEIVE_SMALL, RECEIVE_LARGE]
    r.recv_size = RECEIVE_SMALL
    view = r.get_buffer()
    assert len(view) == RECEIVE_SMALL and len(view.obj) == RECEIVE_LARGE  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="exceeds the buffer lent"):
        r.buffer_updated(RECEIVE_SMALL + 1)
    assert r.buffered == 4096 + 3 * RECEIVE_SMALL + RECEIVE_LARGE

"""The per-request fast paths (issue 6) must be invisible: a plain READ
parsed without ``validate_request`` and answered through ``read_header``
gives exactly what the general path gives.

* Requests: for any READ or WRITE (flags, offset, length, read-only or not,
  FUA advertised or not, shutdown or not) the core emits the event exactly
  when :func:`validate_request` accepts the request and it is not empty,
  and otherwise the same errno the table gives; the stream stays in sync.
* Replies: the bytes for a one-buffer READ reply equal those of the general
  builder (:func:`replies.read`), byte for byte, in every reply mode.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.backends.base import Capabilities
from nbdqcow.nbd import (
    Cache,
    Command,
    CommandFlag,
    Disconnect,
    ExportInfo,
    ExportRequested,
    Flush,
    HandshakeComplete,
    LocalProtocolError,
    ProtocolError,
    Read,
    RequestRejected,
    ServerConnection,
    Trim,
    Write,
    replies,
)
from nbdqcow.nbd.constants import Option
from nbdqcow.nbd.reader import RECEIVE_LARGE, RECEIVE_SMALL
from nbdqcow.nbd.validate import ExportState, validate_request
from nbdqcow.nbd.wire import pack_extended_request, pack_option, pack_request

SIZE = (1 << 20) + 512  # not a multiple of the 4 KiB minimum block: a tail
MIN_BLOCK = 4096
MAX = 64 * 1024
MODES = ("simple", "structured", "extended")


def connection(mode: str, read_only: bool = False, fua: bool = True) -> ServerConnection:
    """A connection in transmission on a SIZE-byte export."""
    conn = ServerConnection()
    conn.receive_data(struct.pack(">I", 3))
    if mode != "simple":
        opt = Option.EXTENDED_HEADERS if mode == "extended" else Option.STRUCTURED_REPLY
        conn.receive_data(pack_option(opt))
    conn.receive_data(pack_option(Option.GO, struct.pack(">I", 0) + struct.pack(">H", 0)))
    ev = conn.next_event()
    assert isinstance(ev, ExportRequested)
    caps = Capabilities(read_only=read_only, fua=fua, min_block=MIN_BLOCK, max_block=MAX)
    conn.accept_export(ev, ExportInfo("", SIZE, caps, require_block_size=False))
    assert isinstance(conn.next_event(), HandshakeComplete)
    conn.data_to_send()
    return conn


def request(
    mode: str, flags: int, offset: int, length: int, cookie: int = 7, command: int = Command.READ
) -> bytes:
    if mode == "extended":
        head = pack_extended_request(flags, command, cookie, offset, length)
    else:
        head = pack_request(flags, command, cookie, offset, length)
    carries = command == Command.WRITE or (mode == "extended" and flags & CommandFlag.PAYLOAD_LEN)
    return head + (bytes(length) if carries else b"")


# Offsets and lengths near the interesting edges: 0, alignment, the maximum,
# the end of the export.
edges = st.one_of(
    st.integers(0, SIZE + MAX),
    st.sampled_from([0, 1, 511, 512, 4095, 4096, MAX - 1, MAX, MAX + 1, SIZE - 512, SIZE]),
    st.integers(0, SIZE // MIN_BLOCK).map(lambda n: n * MIN_BLOCK),
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    mode=st.sampled_from(MODES),
    command=st.sampled_from([Command.READ, Command.WRITE]),
    flags=st.sampled_from(
        [
            0,
            CommandFlag.FUA,
            CommandFlag.DF,
            1 << 7,
            CommandFlag.PAYLOAD_LEN,
            CommandFlag.PAYLOAD_LEN | CommandFlag.FUA,
        ]
    ),
    offset=edges,
    length=edges,
    shutdown=st.booleans(),
    read_only=st.booleans(),
    fua=st.booleans(),
    batch=st.booleans(),
)
def test_fast_path_agrees_with_validate_request(
    mode: str,
    command: Command,
    flags: int,
    offset: int,
    length: int,
    shutdown: bool,
    read_only: bool,
    fua: bool,
    batch: bool,
) -> None:
    """Both hot paths: the generator's (``next_event``) and the batch
    parser's (``next_events``, the pump's way in)."""
    conn = connection(mode, read_only, fua)
    if shutdown:
        conn.shutdown()
    if batch:
        # A first request parsed and answered, so the parser is idle at the
        # top of its loop and the batch parser takes the one under test.
        conn.receive_data(request(mode, 0, 0, MIN_BLOCK, cookie=1))
        first = conn.next_events(8)
        if first and isinstance(first[0], Read):
            conn.reply_read(1, [memoryview(bytes(MIN_BLOCK))])
        conn.data_to_send()
    conn.receive_data(request(mode, flags, offset, length, command=command))
    if batch:
        evs = conn.next_events(8)
        assert len(evs) <= 1
        ev = evs[0] if evs else None
    else:
        ev = conn.next_event()
    state = ExportState(
        size=SIZE,
        flags=int(conn.transmission_flags),
        min_block=MIN_BLOCK,
        max_payload=MAX,
        structured=mode != "simple",
        extended=mode == "extended",
    )
    expected = None if shutdown else validate_request(command, flags, offset, length, state)
    if shutdown:
        assert isinstance(ev, RequestRejected) and ev.errno == 108  # ESHUTDOWN
    elif expected is not None:
        assert isinstance(ev, RequestRejected) and ev.errno == expected.errno
    elif length == 0:
        assert ev is None and conn.data_to_send()  # answered by the core
    else:
        assert isinstance(ev, Read | Write)
        assert (ev.cookie, int(ev.flags), ev.offset, ev.length) == (7, flags, offset, length)
        assert conn.in_flight == 1
        if isinstance(ev, Write):
            assert ev.data.nbytes == length and not ev.data.readonly
    # Whatever happened, the stream is in sync: a DISC is found next.
    conn.receive_data(request(mode, 0, 0, 0, command=Command.DISC))
    assert isinstance(conn.next_event(), Disconnect)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    mode=st.sampled_from(MODES),
    df=st.booleans(),
    block=st.integers(0, SIZE // MIN_BLOCK - 16),
    blocks=st.integers(1, MAX // MIN_BLOCK),
    cookie=st.integers(0, 2**64 - 1),
)
def test_one_buffer_reply_equals_the_general_builder(
    mode: str, df: bool, block: int, blocks: int, cookie: int
) -> None:
    offset, length = block * MIN_BLOCK, blocks * MIN_BLOCK
    flags = CommandFlag.DF if df and mode != "simple" else 0
    conn = connection(mode)
    conn.receive_data(request(mode, flags, offset, length, cookie))
    ev = conn.next_event()
    assert isinstance(ev, Read)
    data = memoryview(bytearray(range(256)) * (length // 256))
    conn.reply_read(cookie, [data])
    out = conn.data_to_send()
    assert out[-1] is data  # the caller's buffer itself: zero copy
    general = replies.read(
        replies.ReplyMode(mode != "simple", mode == "extended"),
        cookie,
        offset,
        length,
        [data],
        bool(flags),
    )
    assert b"".join(bytes(b) for b in out) == b"".join(bytes(b) for b in general)
    assert conn.in_flight == 0


def test_duplicate_cookies_still_pair_in_order() -> None:
    # The fast path keeps one request per cookie in a dict; a second one with
    # the same cookie waits behind it and is answered second.
    conn = connection("structured")
    for offset in (0, 4096, 8192):
        conn.receive_data(request("structured", 0, offset, 4096, cookie=5))
        assert isinstance(conn.next_event(), Read)
    assert conn.in_flight == 3
    for fill in (b"a", b"b", b"c"):
        conn.reply_read(5, [memoryview(fill * 4096)])
    out = b"".join(bytes(b) for b in conn.data_to_send())
    offsets = [struct.unpack_from(">Q", out, i + 20)[0] for i in range(0, len(out), 28 + 4096)]
    assert offsets == [0, 4096, 8192]
    assert conn.in_flight == 0


# One request of a random stream: (command, flags, offset, length, cookie).
# Mostly hot-path READs and WRITEs, with refused, empty, misaligned and
# other commands mixed in, so batches stop and resume everywhere.
stream_requests = st.lists(
    st.tuples(
        st.sampled_from([Command.READ, Command.READ, Command.WRITE, Command.WRITE,
                         Command.FLUSH, Command.TRIM, Command.CACHE]),
        st.sampled_from([0, 0, 0, CommandFlag.FUA, CommandFlag.DF, 1 << 7]),
        st.one_of(st.integers(0, SIZE // MIN_BLOCK).map(lambda n: n * MIN_BLOCK), edges),
        st.sampled_from([MIN_BLOCK, 2 * MIN_BLOCK, MAX, 0, 512, MAX + MIN_BLOCK]),
        st.integers(0, 5),  # few cookies: duplicates happen
    ),
    max_size=40,
)


def _describe(ev: object) -> tuple[object, ...]:
    if isinstance(ev, Write):
        return ("write", ev.cookie, int(ev.flags), ev.offset, bytes(ev.data))
    fields = getattr(ev, "__slots__", ())
    return (type(ev).__name__, *(getattr(ev, f) for f in fields))


def _drive(mode: str, data: bytes, cuts: list[int], limit: int | None,
           buffered: list[int] | None = None) -> tuple[object, ...]:
    """Feed ``data`` cut at ``cuts``; take events one by one (``limit``
    None) or in batches of at most ``limit`` until there are none; then
    answer every request in order (so both ways interleave the core's own
    replies, to refused and empty requests, the same way).  With a list
    ``buffered``, each piece is fed the pump's way, into ``get_buffer()``
    views (a WRITE payload's own buffer, the staging buffer otherwise)
    closed by ``buffer_updated``, events taken after every receive; the
    list gets the offsets where receives ended, to replay the same cuts
    through ``receive_data``.  Returns everything observable."""
    conn = connection(mode)
    seen: list[tuple[object, ...]] = []
    out: list[bytes] = []

    def take() -> None:
        evs: list[object] = []
        while True:
            if limit is None:
                ev = conn.next_event()
                got = [] if ev is None else [ev]
            else:
                got = list(conn.next_events(limit))
                assert len(got) <= limit
            if not got:
                break
            evs += got
        for ev in evs:
            seen.append(_describe(ev))
            if isinstance(ev, Read):
                conn.reply_read(ev.cookie, [memoryview(bytes(range(256)) * (ev.length // 256))])
            elif isinstance(ev, Write | Flush | Trim | Cache):
                conn.reply_ok(ev.cookie)
        out.extend(bytes(b) for b in conn.data_to_send())

    prev = 0
    try:
        for cut in [*sorted(cuts), len(data)]:
            if cut > prev and buffered is not None:
                while prev < cut:
                    view = conn.get_buffer()
                    n = min(len(view), cut - prev)
                    view[:n] = data[prev : prev + n]
                    conn.buffer_updated(n)
                    prev += n
                    buffered.append(prev)
                    take()
            elif cut > prev:
                conn.receive_data(data[prev:cut])
                prev = cut
                take()
        if buffered is not None:
            conn.get_buffer()
            conn.buffer_updated(0)  # EOF: close the bracket, then say so
        conn.receive_data(b"")
        take()
    except ProtocolError as exc:  # e.g. the stream ends inside a payload
        seen.append((type(exc).__name__, str(exc)))
    return tuple(seen), b"".join(out), conn.in_flight, conn.phase


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    mode=st.sampled_from(MODES),
    reqs=stream_requests,
    cuts=st.lists(st.integers(0, 40 * (MAX + 64)), max_size=8),
    limit=st.integers(1, 40),
    truncate=st.one_of(st.none(), st.integers(1, 40 * (MAX + 64))),
)
def test_next_events_equals_next_event(
    mode: str,
    reqs: list[tuple[int, int, int, int, int]],
    cuts: list[int],
    limit: int,
    truncate: int | None,
) -> None:
    """The batch interface the pump uses returns exactly the events
    ``next_event`` returns one by one, leaves the same replies and state,
    however the stream is cut (headers and payloads straddling receives
    are left to the generator, complete ones parsed in the batch)."""
    data = b""
    for i, (command, flags, offset, length, cookie) in enumerate(reqs):
        head = request(mode, flags, offset, length, cookie=cookie, command=command)
        if command == Command.WRITE:
            # A distinct payload per request: one taken from the wrong
            # place would show.
            head = head[: len(head) - length] + bytes([i + 1]) * length
        data += head
    if truncate:
        # The client goes away at some point, maybe inside a payload.
        data = data[: truncate % (len(data) + 1)]
    cuts = [c % (len(data) + 1) for c in cuts]
    one = _drive(mode, data, cuts, None)
    batched = _drive(mode, data, cuts, limit)
    assert one == batched
    # ... and fed as the pump feeds it, into get_buffer() views (review:
    # the buffered input path), against next_event over the same receives.
    fed: list[int] = []
    pumped = _drive(mode, data, cuts, limit, buffered=fed)
    assert pumped == _drive(mode, data, fed, None)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(mode=st.sampled_from(MODES), block=st.integers(0, SIZE // MIN_BLOCK - 1),
       cookie=st.integers(0, 2**64 - 1))
def test_write_reply_equals_the_general_builder(mode: str, block: int, cookie: int) -> None:
    """reply_ok packs the simple reply itself: the bytes of replies.ok()."""
    conn = connection(mode)
    conn.receive_data(request(mode, 0, block * MIN_BLOCK, MIN_BLOCK, cookie, Command.WRITE))
    ev = conn.next_event()
    assert isinstance(ev, Write)
    conn.reply_ok(cookie)
    general = replies.ok(replies.ReplyMode(mode != "simple", mode == "extended"), cookie,
                         block * MIN_BLOCK)
    assert b"".join(bytes(b) for b in conn.data_to_send()) == b"".join(
        bytes(b) for b in general)
    assert conn.in_flight == 0


def _feed_buffered(conn: ServerConnection, data: bytes, sizes: list[int]) -> list[object]:
    """Receive ``data`` the pump's way, filling every view offered; return
    the events, and append each staging view's size to ``sizes``."""
    events: list[object] = []
    pos = 0
    while pos < len(data):
        view = conn.get_buffer()
        if conn._reader._lent == "staging":  # not a payload's own buffer
            sizes.append(len(view))
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        conn.buffer_updated(n)
        pos += n
        events += conn.next_events(64)
    return events


def test_receive_size_follows_the_write_sizes() -> None:
    """Small WRITEs (through the staging buffer) get 256 KiB receives, so a
    queue of them arrives in one; a big WRITE brings receives back to
    64 KiB, so its payload is received in place, not copied twice
    (reader.RECEIVE_SMALL)."""
    conn = connection("simple")
    sizes: list[int] = []
    small = b"".join(request("simple", 0, i * 4096, 4096, cookie=i, command=Command.WRITE)
                     for i in range(64))
    events = _feed_buffered(conn, small, sizes)
    offsets = [(type(e), e.offset) for e in events]  # type: ignore[attr-defined]
    assert offsets == [(Write, i * 4096) for i in range(64)]
    assert sizes[0] == 4096  # the first staging buffer: handshakes stay cheap
    assert max(sizes) == RECEIVE_LARGE
    sizes.clear()
    head = request("simple", 0, 0, MAX, cookie=99, command=Command.WRITE)[:28]
    big = head + bytes(range(256)) * (MAX // 256)
    data = big + request("simple", 0, 0, 4096, cookie=100)
    events = _feed_buffered(conn, data, sizes)
    assert [type(e) for e in events] == [Write, Read]
    assert bytes(events[0].data) == big[28:]  # type: ignore[attr-defined]
    # The receive that brought the big WRITE was still large; once it was
    # parsed, receives are small again.
    assert sizes == [RECEIVE_LARGE]
    assert len(conn.get_buffer()) == RECEIVE_SMALL
    conn.buffer_updated(0)
    # And a big WRITE whose payload is not all there yet: once its header
    # is parsed, the rest of the payload is received in place (its own
    # buffer), and what follows it in 64 KiB receives.
    events = _feed_buffered(conn, small[: 4124 * 8], sizes)  # large again
    assert len(events) == 8 and len(conn.get_buffer()) == RECEIVE_LARGE
    conn.buffer_updated(0)
    view = conn.get_buffer()
    view[:1000] = big[:1000]
    conn.buffer_updated(1000)
    assert list(conn.next_events(64)) == []
    rest = big[1000:] + request("simple", 0, 0, 4096, cookie=101)
    view = conn.get_buffer()
    assert conn._reader._lent == "target" and len(view) == len(big) - 1000
    view[:] = rest[: len(view)]
    conn.buffer_updated(len(view))
    assert len(conn.get_buffer()) == RECEIVE_SMALL
    conn.buffer_updated(0)
    events = _feed_buffered(conn, rest[len(big) - 1000 :], sizes)
    assert [type(e) for e in events] == [Write, Read]
    assert bytes(events[0].data) == big[28:]  # type: ignore[attr-defined]
    # An adapter that reports more than the view it was lent is refused,
    # even where the staging buffer behind the view is bigger.
    assert len(conn._reader._staging) == RECEIVE_LARGE
    view = conn.get_buffer()
    assert len(view) == RECEIVE_SMALL
    with pytest.raises(LocalProtocolError, match="exceeds the buffer lent"):
        conn.buffer_updated(len(view) + 1000)

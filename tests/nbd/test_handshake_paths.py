"""The handshake's fast paths (issue 6) give exactly what the general code
gives: option data parsing, transmission flags, prebuilt replies, and the
reader's staging buffer that starts small."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdqcow.backends.base import Capabilities
from nbdqcow.nbd import ExportInfo, ExportRequested, Phase, ServerConnection
from nbdqcow.nbd.constants import Option, OptionReply, TransmissionFlag
from nbdqcow.nbd.options import OptionInvalid, _Cursor, option_name, parse_info_request
from nbdqcow.nbd.reader import _FIRST_STAGING, ByteReader
from nbdqcow.nbd.wire import pack_option, pack_option_reply


def _slow_info_request(data: bytes) -> tuple[str, tuple[int, ...]]:
    """The cursor-based parser, as it was before the fast path."""
    c = _Cursor(data, "NBD_OPT_GO")
    name = c.string("export name")
    count = c.u16("number of information requests")
    requests = tuple(c.u16("information request") for _ in range(count))
    c.end()
    return name, requests


def _info_data(name: bytes, requests: list[int]) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests))


@given(st.text(max_size=40).map(lambda s: s.encode("utf-8")),
       st.lists(st.integers(0, 0xFFFF), max_size=8))
def test_info_request_fast_path_matches_the_cursor(name: bytes, requests: list[int]) -> None:
    data = _info_data(name, requests)
    try:
        expected: object = _slow_info_request(data)
    except OptionInvalid as e:
        expected = str(e)
    try:
        got: object = parse_info_request(data, int(Option.GO))
    except OptionInvalid as e:
        got = str(e)
    assert got == expected


@given(st.binary(max_size=40))
def test_info_request_any_bytes_match_the_cursor(data: bytes) -> None:
    """Malformed data still gets the cursor's message (and the option's name)."""
    try:
        expected: object = _slow_info_request(data)
    except OptionInvalid as e:
        expected = str(e)
    try:
        got: object = parse_info_request(data, int(Option.GO))
    except OptionInvalid as e:
        got = str(e)
    assert got == expected


@pytest.mark.parametrize(("data", "message"), [
    (_info_data(b"a\0b", []), "NUL"),
    (_info_data(b"\xff\xfe", [1]), "UTF-8"),
    (_info_data(b"disk", [1])[:-1], "NBD_OPT_INFO: information request needs 2 bytes"),
    (_info_data(b"disk", [1]) + b"x", "NBD_OPT_INFO: 1 unexpected bytes"),
    (_info_data(b"x" * 4097, []), "4097 bytes long"),
], ids=["nul", "utf8", "truncated", "trailing", "long-name"])
def test_malformed_info_requests_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(OptionInvalid, match=message):
        parse_info_request(data, int(Option.INFO))


def test_option_names() -> None:
    assert option_name(int(Option.GO)) == "NBD_OPT_GO"
    assert option_name(99) == "option 99"


def _flags_the_long_way(c: Capabilities, structured: bool) -> TransmissionFlag:
    T = TransmissionFlag
    f = T.HAS_FLAGS
    for on, flag in ((c.read_only, T.READ_ONLY), (c.flush, T.SEND_FLUSH), (c.fua, T.SEND_FUA),
                     (c.rotational, T.ROTATIONAL), (structured, T.SEND_DF),
                     (c.multi_conn, T.CAN_MULTI_CONN), (c.cache, T.SEND_CACHE),
                     (not c.read_only and c.trim, T.SEND_TRIM),
                     (not c.read_only and c.zero, T.SEND_WRITE_ZEROES),
                     (not c.read_only and c.zero and c.fast_zero, T.SEND_FAST_ZERO)):
        if on:
            f |= flag
    return f


@given(st.builds(Capabilities, read_only=st.booleans(), flush=st.booleans(), fua=st.booleans(),
                 trim=st.booleans(), zero=st.booleans(), fast_zero=st.booleans(),
                 cache=st.booleans(), multi_conn=st.booleans(), rotational=st.booleans()),
       st.booleans())
def test_transmission_flags(caps: Capabilities, structured: bool) -> None:
    flags = ExportInfo("e", 1 << 20, caps).transmission_flags(structured)
    assert type(flags) is TransmissionFlag
    assert flags == _flags_the_long_way(caps, structured)


def test_prebuilt_acks_are_the_packed_replies() -> None:
    conn = ServerConnection()
    greeting = b"".join(conn.data_to_send())
    assert greeting == struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3)
    conn.receive_data(struct.pack(">I", 3) + pack_option(Option.STRUCTURED_REPLY)
                      + pack_option(Option.ABORT))
    # STRUCTURED_REPLY is answered inside the core; ABORT ends the session
    events = []
    while (ev := conn.next_event()) is not None:
        events.append(type(ev).__name__)
    assert events == ["Aborted"]
    out = b"".join(conn.data_to_send())
    assert out == (pack_option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK)
                   + pack_option_reply(Option.ABORT, OptionReply.ACK))


def test_go_through_the_fast_paths_enters_transmission() -> None:
    conn = ServerConnection()
    conn.data_to_send()
    caps = Capabilities(read_only=True)
    conn.receive_data(struct.pack(">I", 3) + pack_option(Option.GO, _info_data(b"", [3, 1])))
    ev = conn.next_event()
    assert isinstance(ev, ExportRequested) and ev.option is Option.GO
    assert ev.name == "" and ev.info_requests == (3, 1)
    conn.accept_export(ev, ExportInfo("disk", 1 << 20, caps))
    done = conn.next_event()
    assert done is not None and conn.transmission_flags == _flags_the_long_way(caps, False)


def test_staging_starts_small_and_grows_after_a_full_receive() -> None:
    r = ByteReader(staging_size=64 * 1024)
    first = r.get_buffer()
    assert first.nbytes == _FIRST_STAGING
    first[:] = b"a" * _FIRST_STAGING
    r.buffer_updated(_FIRST_STAGING)
    second = r.get_buffer()
    assert second.nbytes == 64 * 1024
    assert first.obj is not second.obj  # replaced, not resized: old views stay valid
    second[:3] = b"bcd"
    r.buffer_updated(3)
    assert r.take_now(_FIRST_STAGING + 3) == b"a" * _FIRST_STAGING + b"bcd"


def test_staging_stays_small_while_receives_are_small() -> None:
    r = ByteReader()
    for _ in range(3):
        view = r.get_buffer()
        view[:4] = b"wxyz"
        r.buffer_updated(4)
    assert r.get_buffer().nbytes == _FIRST_STAGING
    r.buffer_updated(0)
    assert r.take_now(12) == b"wxyz" * 3


def test_small_staging_size_is_honoured() -> None:
    r = ByteReader(staging_size=16)
    view = r.get_buffer()
    assert view.nbytes == 16
    view[:] = bytes(range(16))
    r.buffer_updated(16)
    assert r.get_buffer().nbytes == 16


# --- the export's memo of GO/INFO answers (issue 6) -------------------------

def _negotiate(info: ExportInfo, options: list[tuple[Option, list[int]]],
               structured: bool) -> tuple[bytes, ServerConnection]:
    """Run a handshake of INFO/GO options against ``info``; return what the
    core sent after the greeting (and the connection)."""
    conn = ServerConnection()
    conn.data_to_send()
    data = struct.pack(">I", 3)
    if structured:
        data += pack_option(Option.STRUCTURED_REPLY)
    conn.receive_data(data)
    out = b""
    for opt, requests in options:
        if conn.phase is Phase.TRANSMISSION:  # GO succeeded: no more options
            break
        conn.receive_data(pack_option(opt, _info_data(b"disk", requests)))
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, ExportRequested):
                conn.accept_export(ev, info)
        out += b"".join(bytes(b) for b in conn.data_to_send())
    return out, conn


_REQUEST_LISTS = st.lists(st.integers(0, 5), max_size=12)


@given(st.lists(st.tuples(st.sampled_from([Option.INFO, Option.GO]), _REQUEST_LISTS),
                min_size=1, max_size=4),
       st.booleans(), st.booleans(), st.integers(0, 3))
def test_memoized_answers_are_the_computed_ones(
        options: list[tuple[Option, list[int]]], structured: bool, read_only: bool,
        min_shift: int) -> None:
    """A client negotiated from an ExportInfo that already served others
    gets byte for byte what a fresh ExportInfo gives (and the same state)."""
    caps = Capabilities(read_only=read_only, min_block=512 << min_shift)
    shared = ExportInfo("disk", 1 << 30, caps, description="the disk")
    for _ in range(2):  # warm the memo with this very sequence, then reuse it
        _negotiate(shared, options, structured)
    fresh_out, fresh = _negotiate(ExportInfo("disk", 1 << 30, caps, description="the disk"),
                                  options, structured)
    out, conn = _negotiate(shared, options, structured)
    assert out == fresh_out
    assert conn.phase is fresh.phase
    assert conn.transmission_flags == fresh.transmission_flags
    assert conn._state == fresh._state and conn._reply_mode == fresh._reply_mode


def test_memo_serves_a_repeated_go_and_stays_bounded() -> None:
    info = ExportInfo("disk", 1 << 20, Capabilities(read_only=True))
    first, _ = _negotiate(info, [(Option.GO, [3])], True)
    assert len(info.memo) == 2  # the GO answer and the negotiated state
    again, _ = _negotiate(info, [(Option.GO, [3])], True)
    assert again == first and len(info.memo) == 2
    # long request lists are answered without being remembered
    long_list = [3, 1, 2, 0, 3, 1, 2, 0, 3]
    out, _ = _negotiate(info, [(Option.INFO, long_list)], True)
    assert out.endswith(pack_option_reply(Option.INFO, OptionReply.ACK))
    assert all(len(k) != 3 or k[2] != tuple(long_list) for k in info.memo)
    # and the memo never grows past its bound, whatever clients ask
    for n in range(60):
        _negotiate(info, [(Option.INFO, [n % 6] * (1 + n % 7))], n % 2 == 0)
    assert len(info.memo) <= 32


def test_block_size_required_is_not_masked_by_the_memo() -> None:
    """An export that needs NBD_INFO_BLOCK_SIZE refuses a GO without it,
    even after a GO with it was memoized."""
    info = ExportInfo("disk", 1 << 20, Capabilities(read_only=True, min_block=4096))
    _, conn = _negotiate(info, [(Option.GO, [3])], True)
    assert conn.transmission_flags != TransmissionFlag(0)
    refused, conn = _negotiate(info, [(Option.GO, [])], True)
    err = struct.pack(">QII", 0x3E889045565A9, int(Option.GO),
                      int(OptionReply.ERR_BLOCK_SIZE_REQD))
    assert err in refused and conn.transmission_flags == TransmissionFlag(0)

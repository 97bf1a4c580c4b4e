"""Chunking invariance (h11's and websockets' core property): however a
client transcript is split into receives, and whichever input path is used
(``receive_data`` or ``get_buffer``/``buffer_updated``), the core emits the
same events and sends the same bytes.

Transcripts are recorded from real sessions of ``tests/nbdclient.py``
against the in-memory app.  STARTTLS sessions are left out on purpose: the
bytes after a STARTTLS belong to TLS, so a transcript cannot contain them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.nbd import CommandFlag, Event, Option, RemoteProtocolError, ServerConnection
from nbdqcow.nbd.constants import Command
from tests.nbd.helpers import Disk, MemoryApp, MemoryStream
from tests.nbdclient import NbdClient, NbdError, OptionError


class Recorder(MemoryStream):
    """Records every byte the client sends."""

    def __init__(self, app: MemoryApp) -> None:
        super().__init__(app)
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data
        super().write(data)


def disks() -> list[Disk]:
    return [
        Disk.make("", description="default", cache=True),
        Disk.make("ro", read_only=True, min_block=512),
    ]


def record(script: Callable[[NbdClient], None]) -> bytes:
    conn = ServerConnection()
    app = MemoryApp(conn, {d.info.name: d for d in disks()})
    rec = Recorder(app)
    script(NbdClient(rec))
    return bytes(rec.sent)


def simple_session(c: NbdClient) -> None:
    c.handshake(client_flags=1)
    c.export_name("")
    c.write(4096, b"simple" * 100)
    assert c.read(0, 8192)[4096:4102] == b"simple"
    c.flush()
    c.trim(4096, 4096, CommandFlag.FUA)
    c.zero(0, 512, CommandFlag.NO_HOLE)
    with pytest.raises(NbdError):
        c.write(1 << 20, b"past the end")
    c.disconnect()


def structured_session(c: NbdClient) -> None:
    c.handshake()
    c.list_exports()
    with pytest.raises(OptionError):
        c.option(0x1234, b"unknown option data")
    with pytest.raises(OptionError):
        c.option(Option.INFO, b"\0\0")
    c.info("ro")
    c.structured_reply()
    c.list_meta_context("", [])
    c.set_meta_context("", ["base:allocation", "qemu:allocation-depth", "x:y"])
    c.go("")
    c.write(8192, b"data" * 2048)
    c.read(0, 6 * 4096)
    c.read(0, 3 * 4096, CommandFlag.DF)
    c.block_status(0, 1 << 20)
    c.block_status(4096, 8192, CommandFlag.REQ_ONE)
    with pytest.raises(NbdError):
        c.read(0, 1, 1 << 10)
    c.request(Command.CACHE, 0, 512)
    c.disconnect()


def extended_session(c: NbdClient) -> None:
    c.handshake()
    c.extended_headers()
    c.set_meta_context("", ["base:"])
    c.set_meta_context("", ["base:allocation"])
    c.go("")
    c.write(0, b"ext" * 1000)
    c.request(Command.WRITE, 4096, 512, 0, b"w" * 512)
    c.read(0, 8192)
    c.block_status(0, 65536)
    c.request(Command.READ, 0, 16, CommandFlag.PAYLOAD_LEN, b"p" * 16)
    c.disconnect()


def readonly_session(c: NbdClient) -> None:
    c.handshake()
    c.structured_reply()
    c.go("ro")
    c.read(512, 1024)
    with pytest.raises(NbdError):
        c.write(0, b"x" * 512)
    with pytest.raises(NbdError):
        c.read(1, 512)  # unaligned
    c.disconnect()


def abort_session(c: NbdClient) -> None:
    c.handshake()
    c.list_exports()
    c.abort()


SESSIONS = {
    f.__name__: f
    for f in (simple_session, structured_session, extended_session, readonly_session, abort_session)
}
TRANSCRIPTS = {name: record(f) for name, f in SESSIONS.items()}


def replay(transcript: bytes, cuts: list[int], buffered: bool) -> tuple[list[Event], bytes]:
    """Feed ``transcript`` split at ``cuts``; return events and output."""
    conn = ServerConnection()
    app = MemoryApp(conn, {d.info.name: d for d in disks()})
    out = bytearray()
    pos = 0
    for end in [*sorted(set(cuts)), len(transcript)]:
        piece = transcript[pos:end]
        pos = end
        while piece:
            if buffered:
                buf = conn.get_buffer(len(piece))
                n = min(buf.nbytes, len(piece))
                buf[:n] = piece[:n]
                conn.buffer_updated(n)
            else:
                n = len(piece)
                conn.receive_data(piece)
            piece = piece[n:]
            app.pump()
            for b in conn.data_to_send():
                out += b
    conn.receive_data(b"")
    app.pump()
    return app.events, bytes(out)


REFERENCE = {name: replay(t, [], False) for name, t in TRANSCRIPTS.items()}


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_byte_at_a_time(name: str) -> None:
    t = TRANSCRIPTS[name]
    for buffered in (False, True):
        assert replay(t, list(range(len(t))), buffered) == REFERENCE[name]


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), buffered=st.booleans())
def test_any_split(name: str, data: st.DataObject, buffered: bool) -> None:
    t = TRANSCRIPTS[name]
    cuts = data.draw(st.lists(st.integers(0, len(t)), max_size=40))
    assert replay(t, cuts, buffered) == REFERENCE[name]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_truncation_is_detected_the_same_way(data: st.DataObject) -> None:
    """A transcript cut short ends with the same outcome (events up to the
    cut, then EndOfStream or the same RemoteProtocolError) for any split."""
    name = data.draw(st.sampled_from(sorted(TRANSCRIPTS)))
    t = TRANSCRIPTS[name]
    short = t[: data.draw(st.integers(0, len(t)))]
    cuts = data.draw(st.lists(st.integers(0, len(short)), max_size=10))

    def outcome(cuts: list[int]) -> object:
        try:
            return replay(short, cuts, buffered=False)
        except RemoteProtocolError as e:
            return str(e)

    assert outcome(cuts) == outcome([])


def test_transcripts_are_not_trivial() -> None:
    """The sessions exercise what they claim (guards the fixture itself)."""
    kinds = {type(e).__name__ for ev, _ in REFERENCE.values() for e in ev}
    assert {
        "Write",
        "Read",
        "BlockStatus",
        "Flush",
        "Trim",
        "WriteZeroes",
        "Cache",
        "RequestRejected",
        "HandshakeComplete",
        "Disconnect",
        "Aborted",
        "ExportListRequested",
        "MetaContextRequested",
    } <= kinds

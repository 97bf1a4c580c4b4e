"""Drive the sans-I/O NBD core with arbitrary bytes (h11's ``fuzz/``
invariant): for any input and any chunking, the core either proceeds or
raises :class:`~nbdqcow.nbd.RemoteProtocolError`; anything else -- a
``LocalProtocolError`` (the core's own bug, which it wraps), ``ValueError``,
``struct.error``, ``IndexError`` -- is a finding.

Used by ``fuzz/fuzz_core.py`` (atheris, standalone) and by
``tests/nbd/test_fuzz.py`` (Hypothesis, bounded, in every test run).

The application side (:class:`AutoApp`) answers every event sensibly, so the
fuzzer reaches deep into the transmission phase; its answers vary with the
input (export found or not, data or hole) to reach error paths too.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from nbdqcow.backends.base import Capabilities, Extent, ExtentFlag
from nbdqcow.nbd import (
    BlockStatus,
    Cache,
    Event,
    ExportInfo,
    ExportListing,
    ExportListRequested,
    ExportRequested,
    Flush,
    Hole,
    InfoType,
    MetaContextRequested,
    Option,
    OptionReply,
    ProtocolLimits,
    Read,
    RemoteProtocolError,
    ServerConnection,
    StartTLS,
    Trim,
    Write,
    WriteZeroes,
)
from nbdqcow.nbd.constants import Command, CommandFlag
from nbdqcow.nbd.wire import pack_extended_request, pack_option, pack_request

__all__ = ["SEEDS", "AutoApp", "run"]

SIZE = 1 << 20

#: Small limits so the fuzzer hits them quickly.
LIMITS = ProtocolLimits(max_options=32, max_option_length=4096, max_write_drain=1 << 18)

CAPS = {
    "rw": Capabilities(read_only=False, trim=True, zero=True, fast_zero=True, cache=True),
    "ro": Capabilities(read_only=True, min_block=512, max_block=65536),
    "big": Capabilities(read_only=False, min_block=4096, extents=False),
}


class AutoApp:
    """Answers every event of a ServerConnection."""

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.events = 0

    def pump(self) -> None:
        while (ev := self.conn.next_event()) is not None:
            self.events += 1
            self.handle(ev)
        self.conn.data_to_send()

    def handle(self, ev: Event) -> None:
        c = self.conn
        if isinstance(ev, ExportRequested | MetaContextRequested):
            name = ev.name if isinstance(ev, ExportRequested) else ev.export_name
            caps = CAPS.get(name or "rw")
            if caps is None:
                c.reject(ev, OptionReply.ERR_UNKNOWN, f"no export {name!r}")
            else:
                c.accept_export(ev, ExportInfo(name, SIZE, caps, "fuzz"))
        elif isinstance(ev, ExportListRequested):
            c.list_exports(ev, [ExportListing(n, "x") for n in CAPS])
        elif isinstance(ev, StartTLS):
            c.tls_established()
        elif isinstance(ev, Read):
            half = ev.length // 2
            c.reply_read(ev.cookie, [memoryview(bytes(half)), Hole(ev.length - half)])
        elif isinstance(ev, BlockStatus):
            n = max(1, ev.length // 3)
            c.reply_block_status(
                ev.cookie,
                [
                    Extent(ev.offset, n, ExtentFlag.DATA, 1),
                    Extent(ev.offset + n, SIZE, ExtentFlag.HOLE | ExtentFlag.ZERO, 0),
                ],
            )
        elif isinstance(ev, Write | Flush | Trim | WriteZeroes | Cache):
            if ev.cookie & 1:
                c.reply_ok(ev.cookie)
            else:
                c.reply_error(ev.cookie, 5, "odd cookie, even luck")  # type: ignore[arg-type]


def run(data: bytes, cuts: Sequence[int] = (), buffered: bool = False, tls: str = "off") -> int:
    """Feed ``data`` split at ``cuts``, then EOF.  Returns the number of
    events; a RemoteProtocolError ends the run normally (returns -1)."""
    conn = ServerConnection(limits=LIMITS, tls=tls)
    app = AutoApp(conn)
    conn.data_to_send()
    pos = 0
    try:
        for end in [*sorted(set(c for c in cuts if 0 <= c <= len(data))), len(data)]:
            piece = data[pos:end]
            pos = end
            while piece:
                if conn.phase.name in ("CLOSED",):
                    break
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
        if conn.phase.name != "CLOSED":
            conn.receive_data(b"")
        app.pump()
    except RemoteProtocolError:
        return -1
    if conn.phase.name != "CLOSED":
        raise AssertionError(f"after EOF the core is still in {conn.phase.name}")
    return app.events


def _info(name: bytes, *infos: int) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def _meta(name: bytes, *queries: bytes) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def _requests(pack: object, extended: bool) -> bytes:
    p = pack_extended_request if extended else pack_request
    out = [
        p(0, Command.WRITE, 1, 0, 8) + b"12345678",
        p(CommandFlag.FUA, Command.READ, 2, 0, 4096),
        p(CommandFlag.DF, Command.READ, 3, 512, 512),
        p(0, Command.BLOCK_STATUS, 5, 0, 65536),
        p(CommandFlag.REQ_ONE, Command.BLOCK_STATUS, 7, 0, 512),
        p(CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO, Command.WRITE_ZEROES, 9, 0, 4096),
        p(0, Command.TRIM, 11, 4096, 4096),
        p(0, Command.FLUSH, 13, 0, 0),
        p(0, Command.CACHE, 15, 0, 4096),
        p(0, Command.WRITE, 17, SIZE, 4) + b"oops",
        p(0, 99, 19, 0, 0),
        p(0, Command.DISC, 21, 0, 0),
    ]
    return b"".join(out)


FLAGS = struct.pack(">I", 3)

#: Valid transcripts to mutate: every option, every command, every mode.
SEEDS: list[bytes] = [
    FLAGS
    + pack_option(Option.LIST)
    + pack_option(Option.INFO, _info(b"ro", InfoType.NAME, InfoType.BLOCK_SIZE))
    + pack_option(0x77, b"junk")
    + pack_option(Option.STRUCTURED_REPLY)
    + pack_option(Option.LIST_META_CONTEXT, _meta(b"", b"base:", b"qemu:"))
    + pack_option(Option.SET_META_CONTEXT, _meta(b"", b"base:allocation", b"qemu:allocation-depth"))
    + pack_option(Option.GO, _info(b"", InfoType.DESCRIPTION))
    + _requests(pack_request, extended=False),
    FLAGS
    + pack_option(Option.EXTENDED_HEADERS)
    + pack_option(Option.SET_META_CONTEXT, _meta(b"rw", b"base:allocation"))
    + pack_option(Option.GO, _info(b"rw", InfoType.BLOCK_SIZE))
    + _requests(pack_extended_request, extended=True),
    struct.pack(">I", 1) + pack_option(Option.EXPORT_NAME, b"") + _requests(pack_request, False),
    FLAGS
    + pack_option(Option.STARTTLS)
    + pack_option(Option.GO, _info(b"big"))
    + pack_option(Option.ABORT),
]

"""In-memory harness for the protocol core: a :class:`ServerConnection`
plus a tiny application (bytearray disks) behind a :class:`Stream`, so that
``tests/nbdclient.py`` can drive the bare core without sockets.

The application is deliberately simple and synchronous: it answers every
event as soon as it is emitted, which is all the core needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nbdqcow.backends.base import Capabilities, Extent, ExtentFlag
from nbdqcow.nbd import (
    Aborted,
    BlockStatus,
    Cache,
    Disconnect,
    EndOfStream,
    Event,
    ExportInfo,
    ExportListing,
    ExportListRequested,
    ExportRequested,
    Flush,
    Hole,
    MetaContextRequested,
    OptionReply,
    Read,
    ServerConnection,
    StartTLS,
    Terminated,
    Trim,
    Write,
    WriteZeroes,
)
from nbdqcow.nbd.answers import ReadRun
from tests.nbdclient import NbdClient

BLOCK = 4096


@dataclass
class Disk:
    """An export of the in-memory app."""

    info: ExportInfo
    data: bytearray

    @classmethod
    def make(
        cls, name: str = "", size: int = 1 << 20, description: str = "", **caps: object
    ) -> Disk:
        c = Capabilities(**{"read_only": False, "trim": True, "zero": True, **caps})  # type: ignore[arg-type]
        return cls(ExportInfo(name, size, c, description), bytearray(size))


def runs_for(data: bytes | bytearray | memoryview, offset: int, length: int) -> list[ReadRun]:
    """Read runs with all-zero 4 KiB-aligned blocks as holes.

    Data runs are snapshots: the core sends the buffers it is given as they
    are *when sent*, and a later write to the disk must not change a reply
    already queued (the same rule a real server follows with its buffers).
    """
    view = memoryview(data)[offset : offset + length]
    out: list[ReadRun] = []
    pos = 0
    while pos < length:
        n = min(BLOCK - (offset + pos) % BLOCK, length - pos)
        piece = view[pos : pos + n]
        if not any(piece):
            out.append(Hole(n))
        else:
            out.append(memoryview(bytes(piece)))
        pos += n
    return out


def extents_for(data: bytearray, offset: int, length: int) -> list[Extent]:
    """4 KiB-granular extents: zero blocks are holes of depth 0."""
    out: list[Extent] = []
    pos = offset - offset % BLOCK
    end = offset + length
    while pos < end and pos < len(data):
        blk = data[pos : pos + BLOCK]
        zero = not any(blk)
        flags = ExtentFlag.HOLE | ExtentFlag.ZERO if zero else ExtentFlag.DATA
        depth = 0 if zero else 1
        start = max(pos, offset)
        n = min(pos + BLOCK, len(data)) - start
        if out and out[-1].flags == flags and out[-1].depth == depth:
            last = out[-1]
            out[-1] = Extent(last.offset, last.length + n, flags, depth)
        else:
            out.append(Extent(start, n, flags, depth))
        pos += BLOCK
    return out


@dataclass
class MemoryApp:
    """Answers a ServerConnection's events from in-memory disks."""

    conn: ServerConnection
    disks: dict[str, Disk] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    closed: bool = False
    #: Hook to answer an event differently; return True if it handled it.
    override: Callable[[MemoryApp, Event], bool] | None = None

    def pump(self) -> None:
        while (ev := self.conn.next_event()) is not None:
            self.events.append(ev)
            if self.override is not None and self.override(self, ev):
                continue
            self.handle(ev)

    def handle(self, ev: Event) -> None:
        c = self.conn
        if isinstance(ev, ExportRequested | MetaContextRequested):
            name = ev.name if isinstance(ev, ExportRequested) else ev.export_name
            disk = self.disks.get(name)
            if disk is None:
                c.reject(ev, OptionReply.ERR_UNKNOWN, f"no export {name!r}")
            else:
                c.accept_export(ev, disk.info)
        elif isinstance(ev, ExportListRequested):
            c.list_exports(
                ev, [ExportListing(d.info.name, d.info.description) for d in self.disks.values()]
            )
        elif isinstance(ev, StartTLS):
            c.tls_established()  # in memory, "TLS" is the identity transport
        elif isinstance(ev, Read):
            c.reply_read(ev.cookie, runs_for(self.disk.data, ev.offset, ev.length))
        elif isinstance(ev, Write):
            self.disk.data[ev.offset : ev.offset + ev.length] = ev.data
            c.reply_ok(ev.cookie)
        elif isinstance(ev, Trim | WriteZeroes):
            self.disk.data[ev.offset : ev.offset + ev.length] = bytes(ev.length)
            c.reply_ok(ev.cookie)
        elif isinstance(ev, Flush | Cache):
            c.reply_ok(ev.cookie)
        elif isinstance(ev, BlockStatus):
            c.reply_block_status(ev.cookie, extents_for(self.disk.data, ev.offset, ev.length))
        elif isinstance(ev, Aborted | Disconnect | Terminated | EndOfStream):
            self.closed = True

    @property
    def disk(self) -> Disk:
        export = self.conn.export
        assert export is not None
        return self.disks[export.name]


class MemoryStream:
    """A :class:`tests.nbdclient.Stream` wired to a ServerConnection.

    ``chunk`` splits every client write into pieces of that size (to
    exercise incremental parsing); ``buffered`` feeds through
    ``get_buffer``/``buffer_updated`` instead of ``receive_data``.
    """

    def __init__(self, app: MemoryApp, chunk: int = 0, buffered: bool = False) -> None:
        self.app = app
        self.out = bytearray()
        self.chunk = chunk
        self.buffered = buffered
        self.flush_output()

    def flush_output(self) -> None:
        for b in self.app.conn.data_to_send():
            self.out += b

    def feed(self, data: bytes) -> None:
        conn = self.app.conn
        step = self.chunk or max(1, len(data))
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            if self.buffered:
                while piece:
                    buf = conn.get_buffer(len(piece))
                    n = min(len(buf), len(piece))
                    buf[:n] = piece[:n]
                    conn.buffer_updated(n)
                    piece = piece[n:]
                    self.app.pump()
            else:
                conn.receive_data(piece)
                self.app.pump()
        self.flush_output()

    def write(self, data: bytes) -> None:
        self.feed(data)

    def read_exact(self, n: int) -> bytes:
        if len(self.out) < n:
            raise EOFError(f"server has sent {len(self.out)} bytes, the client wants {n}")
        out = bytes(self.out[:n])
        del self.out[:n]
        return out

    def close(self) -> None:
        self.app.conn.receive_data(b"")
        self.app.pump()


def memory_client(
    *disks: Disk, chunk: int = 0, buffered: bool = False, **conn_kwargs: object
) -> tuple[NbdClient, MemoryApp]:
    """A NbdClient over a fresh in-memory server (client, app)."""
    conn = ServerConnection(**conn_kwargs)  # type: ignore[arg-type]
    app = MemoryApp(conn, {d.info.name: d for d in disks} or {"": Disk.make()})
    client = NbdClient(MemoryStream(app, chunk=chunk, buffered=buffered))
    return client, app

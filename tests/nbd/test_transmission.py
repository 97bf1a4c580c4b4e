"""The transmission phase: requests, simple / structured / extended replies
(proto.md "Transmission", "Request types", "Structured reply types";
extended headers branch), write payload handling and reply-API contracts."""

from __future__ import annotations

import struct

import pytest

from nbdqcow.backends.base import Extent, ExtentFlag
from nbdqcow.nbd import (
    BlockStatus,
    Command,
    CommandFlag,
    Disconnect,
    EndOfStream,
    Errno,
    Hole,
    LocalProtocolError,
    Phase,
    ProtocolLimits,
    Read,
    RemoteProtocolError,
    ReplyFlag,
    ReplyType,
    RequestRejected,
    ServerConnection,
    Write,
    WriteZeroes,
)
from nbdqcow.nbd.wire import pack_extended_request, pack_request
from tests.nbd.helpers import Disk, MemoryApp, memory_client
from tests.nbdclient import NbdClient, NbdError

MiB = 1 << 20
BOTH = ["base:allocation", "qemu:allocation-depth"]


def session(mode: str, *disks: Disk, **kw: object) -> tuple[NbdClient, MemoryApp]:
    """A client in transmission; ``mode`` is simple, structured or extended."""
    c, app = memory_client(*(disks or (Disk.make(""),)), **kw)
    c.handshake()
    if mode == "extended":
        c.extended_headers()
    elif mode == "structured":
        c.structured_reply()
    if mode != "simple":
        c.set_meta_context("", BOTH)
    c.go("")
    return c, app


MODES = ["simple", "structured", "extended"]


def manual(mode: str, *disks: Disk, **kw: object) -> tuple[NbdClient, MemoryApp]:
    """A session whose requests the test answers by hand."""
    c, app = session(mode, *disks, **kw)
    app.override = lambda app, ev: not isinstance(ev, Disconnect | EndOfStream)
    return c, app


class TestReadWrite:
    """``NBD_CMD_READ`` (0) and ``NBD_CMD_WRITE`` (1) in every reply mode."""

    @pytest.mark.parametrize("mode", MODES)
    def test_roundtrip_with_holes(self, mode: str) -> None:
        c, _ = session(mode)
        c.write(8192, b"abc" * 1000)
        data = c.read(0, 5 * 4096)
        assert data == bytes(8192) + b"abc" * 1000 + bytes(5 * 4096 - 8192 - 3000)

    @pytest.mark.parametrize("mode", ["structured", "extended"])
    def test_holes_become_offset_hole_chunks(self, mode: str) -> None:
        c, _ = session(mode)
        c.write(4096, b"x" * 4096)
        r = c.request(Command.READ, 0, 3 * 4096)
        types = [t for _, t, _ in r.chunks]
        assert types == [ReplyType.OFFSET_HOLE, ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE]
        assert [f & ReplyFlag.DONE for f, _, _ in r.chunks] == [0, 0, 1]
        assert struct.unpack(">QI", r.chunks[0][2]) == (0, 4096)
        assert r.data == bytes(4096) + b"x" * 4096 + bytes(4096)

    @pytest.mark.parametrize("mode", ["structured", "extended"])
    def test_df_sends_one_data_chunk(self, mode: str) -> None:
        # "If the area being read contains both data and a hole, the server
        # MUST use NBD_REPLY_TYPE_OFFSET_DATA with the zeroes explicitly present"
        c, _ = session(mode)
        c.write(4096, b"y" * 10)
        r = c.request(Command.READ, 0, 3 * 4096, CommandFlag.DF)
        assert [(f, t) for f, t, _ in r.chunks] == [(ReplyFlag.DONE, ReplyType.OFFSET_DATA)]
        assert r.data == bytes(4096) + b"y" * 10 + bytes(2 * 4096 - 10)

    def test_simple_read_of_a_hole_uses_shared_zeroes(self) -> None:
        c, app = manual("simple", Disk.make("", size=4 * MiB))
        c.send_request(Command.READ, 0, 3 * MiB)
        (ev,) = [e for e in app.events if isinstance(e, Read)]
        app.conn.reply_read(ev.cookie, [Hole(3 * MiB)])
        out = app.conn.data_to_send()
        assert len(out) == 4  # header + three slices of one 1 MiB zero buffer
        assert all(isinstance(b, memoryview) for b in out[1:])
        assert len({id(b.obj) for b in out[1:] if isinstance(b, memoryview)}) == 1

    @pytest.mark.parametrize("mode", MODES)
    def test_payload_buffers_are_not_copied(self, mode: str) -> None:
        c, app = manual(mode)
        c.send_request(Command.READ, 0, 8192)
        ev = app.events[-1]
        assert isinstance(ev, Read)
        a, b = bytearray(b"a" * 4096), bytearray(b"b" * 4096)
        app.conn.reply_read(ev.cookie, [memoryview(a), memoryview(b)])
        out = app.conn.data_to_send()
        payloads = [x for x in out if isinstance(x, memoryview)]
        assert [p.obj for p in payloads] == [a, b]  # the caller's own buffers

    @pytest.mark.parametrize("mode", MODES)
    def test_read_error(self, mode: str) -> None:
        c, app = manual(mode)
        cookie = c.send_request(Command.READ, 0, 512)
        app.conn.reply_error(cookie, Errno.EIO, "disk on fire")
        c.stream.flush_output()  # type: ignore[attr-defined]
        r = c.recv_reply()
        assert r.error == Errno.EIO
        assert r.message == ("" if mode == "simple" else "disk on fire")
        assert r.data == b""

    @pytest.mark.parametrize(
        ("command", "flags", "given", "sent"),
        [
            # ENOTSUP is the fast-zero refusal and nothing else ("MUST NOT
            # fail with NBD_ENOTSUP" without the flag)
            (Command.WRITE_ZEROES, CommandFlag.FAST_ZERO, Errno.ENOTSUP, Errno.ENOTSUP),
            (Command.WRITE_ZEROES, 0, Errno.ENOTSUP, Errno.EINVAL),
            (Command.TRIM, 0, Errno.ENOTSUP, Errno.EINVAL),
            (Command.CACHE, 0, Errno.ENOTSUP, Errno.EINVAL),
            # EOVERFLOW is for DF reads only
            (Command.READ, CommandFlag.DF, Errno.EOVERFLOW, Errno.EOVERFLOW),
            (Command.READ, 0, Errno.EOVERFLOW, Errno.EINVAL),
            (Command.WRITE_ZEROES, 0, Errno.EIO, Errno.EIO),
        ],
    )
    def test_reserved_errnos_only_where_the_spec_allows(
        self, command: Command, flags: int, given: Errno, sent: Errno
    ) -> None:
        c, app = manual("structured", Disk.make("", cache=True, fast_zero=True))
        cookie = c.send_request(command, 0, 4096, flags)
        app.conn.reply_error(cookie, given, "backend says no")
        c.stream.flush_output()  # type: ignore[attr-defined]
        r = c.recv_reply()
        assert (r.error, r.message) == (sent, "backend says no")

    def test_structured_read_error_even_for_early_einval(self) -> None:
        # "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of
        # an early EINVAL due to bad flags)"
        c, _ = session("structured")
        r = c.request(Command.READ, 0, 1, 1 << 12)
        assert r.kind == "structured" and r.error == Errno.EINVAL and "flags" in r.message

    @pytest.mark.parametrize("mode", MODES)
    def test_out_of_range(self, mode: str) -> None:
        c, app = session(mode)
        with pytest.raises(NbdError) as ei:
            c.read(MiB - 512, 1024)
        assert ei.value.errno == Errno.EINVAL
        with pytest.raises(NbdError) as ei:
            c.write(MiB, b"z")
        assert ei.value.errno == Errno.ENOSPC
        assert isinstance(app.events[-1], RequestRejected)
        assert app.events[-1].command_name == "WRITE"

    def test_read_only(self) -> None:
        c, _ = session("structured", Disk.make("", read_only=True))
        with pytest.raises(NbdError) as ei:
            c.write(0, b"z" * 512)
        assert ei.value.errno == Errno.EPERM
        assert c.read(0, 4) == bytes(4)  # the stream stayed in sync

    @pytest.mark.parametrize("mode", MODES)
    def test_refused_write_payload_is_drained(self, mode: str) -> None:
        c, app = session(mode, Disk.make("", min_block=512))
        for _ in range(3):
            with pytest.raises(NbdError):
                c.write(1, b"q" * 70000)  # unaligned
        c.write(512, b"ok" * 256)
        assert c.read(512, 512) == b"ok" * 256
        assert app.conn.in_flight == 0

    def test_oversized_write_is_drained_up_to_the_limit(self) -> None:
        c, _ = session("simple", Disk.make("", max_block=4096, preferred_block=4096))
        with pytest.raises(NbdError) as ei:
            c.write(0, b"x" * 8192)
        assert ei.value.errno == Errno.EINVAL
        assert c.read(0, 4096) == bytes(4096)

    def test_absurd_write_disconnects(self) -> None:
        c, app = session("simple", limits=ProtocolLimits(max_write_drain=1 << 20))
        with pytest.raises(RemoteProtocolError, match="payload"):
            c.send_raw(pack_request(0, Command.WRITE, 1, 0, 0xFFFFFFFF))
        assert app.conn.phase is Phase.ERROR

    def test_extended_write_with_and_without_payload_len(self) -> None:
        c, _ = session("extended")
        c.write(0, b"a" * 512)  # the client sets PAYLOAD_LEN
        c.request(Command.WRITE, 512, 512, 0, b"b" * 512)  # and without it
        assert c.read(0, 1024) == b"a" * 512 + b"b" * 512

    def test_extended_payload_on_other_commands_is_drained(self) -> None:
        c, _ = session("extended")
        r = c.request(Command.READ, 0, 16, CommandFlag.PAYLOAD_LEN, b"p" * 16)
        assert r.error == Errno.EINVAL
        assert c.read(0, 4) == bytes(4)

    def test_extended_reply_echoes_offset(self) -> None:
        c, _ = session("extended")
        c.write(4096, b"e" * 4096)
        r = c.request(Command.FLUSH)
        assert r.kind == "extended" and r.chunks[0][1] == ReplyType.NONE
        assert c.read(4096, 4096) == b"e" * 4096  # the client checks the echo


class TestWritePayload:
    """How a WRITE payload reaches the application (zero copy)."""

    def test_allocator_buffer_is_the_event_data(self) -> None:
        made: list[bytearray] = []

        def allocate(n: int) -> memoryview:
            made.append(bytearray(n))
            return memoryview(made[-1])

        c, app = manual("simple", allocate=allocate)
        c.send_request(Command.WRITE, 0, 4096, payload=b"w" * 4096)
        ev = app.events[-1]
        assert isinstance(ev, Write)
        assert ev.data.obj is made[0] and bytes(ev.data) == b"w" * 4096

    def test_get_buffer_returns_the_payload_buffer(self) -> None:
        target = bytearray(65536)
        conn = ServerConnection(allocate=lambda n: memoryview(target)[:n])
        app = MemoryApp(conn, {"": Disk.make("")})
        c = NbdClient(_Loop(app))
        c.handshake()
        c.go("")
        header = pack_request(0, Command.WRITE, 7, 0, 65536)
        buf = conn.get_buffer()
        buf[: len(header) + 100] = header + b"1" * 100
        conn.buffer_updated(len(header) + 100)
        assert conn.next_event() is None  # waiting for the payload
        view = conn.get_buffer()
        assert view.obj is target and view.nbytes == 65536 - 100
        view[:] = b"2" * view.nbytes  # the "kernel" writes in place
        conn.buffer_updated(view.nbytes)
        ev = conn.next_event()
        assert isinstance(ev, Write)
        assert bytes(ev.data) == b"1" * 100 + b"2" * (65536 - 100)

    def test_bad_allocator(self) -> None:
        c, _app = manual("simple", allocate=lambda n: memoryview(bytes(n)))
        with pytest.raises(LocalProtocolError, match="allocate"):
            c.send_request(Command.WRITE, 0, 1, payload=b"x")

    def test_eof_in_the_middle_of_a_payload(self) -> None:
        c, _app = session("simple")
        c.send_raw(pack_request(0, Command.WRITE, 1, 0, 100) + b"x" * 50)
        with pytest.raises(RemoteProtocolError, match="50 of 100"):
            c.stream.close()


class _Loop:
    """A stream that only collects output (the test feeds input by hand)."""

    def __init__(self, app: MemoryApp) -> None:
        self.app = app
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.app.conn.receive_data(data)
        self.app.pump()

    def read_exact(self, n: int) -> bytes:
        for b in self.app.conn.data_to_send():
            self.out += b
        out = bytes(self.out[:n])
        del self.out[:n]
        return out

    def close(self) -> None:
        pass


class TestOtherCommands:
    """FLUSH, TRIM, WRITE_ZEROES, CACHE, DISC."""

    @pytest.mark.parametrize("mode", MODES)
    def test_flush_trim_zero_cache(self, mode: str) -> None:
        c, app = session(mode, Disk.make("", cache=True, fast_zero=True))
        c.write(0, b"d" * 8192)
        c.flush()
        c.trim(0, 4096, CommandFlag.FUA)
        c.zero(4096, 4096, CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO)
        c.cache(0, 8192)
        assert c.read(0, 8192) == bytes(8192)
        z = next(e for e in app.events if isinstance(e, WriteZeroes))
        assert not z.may_trim and z.fast and not z.fua

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize(
        "command", [Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES, Command.CACHE]
    )
    def test_zero_length_is_a_successful_no_op(self, mode: str, command: Command) -> None:
        # proto.md leaves zero-length requests unspecified ("SHOULD NOT
        # disconnect"); qemu-nbd 7.2 answers success, so do we, without
        # bothering the application with an empty range.
        c, app = manual(mode, Disk.make("", cache=True))
        before = len(app.events)
        cookie = c.send_request(command, 4096, 0, CommandFlag.FUA)
        assert len(app.events) == before
        r = c.recv_reply()
        assert r.cookie == cookie and r.error == 0 and r.data == b""
        if command is Command.READ or mode == "extended":
            assert r.kind == mode  # never a simple reply to a structured READ
            if mode != "simple":
                assert [(f, t) for f, t, _ in r.chunks] == [(ReplyFlag.DONE, ReplyType.NONE)]
        else:
            assert r.kind == "simple"

    def test_zero_length_block_status_is_invalid(self) -> None:
        c, _ = session("structured")
        assert c.request(Command.BLOCK_STATUS, 0, 0).error == Errno.EINVAL

    def test_fast_zero_not_advertised(self) -> None:
        c, _ = session("structured")
        with pytest.raises(NbdError) as ei:
            c.zero(0, 512, CommandFlag.FAST_ZERO)
        assert ei.value.errno == Errno.EINVAL

    def test_disconnect(self) -> None:
        c, app = manual("structured")
        cookie = c.send_request(Command.READ, 0, 512)
        c.disconnect()
        assert isinstance(app.events[-1], Disconnect)
        assert app.conn.phase is Phase.CLOSED
        c.send_raw(b"garbage after DISC is ignored")
        # "The server MUST handle all outstanding requests"
        app.conn.reply_read(cookie, [Hole(512)])
        c.stream.flush_output()  # type: ignore[attr-defined]
        assert c.recv_reply().data == bytes(512)

    def test_clean_eof(self) -> None:
        c, app = session("simple")
        c.stream.close()
        assert isinstance(app.events[-1], EndOfStream)

    def test_truncated_header(self) -> None:
        c, _ = session("simple")
        c.send_raw(pack_request(0, Command.READ, 1, 0, 1)[:20])
        with pytest.raises(RemoteProtocolError, match="20 of 28"):
            c.stream.close()

    @pytest.mark.parametrize("mode", MODES)
    def test_bad_magic(self, mode: str) -> None:
        c, _ = session(mode)
        wrong = pack_request if mode == "extended" else pack_extended_request
        with pytest.raises(RemoteProtocolError, match="magic"):
            c.send_raw(wrong(0, Command.READ, 1, 0, 1) + bytes(4))

    def test_unknown_command(self) -> None:
        c, app = session("structured")
        r = c.request(99, 0, 512)
        assert r.error == Errno.EINVAL and "99" in r.message
        assert isinstance(app.events[-1], RequestRejected)
        assert app.events[-1].command_name == "command 99"


class TestBlockStatus:
    """``NBD_CMD_BLOCK_STATUS`` (7) with both contexts."""

    def test_both_contexts(self) -> None:
        c, _ = session("structured")
        c.write(8192, b"d" * 4096)
        got = c.block_status(0, 5 * 4096)
        assert got == {
            "base:allocation": [(8192, 3), (4096, 0), (8192, 3)],
            "qemu:allocation-depth": [(8192, 0), (4096, 1), (8192, 0)],
        }

    def test_req_one(self) -> None:
        c, _ = session("structured")
        got = c.block_status(0, MiB, CommandFlag.REQ_ONE)
        assert all(len(v) == 1 for v in got.values())
        assert got["base:allocation"] == [(MiB, 3)]

    def test_extended_uses_64_bit_descriptors(self) -> None:
        c, _ = session("extended")
        r = c.request(Command.BLOCK_STATUS, 0, 4096)
        assert {t for _, t, _ in r.chunks} == {ReplyType.BLOCK_STATUS_EXT}
        assert [f & ReplyFlag.DONE for f, _, _ in r.chunks] == [0, 1]

    def test_clipping_and_merging(self) -> None:
        c, app = manual("structured")
        cookie = c.send_request(Command.BLOCK_STATUS, 1000, 5000)
        d, h = ExtentFlag.DATA, ExtentFlag.HOLE | ExtentFlag.ZERO
        app.conn.reply_block_status(
            cookie,
            [
                Extent(0, 2048, d, 1),
                Extent(2048, 2048, d, 2),  # same base status: merged there
                Extent(4096, 1 << 30, h, 0),  # runs past the request: clipped
            ],
        )
        c.stream.flush_output()  # type: ignore[attr-defined]
        r = c.recv_reply()
        by_name = {c.contexts[k]: v for k, v in r.extents.items()}
        assert by_name["base:allocation"] == [(3096, 0), (1904, 3)]
        assert by_name["qemu:allocation-depth"] == [(1048, 1), (2048, 2), (1904, 0)]

    def test_early_stop_is_allowed(self) -> None:
        c, app = manual("structured")
        cookie = c.send_request(Command.BLOCK_STATUS, 0, MiB)
        app.conn.reply_block_status(cookie, [Extent(0, 512, ExtentFlag.DATA)])
        c.stream.flush_output()  # type: ignore[attr-defined]
        r = c.recv_reply()
        # Fewer descriptors than the range is fine ("MAY return less").
        assert r.extents == {1: [(512, 0)], 2: [(512, 1)]}

    def test_extents_must_start_at_the_offset(self) -> None:
        c, app = manual("structured")
        cookie = c.send_request(Command.BLOCK_STATUS, 4096, 512)
        with pytest.raises(LocalProtocolError, match="offset"):
            app.conn.reply_block_status(cookie, [Extent(8192, 512, ExtentFlag.DATA)])
        with pytest.raises(LocalProtocolError):
            app.conn.reply_block_status(cookie, [])
        assert app.conn.in_flight == 1  # still awaiting a proper reply

    def test_without_contexts(self) -> None:
        c, _app = memory_client(Disk.make(""))
        c.handshake()
        c.structured_reply()
        c.go("")
        with pytest.raises(NbdError) as ei:
            c.block_status(0, 512)
        assert ei.value.errno == Errno.EINVAL


class TestReplyContract:
    """The reply API refuses replies that would break the protocol."""

    def test_wrong_reply_kind(self) -> None:
        c, app = manual("structured")
        read = c.send_request(Command.READ, 0, 512)
        status = c.send_request(Command.BLOCK_STATUS, 0, 512)
        write = c.send_request(Command.WRITE, 0, 4, payload=b"abcd")
        with pytest.raises(LocalProtocolError, match="NBD_CMD_READ"):
            app.conn.reply_ok(read)
        with pytest.raises(LocalProtocolError):
            app.conn.reply_read(status, [Hole(512)])
        with pytest.raises(LocalProtocolError):
            app.conn.reply_block_status(write, [])
        with pytest.raises(LocalProtocolError, match="total"):
            app.conn.reply_read(read, [Hole(511)])
        with pytest.raises(LocalProtocolError, match="errno"):
            app.conn.reply_error(read, 4)  # type: ignore[arg-type]
        assert app.conn.in_flight == 3
        app.conn.reply_ok(write)
        app.conn.reply_error(status, Errno.EIO)
        app.conn.reply_read(read, [b"r" * 512])
        assert app.conn.in_flight == 0

    def test_out_of_order_and_duplicate_cookies(self) -> None:
        c, app = manual("simple")
        for _ in range(2):
            c.send_request(Command.READ, 0, 4, cookie=5)
        c.send_request(Command.READ, 4, 4, cookie=6)
        assert app.conn.in_flight == 3
        app.conn.reply_read(6, [b"6666"])
        app.conn.reply_read(5, [b"5555"])
        app.conn.reply_read(5, [b"5556"])
        with pytest.raises(LocalProtocolError):
            app.conn.reply_read(5, [b"5557"])
        out = b"".join(bytes(b) for b in app.conn.data_to_send())
        assert out.count(b"\x67\x44\x66\x98") == 3 and out.endswith(b"5556")

    def test_replies_after_a_protocol_error_are_dropped(self) -> None:
        c, app = manual("structured")
        cookie = c.send_request(Command.READ, 0, 4)
        with pytest.raises(RemoteProtocolError):
            c.send_raw(b"\xde\xad\xbe\xef" * 8)
        app.conn.reply_read(cookie, [b"late"])  # no exception: dropped
        assert app.conn.phase is Phase.ERROR

    def test_events_carry_flags(self) -> None:
        c, app = manual("structured")
        c.send_request(Command.READ, 8, 16, CommandFlag.FUA | CommandFlag.DF)
        c.send_request(Command.BLOCK_STATUS, 0, 1, CommandFlag.REQ_ONE)
        r, b = app.events[-2:]
        assert isinstance(r, Read) and r.fua and r.df and (r.offset, r.length) == (8, 16)
        assert isinstance(b, BlockStatus) and b.req_one and not b.fua

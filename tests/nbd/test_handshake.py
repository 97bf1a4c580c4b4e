"""The fixed-newstyle handshake, one class per section of ``doc/proto.md``
("Newstyle negotiation", "Fixed newstyle negotiation", "Option types",
"TLS support", "Metadata querying"; INFO/GO and extended headers)."""

from __future__ import annotations

import struct

import pytest

from nbdqcow.backends.base import Capabilities
from nbdqcow.nbd import (
    Aborted,
    ClientFlag,
    Command,
    Errno,
    ExportInfo,
    ExportRequested,
    HandshakeComplete,
    InfoType,
    LocalProtocolError,
    Option,
    OptionReply,
    Phase,
    ProtocolLimits,
    RemoteProtocolError,
    ServerConnection,
    StartTLS,
    Terminated,
    TlsMode,
    TransmissionFlag,
)
from nbdqcow.nbd.wire import pack_option, pack_request
from tests.nbd.helpers import Disk, MemoryApp, memory_client
from tests.nbdclient import NbdClient, NbdError, OptionError

ERR = OptionReply


def client(*disks: Disk, **kw: object) -> tuple[NbdClient, MemoryApp]:
    c, app = memory_client(*disks, **kw)
    c.handshake()
    return c, app


def expect_option_error(c: NbdClient, reply: OptionReply, option: int, data: bytes = b"") -> str:
    with pytest.raises(OptionError) as ei:
        c.option(option, data)
    assert ei.value.reply == reply, ei.value
    assert ei.value.message  # errors always carry a human message
    return ei.value.message


class TestGreeting:
    """ "Newstyle negotiation": S: NBDMAGIC, IHAVEOPT, handshake flags."""

    def test_greeting_is_queued_at_construction(self) -> None:
        conn = ServerConnection()
        assert conn.data_to_send() == [b"NBDMAGICIHAVEOPT\x00\x03"]
        assert conn.data_to_send() == []
        assert conn.phase is Phase.CLIENT_FLAGS

    @pytest.mark.parametrize("bad", [1 << 2, 1 << 31, 0xFFFFFFFF])
    def test_unknown_client_flags_drop_the_connection(self, bad: int) -> None:
        # "the server MUST drop the TCP connection if the client sets an
        # unknown flag"
        conn = ServerConnection()
        conn.receive_data(struct.pack(">I", bad | 1))
        with pytest.raises(RemoteProtocolError, match="unknown bits"):
            conn.next_event()
        assert conn.phase is Phase.ERROR
        with pytest.raises(LocalProtocolError):
            conn.next_event()

    def test_eof_before_flags_is_a_clean_end(self) -> None:
        conn = ServerConnection()
        conn.receive_data(b"")
        assert type(conn.next_event()).__name__ == "EndOfStream"
        assert conn.phase is Phase.CLOSED

    def test_truncated_flags(self) -> None:
        conn = ServerConnection()
        conn.receive_data(b"\0\0")
        assert conn.next_event() is None
        conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="client flags"):
            conn.next_event()

    def test_non_fixed_client_can_still_use_export_name(self) -> None:
        # "Servers MAY choose to honour fixed newstyle from clients that
        # didn't set this bit"; EXPORT_NAME is all a non-fixed client sends.
        c, app = memory_client(Disk.make("d"))
        c.handshake(client_flags=0)
        info = c.export_name("d")
        assert info.size == 1 << 20
        assert app.conn.phase is Phase.TRANSMISSION


class TestExportName:
    """``NBD_OPT_EXPORT_NAME`` (1)."""

    def test_reply_with_zeroes(self) -> None:
        c, app = memory_client(Disk.make("d"))
        c.handshake(client_flags=ClientFlag.FIXED_NEWSTYLE)
        info = c.export_name("d")  # checks the 124 zero bytes
        assert info.size == 1 << 20
        assert info.flags & TransmissionFlag.HAS_FLAGS
        assert not info.flags & TransmissionFlag.SEND_DF  # no structured replies
        assert isinstance(app.events[-1], HandshakeComplete)

    def test_no_zeroes(self) -> None:
        c, _app = client(Disk.make("d"))
        c.send_raw(pack_option(Option.EXPORT_NAME, b"d"))
        # size (8) and flags (2), no 124 zero bytes after NO_ZEROES
        assert len(c.stream.out) == 10  # type: ignore[attr-defined]

    def test_unknown_export_terminates(self) -> None:
        # "If the chosen export does not exist ... the server MUST terminate
        # the session"
        c, app = client(Disk.make("d"))
        c.send_raw(pack_option(Option.EXPORT_NAME, b"nope"))
        assert isinstance(app.events[-1], Terminated)
        assert "nope" in app.events[-1].reason
        assert app.conn.phase is Phase.CLOSED
        assert app.conn.data_to_send() == []
        with pytest.raises(EOFError):
            c.recv_exact(1)

    def test_invalid_utf8_name(self) -> None:
        c, _app = client(Disk.make("d"))
        with pytest.raises(RemoteProtocolError, match="UTF-8"):
            c.send_raw(pack_option(Option.EXPORT_NAME, b"\xff"))

    def test_structured_replies_carry_over(self) -> None:
        c, _ = client(Disk.make("d"))
        c.structured_reply()
        info = c.export_name("d")
        assert info.flags & TransmissionFlag.SEND_DF

    def test_after_extended_headers_is_a_violation(self) -> None:
        c, _ = client(Disk.make("d"))
        c.extended_headers()
        with pytest.raises(RemoteProtocolError, match="extended headers"):
            c.send_raw(pack_option(Option.EXPORT_NAME, b"d"))


class TestInfoAndGo:
    """``NBD_OPT_INFO`` (6) and ``NBD_OPT_GO`` (7)."""

    def test_go_all_infos(self) -> None:
        c, app = client(Disk.make("d", description="a disk"))
        info = c.go("d")
        assert (info.name, info.description, info.size) == ("d", "a disk", 1 << 20)
        assert info.block_size == (1, 4096, 32 << 20)
        assert app.conn.phase is Phase.TRANSMISSION
        ev = app.events[-1]
        assert isinstance(ev, HandshakeComplete) and ev.flags == info.flags

    def test_export_info_is_last_and_ack_has_no_padding(self) -> None:
        c, _app = client(Disk.make("d"))
        c.send_raw(pack_option(Option.GO, NbdClient.info_payload("d", [InfoType.BLOCK_SIZE])))
        replies = []
        while True:
            r = c.recv_option_reply()
            replies.append(r)
            if r.type == OptionReply.ACK:
                break
        assert [r.type for r in replies] == [ERR.INFO, ERR.INFO, ERR.ACK]
        assert struct.unpack(">H", replies[-2].data[:2])[0] == InfoType.EXPORT
        # "no zero padding after ACK": nothing else was sent
        assert c.stream.out == b""  # type: ignore[attr-defined]

    def test_info_then_go_give_the_same_answers(self) -> None:
        # "INFO then GO with same params ... MUST return the same info"
        c, app = client(Disk.make("d", description="x"))
        a = c.info("d")
        assert app.conn.phase is Phase.OPTIONS
        b = c.go("d")
        assert a == b

    def test_name_and_description_only_when_requested(self) -> None:
        c, _ = client(Disk.make("d", description="x"))
        info = c.go("d", requests=[])
        assert info.name is None and info.description is None
        assert info.block_size is not None  # always sent

    def test_unknown_info_requests_are_ignored(self) -> None:
        c, _ = client(Disk.make("d"))
        info = c.go("d", requests=[77, 0xFFFF])
        assert info.size == 1 << 20 and not info.unknown

    def test_default_export(self) -> None:
        c, _ = client(Disk.make(""))
        assert c.go("").size == 1 << 20

    def test_unknown_export(self) -> None:
        c, _app = client(Disk.make("d"))
        msg = expect_option_error(c, ERR.ERR_UNKNOWN, Option.GO, c.info_payload("x", []))
        assert "x" in msg
        assert c.go("d").size == 1 << 20  # negotiation goes on

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            struct.pack(">I", 100) + b"d",  # name length beyond the data
            struct.pack(">I", 1) + b"d" + struct.pack(">H", 2) + b"\0\0",  # count too big
            struct.pack(">I", 1) + b"d" + struct.pack(">H", 0) + b"junk",  # trailing bytes
            struct.pack(">I", 1) + b"\0" + struct.pack(">H", 0),  # NUL in the name
            struct.pack(">I", 1) + b"\xff" + struct.pack(">H", 0),  # not UTF-8
            struct.pack(">I", 5000) + b"a" * 5000 + struct.pack(">H", 0),  # > 4096
        ],
    )
    def test_malformed_is_invalid_and_parsing_goes_on(self, data: bytes) -> None:
        c, _ = client(Disk.make("d"))
        expect_option_error(c, ERR.ERR_INVALID, Option.INFO, data)
        assert c.go("d").size == 1 << 20

    def test_block_size_required(self) -> None:
        d = Disk.make("d", min_block=4096)
        c, app = client(d)
        # "SHOULD ensure it first sends an NBD_INFO_BLOCK_SIZE information
        # reply": INFO(BLOCK_SIZE), then the error.
        c.send_raw(pack_option(Option.GO, c.info_payload("d", [])))
        first = c.recv_option_reply()
        assert (first.type, first.data) == (
            ERR.INFO,
            struct.pack(">HIII", InfoType.BLOCK_SIZE, 4096, 4096, 32 << 20),
        )
        assert c.recv_option_reply().type == ERR.ERR_BLOCK_SIZE_REQD
        assert app.conn.phase is Phase.OPTIONS
        info = c.go("d", requests=[InfoType.BLOCK_SIZE])
        assert info.block_size == (4096, 4096, 32 << 20)

    @pytest.mark.parametrize(
        ("caps", "sizes"),
        [
            # preferred below 512 is raised to 512 ("at least ... 2^9")
            ({"preferred_block": 256}, (1, 512, 32 << 20)),
            # not a power of 2: rounded up
            ({"preferred_block": 3000}, (1, 4096, 32 << 20)),
            # maximum made a multiple of the minimum
            ({"min_block": 4096, "max_block": (1 << 20) + 512}, (4096, 4096, 1 << 20)),
            # at least the preferred size
            ({"preferred_block": 65536, "max_block": 4096}, (1, 65536, 65536)),
        ],
    )
    def test_block_sizes_obey_the_spec(self, caps: dict[str, int], sizes: tuple[int, ...]) -> None:
        c, _ = client(Disk.make("d", **caps))
        assert c.go("d", requests=[InfoType.BLOCK_SIZE]).block_size == sizes

    def test_maximum_advertised_is_the_maximum_enforced(self) -> None:
        c, _ = client(Disk.make("d", min_block=4096, max_block=(64 << 10) + 512))
        c.go("d", requests=[InfoType.BLOCK_SIZE])
        assert c.read(0, 64 << 10) == bytes(64 << 10)
        with pytest.raises(NbdError) as ei:
            c.read(0, (64 << 10) + 4096)
        assert ei.value.errno == Errno.EINVAL

    def test_512_minimum_does_not_require_the_request(self) -> None:
        c, _ = client(Disk.make("d", min_block=512))
        assert c.go("d", requests=[]).block_size == (512, 4096, 32 << 20)

    def test_flags_follow_capabilities(self) -> None:
        ro = Disk.make("ro", read_only=True, cache=True, rotational=True, multi_conn=False)
        c, _ = client(ro)
        f = TransmissionFlag(c.go("ro").flags)
        assert f & TransmissionFlag.READ_ONLY and f & TransmissionFlag.SEND_CACHE
        assert f & TransmissionFlag.ROTATIONAL and not f & TransmissionFlag.CAN_MULTI_CONN
        assert not f & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)

    def test_fast_zero_flag(self) -> None:
        c, _ = client(Disk.make("d", fast_zero=True))
        c.structured_reply()
        f = TransmissionFlag(c.go("d").flags)
        assert f & TransmissionFlag.SEND_FAST_ZERO and f & TransmissionFlag.SEND_DF


class TestList:
    """``NBD_OPT_LIST`` (3): NBD_REP_SERVER per export, then ACK."""

    def test_names_and_descriptions(self) -> None:
        c, _ = client(Disk.make("a", description="first"), Disk.make("b"))
        assert c.list_exports() == [("a", "first"), ("b", "")]

    def test_data_is_invalid(self) -> None:
        c, _ = client(Disk.make("a"))
        expect_option_error(c, ERR.ERR_INVALID, Option.LIST, b"x")
        assert c.list_exports() == [("a", "")]

    def test_application_may_refuse(self) -> None:
        c, app = client(Disk.make("a"))

        def deny(app: MemoryApp, ev: object) -> bool:
            from nbdqcow.nbd import ExportListRequested

            if isinstance(ev, ExportListRequested):
                app.conn.reject(ev, ERR.ERR_POLICY, "listing is disabled")
                return True
            return False

        app.override = deny
        assert "disabled" in expect_option_error(c, ERR.ERR_POLICY, Option.LIST)


class TestAbort:
    """``NBD_OPT_ABORT`` (2): "The server MUST reply with NBD_REP_ACK"."""

    def test_ack_then_closed(self) -> None:
        c, app = client(Disk.make("a"))
        c.abort()
        assert isinstance(app.events[-1], Aborted)
        assert app.conn.phase is Phase.CLOSED
        app.conn.receive_data(b"trailing junk is ignored")
        assert app.conn.next_event() is None

    def test_abort_with_data_still_acked(self) -> None:
        c, app = client(Disk.make("a"))
        c.option(Option.ABORT, b"xyz")
        assert app.conn.phase is Phase.CLOSED


class TestUnknownOptions:
    """ "reply NBD_REP_ERR_UNSUP to unknown options and keep parsing"."""

    @pytest.mark.parametrize("opt", [0, Option.PEEK_EXPORT, 12, 0x7654321, 0xFFFFFFFF])
    def test_unsup_and_continue(self, opt: int) -> None:
        c, _ = client(Disk.make("a"))
        expect_option_error(c, ERR.ERR_UNSUP, opt, b"some data to skip")
        assert c.go("a").size == 1 << 20


class TestStructuredReply:
    """``NBD_OPT_STRUCTURED_REPLY`` (8)."""

    def test_ack(self) -> None:
        c, app = client(Disk.make("a"))
        c.structured_reply()
        assert app.conn.structured_replies

    def test_repeat_is_invalid_and_sticky(self) -> None:
        # qemu-nbd 7.2: "structured reply already negotiated" (ERR_INVALID);
        # the first negotiation stays in force.
        c, app = client(Disk.make("a"))
        c.structured_reply()
        msg = expect_option_error(c, ERR.ERR_INVALID, Option.STRUCTURED_REPLY)
        assert "already" in msg
        assert app.conn.structured_replies
        assert c.go("a").flags & TransmissionFlag.SEND_DF

    def test_data_is_invalid(self) -> None:
        c, app = client(Disk.make("a"))
        expect_option_error(c, ERR.ERR_INVALID, Option.STRUCTURED_REPLY, b"x")
        assert not app.conn.structured_replies

    def test_disabled(self) -> None:
        c, _ = client(Disk.make("a"), limits=ProtocolLimits(structured_replies=False))
        expect_option_error(c, ERR.ERR_UNSUP, Option.STRUCTURED_REPLY)
        expect_option_error(c, ERR.ERR_UNSUP, Option.EXTENDED_HEADERS)
        # the meta-context options depend on them: unknown here as well
        for opt in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            expect_option_error(c, ERR.ERR_UNSUP, opt, c.meta_payload("a", []))

    def test_after_extended_headers(self) -> None:
        c, app = client(Disk.make("a"))
        c.extended_headers()
        expect_option_error(c, ERR.ERR_INVALID, Option.STRUCTURED_REPLY)
        assert app.conn.extended_headers


class TestExtendedHeaders:
    """``NBD_OPT_EXTENDED_HEADERS`` (11)."""

    def test_ack_implies_structured(self) -> None:
        c, app = client(Disk.make("a"))
        c.extended_headers()
        assert app.conn.extended_headers and app.conn.structured_replies
        info = c.go("a")
        assert info.flags & TransmissionFlag.SEND_DF

    def test_data_is_invalid(self) -> None:
        c, _ = client(Disk.make("a"))
        expect_option_error(c, ERR.ERR_INVALID, Option.EXTENDED_HEADERS, b"\0")

    def test_repeat_is_invalid(self) -> None:
        c, app = client(Disk.make("a"))
        c.extended_headers()
        expect_option_error(c, ERR.ERR_INVALID, Option.EXTENDED_HEADERS)
        assert app.conn.extended_headers

    def test_upgrade_after_structured_replies(self) -> None:
        c, app = client(Disk.make("a"))
        c.structured_reply()
        c.extended_headers()
        assert app.conn.extended_headers
        c.go("a")
        assert c.read(0, 512) == bytes(512)

    def test_disabled(self) -> None:
        c, _ = client(Disk.make("a"), limits=ProtocolLimits(extended_headers=False))
        expect_option_error(c, ERR.ERR_UNSUP, Option.EXTENDED_HEADERS)
        c.structured_reply()  # falls back as qemu does


class TestMetaContexts:
    """``NBD_OPT_LIST_META_CONTEXT`` (9) / ``NBD_OPT_SET_META_CONTEXT`` (10)."""

    BOTH = ["base:allocation", "qemu:allocation-depth"]

    def test_set_needs_structured_replies(self) -> None:
        c, _ = client(Disk.make("a"))
        msg = expect_option_error(
            c, ERR.ERR_INVALID, Option.SET_META_CONTEXT, c.meta_payload("a", self.BOTH)
        )
        assert "STRUCTURED_REPLY" in msg

    def test_list_is_answered_without_structured_replies(self) -> None:
        # LIST only "SHOULD NOT" come before SR and a server "MAY" refuse;
        # qemu-nbd 7.2 answers it, and so do we.  Nothing gets selected.
        c, app = client(Disk.make("a"))
        assert c.list_meta_context("a", []) == self.BOTH
        assert app.conn.meta_contexts == ()
        c.go("a")
        assert c.request(Command.BLOCK_STATUS, 0, 512).error == Errno.EINVAL

    @pytest.mark.parametrize(
        ("queries", "listed"),
        [
            ([], BOTH),  # "0 queries MUST list all"
            (["base:"], ["base:allocation"]),  # "base:" is a wildcard in LIST
            (["qemu:"], ["qemu:allocation-depth"]),
            (["base:allocation"], ["base:allocation"]),
            (["x-other:thing", "nonamespace", "base:nope"], []),  # ignored
            (["qemu:allocation-depth", "base:allocation", "base:"], BOTH[::-1]),
        ],
    )
    def test_list(self, queries: list[str], listed: list[str]) -> None:
        c, _ = client(Disk.make("a"))
        c.structured_reply()
        assert c.list_meta_context("a", queries) == listed

    def test_set_selects_with_ids(self) -> None:
        c, app = client(Disk.make("a"))
        c.structured_reply()
        got = c.set_meta_context("a", [*self.BOTH, "base:", "unknown:x", "base:allocation"])
        assert sorted(got.values()) == sorted(self.BOTH)
        assert len(set(got)) == 2
        c.go("a")
        assert [m.name for m in app.conn.meta_contexts] == self.BOTH

    def test_set_with_namespace_only_selects_nothing(self) -> None:
        # "base:" MUST be ignored in SET
        c, _ = client(Disk.make("a"))
        c.structured_reply()
        assert c.set_meta_context("a", ["base:", "qemu:"]) == {}

    def test_unknown_export(self) -> None:
        c, _ = client(Disk.make("a"))
        c.structured_reply()
        expect_option_error(c, ERR.ERR_UNKNOWN, Option.LIST_META_CONTEXT, c.meta_payload("zz", []))

    def test_failed_set_still_replaces(self) -> None:
        c, app = client(Disk.make("a"))
        c.structured_reply()
        c.set_meta_context("a", self.BOTH)
        expect_option_error(c, ERR.ERR_UNKNOWN, Option.SET_META_CONTEXT, c.meta_payload("zz", []))
        c.go("a")
        assert app.conn.meta_contexts == ()

    def test_contexts_for_another_export_are_dropped(self) -> None:
        c, app = client(Disk.make("a"), Disk.make("b"))
        c.structured_reply()
        c.set_meta_context("a", self.BOTH)
        c.go("b")
        assert app.conn.meta_contexts == ()
        with pytest.raises(NbdError) as ei:
            c.block_status(0, 4096)
        assert ei.value.errno == Errno.EINVAL

    def test_export_without_extents_offers_none(self) -> None:
        c, _ = client(Disk.make("a", extents=False))
        c.structured_reply()
        assert c.list_meta_context("a", []) == []

    @pytest.mark.parametrize(
        "data",
        [
            struct.pack(">I", 1) + b"a",  # no query count
            struct.pack(">I", 1) + b"a" + struct.pack(">I", 1000),  # absurd count
            struct.pack(">I", 1) + b"a" + struct.pack(">II", 1, 9) + b"x",  # short query
            struct.pack(">I", 1) + b"a" + struct.pack(">II", 1, 1) + b"\xff",  # not UTF-8
        ],
    )
    def test_malformed(self, data: bytes) -> None:
        c, _ = client(Disk.make("a"))
        c.structured_reply()
        expect_option_error(c, ERR.ERR_INVALID, Option.LIST_META_CONTEXT, data)
        assert c.list_meta_context("a", ["base:"]) == ["base:allocation"]


class TestStartTLS:
    """``NBD_OPT_STARTTLS`` (5) and the three server modes ("TLS support")."""

    def test_notls_mode_refuses_with_policy(self) -> None:
        c, _ = client(Disk.make("a"))
        expect_option_error(c, ERR.ERR_POLICY, Option.STARTTLS)
        assert c.go("a").size == 1 << 20

    def test_forcedtls_refuses_other_options(self) -> None:
        c, _ = client(Disk.make("a"), tls="required")
        for opt in (Option.LIST, Option.GO, Option.STRUCTURED_REPLY, 99):
            expect_option_error(c, ERR.ERR_TLS_REQD, opt)
        c.abort()  # ABORT is still honoured

    def test_forcedtls_export_name_terminates(self) -> None:
        c, app = client(Disk.make("a"), tls=TlsMode.REQUIRED)
        c.send_raw(pack_option(Option.EXPORT_NAME, b"a"))
        assert isinstance(app.events[-1], Terminated)

    def test_forcedtls_needs_fixed_newstyle(self) -> None:
        c, _app = memory_client(Disk.make("a"), tls="required")
        with pytest.raises(RemoteProtocolError, match="FIXED_NEWSTYLE"):
            c.handshake(client_flags=0)

    def test_upgrade_resets_negotiated_state(self) -> None:
        # "MUST NOT preserve negotiated state (SR, meta contexts) across it"
        c, app = client(Disk.make("a"), tls="required")
        app.conn._structured = True  # as if negotiated before (white-box)
        c.option(Option.STARTTLS)
        assert any(isinstance(e, StartTLS) for e in app.events)
        assert app.conn.tls_active and not app.conn.structured_replies
        expect_option_error(c, ERR.ERR_INVALID, Option.STARTTLS)  # second STARTTLS
        c.structured_reply()
        assert c.go("a").size == 1 << 20

    def test_non_fixed_client_gets_notls(self) -> None:
        # "The server MUST operate in NOTLS mode unless ... the client
        # replied with NBD_FLAG_C_FIXED_NEWSTYLE": STARTTLS is refused, and
        # an application's ERR_TLS_REQD (forbidden in NOTLS) becomes
        # ERR_POLICY.
        c, app = memory_client(Disk.make("a"), tls="optional")
        c.handshake(client_flags=0)
        msg = expect_option_error(c, ERR.ERR_POLICY, Option.STARTTLS)
        assert "FIXED_NEWSTYLE" in msg
        assert app.conn.phase is Phase.OPTIONS and not app.conn.tls_active

        def refuse(app: MemoryApp, ev: object) -> bool:
            if isinstance(ev, ExportRequested):
                app.conn.reject(ev, ERR.ERR_TLS_REQD, "export 'a' needs TLS")
                return True
            return False

        app.override = refuse
        msg = expect_option_error(c, ERR.ERR_POLICY, Option.GO, c.info_payload("a", []))
        assert "needs TLS" in msg

    def test_optional_mode(self) -> None:
        c, app = client(Disk.make("a"), tls="optional")
        assert c.list_exports() == [("a", "")]  # no TLS needed
        c.option(Option.STARTTLS)
        assert app.conn.tls_active

    def test_handshake_waits_for_tls_established(self) -> None:
        conn = ServerConnection(tls="optional")
        conn.receive_data(struct.pack(">I", 3) + pack_option(Option.STARTTLS))
        assert isinstance(conn.next_event(), StartTLS)
        assert conn.phase is Phase.TLS_HANDSHAKE
        assert conn.next_event() is None
        with pytest.raises(LocalProtocolError, match="TLS"):
            conn.receive_data(b"\x16\x03\x01")  # a ClientHello is not for the core
        conn.tls_established()
        conn.receive_data(pack_option(Option.ABORT))
        assert isinstance(conn.next_event(), Aborted)

    def test_pipelined_bytes_after_starttls(self) -> None:
        conn = ServerConnection(tls="optional")
        conn.receive_data(struct.pack(">I", 3) + pack_option(Option.STARTTLS) + b"\x16\x03")
        with pytest.raises(RemoteProtocolError, match="STARTTLS"):
            conn.next_event()

    def test_starttls_with_data_is_invalid(self) -> None:
        c, _ = client(Disk.make("a"), tls="optional")
        expect_option_error(c, ERR.ERR_INVALID, Option.STARTTLS, b"x")

    def test_tls_reqd_is_forbidden_after_tls(self) -> None:
        c, app = client(Disk.make("a"), tls="optional")
        c.option(Option.STARTTLS)

        def refuse(app: MemoryApp, ev: object) -> bool:
            if isinstance(ev, ExportRequested):
                with pytest.raises(LocalProtocolError):
                    app.conn.reject(ev, ERR.ERR_TLS_REQD)
                app.conn.reject(ev, ERR.ERR_POLICY, "no")
                return True
            return False

        app.override = refuse
        expect_option_error(c, ERR.ERR_POLICY, Option.GO, c.info_payload("a", []))


class TestLimits:
    """Bounded option count and length; bad magic; floods."""

    def test_option_count(self) -> None:
        c, _ = client(Disk.make("a"), limits=ProtocolLimits(max_options=3))
        for _ in range(3):
            expect_option_error(c, ERR.ERR_UNSUP, 99)
        with pytest.raises(RemoteProtocolError, match="too many options"):
            c.send_raw(pack_option(99))

    def test_oversized_options_are_skipped_and_answered(self) -> None:
        # Like qemu-nbd, an option longer than we buffer is read and
        # answered, not a reason to hang up: ERR_UNSUP for an unknown one
        # (proto.md's baseline), ERR_TOO_BIG for one we know, ERR_INVALID
        # for one that takes no data at all.
        c, app = client(Disk.make("a"), limits=ProtocolLimits(max_option_length=100))
        expect_option_error(c, ERR.ERR_UNSUP, 99, b"x" * 100)
        expect_option_error(c, ERR.ERR_UNSUP, 99, b"x" * 5000)
        msg = expect_option_error(c, ERR.ERR_TOO_BIG, Option.INFO, b"y" * 101)
        assert "101" in msg
        expect_option_error(c, ERR.ERR_INVALID, Option.LIST, b"y" * 101)  # takes no data
        assert app.conn._reader.buffered == 0  # skipped, never buffered
        assert c.go("a").size == 1 << 20

    def test_oversized_option_arriving_in_one_read(self) -> None:
        # Header and 300 KiB of data in a single receive: the loose cap lets
        # it in, the parser skips it, the tight flood check then sees nothing.
        conn = ServerConnection(limits=ProtocolLimits(max_option_length=16))
        conn.receive_data(struct.pack(">I", 3) + pack_option(77, bytes(300 * 1024)))
        assert conn.next_event() is None
        out = b"".join(bytes(b) for b in conn.data_to_send())
        _magic, option, reply, _len = struct.unpack_from(">QIII", out, 18)  # after the greeting
        assert (option, reply) == (77, ERR.ERR_UNSUP)
        conn.receive_data(pack_option(Option.ABORT))
        assert isinstance(conn.next_event(), Aborted)

    def test_oversized_export_name_hangs_up(self) -> None:
        c, _ = client(Disk.make("a"), limits=ProtocolLimits(max_option_length=100))
        with pytest.raises(RemoteProtocolError, match="101"):
            c.send_raw(struct.pack(">QII", 0x49484156454F5054, Option.EXPORT_NAME, 101))

    def test_oversized_abort_is_acknowledged(self) -> None:
        c, app = client(Disk.make("a"), limits=ProtocolLimits(max_option_length=100))
        c.send_raw(struct.pack(">QII", 0x49484156454F5054, Option.ABORT, 1 << 30))
        assert c.recv_option_reply().type == ERR.ACK
        assert isinstance(app.events[-1], Aborted)

    def test_bad_option_magic(self) -> None:
        c, _ = client(Disk.make("a"))
        with pytest.raises(RemoteProtocolError, match="magic"):
            c.send_raw(b"IHAVEOPX" + bytes(8))

    def test_flood_during_handshake(self) -> None:
        # While an option awaits the application's answer the client MUST
        # wait; 200 KiB more is a flood, caught once the parser has run.
        conn = ServerConnection(limits=ProtocolLimits(max_option_length=16))
        conn.receive_data(struct.pack(">I", 3) + pack_option(Option.LIST))
        assert conn.next_event() is not None  # ExportListRequested, pending
        conn.receive_data(bytes(200 * 1024))
        with pytest.raises(RemoteProtocolError, match="without waiting"):
            conn.next_event()

    def test_flood_cap_on_receive(self) -> None:
        # An adapter that feeds without parsing is still bounded.
        conn = ServerConnection(limits=ProtocolLimits(max_option_length=16))
        conn.receive_data(struct.pack(">I", 3))
        with pytest.raises(RemoteProtocolError, match="without waiting"):
            conn.receive_data(bytes(2 * 1024 * 1024))

    def test_truncated_option(self) -> None:
        conn = ServerConnection()
        conn.receive_data(struct.pack(">I", 3) + pack_option(Option.GO, b"abcdef")[:-2])
        assert conn.next_event() is None
        conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="NBD_OPT_GO data"):
            conn.next_event()


class TestShutdown:
    """ "SHOULD error further options ... with NBD_REP_ERR_SHUTDOWN"."""

    def test_options_get_shutdown(self) -> None:
        c, app = client(Disk.make("a"))
        app.conn.shutdown()
        assert app.conn.shutting_down
        for opt in (Option.GO, Option.LIST, 77):
            expect_option_error(c, ERR.ERR_SHUTDOWN, opt, c.info_payload("a", []))
        c.abort()

    def test_export_name_terminates(self) -> None:
        c, app = client(Disk.make("a"))
        app.conn.shutdown()
        c.send_raw(pack_option(Option.EXPORT_NAME, b"a"))
        assert isinstance(app.events[-1], Terminated)

    def test_requests_get_eshutdown(self) -> None:
        c, app = client(Disk.make("a"))
        c.go("a")
        app.conn.shutdown()
        with pytest.raises(NbdError) as ei:
            c.read(0, 512)
        assert ei.value.errno == Errno.ESHUTDOWN
        with pytest.raises(NbdError):
            c.write(0, b"x" * 512)  # payload drained, stream in sync
        c.disconnect()
        assert app.conn.phase is Phase.CLOSED


class TestApiMisuse:
    """LocalProtocolError for answers that do not fit."""

    def setup_conn(self) -> tuple[ServerConnection, ExportRequested]:
        conn = ServerConnection()
        conn.receive_data(
            struct.pack(">I", 3) + pack_option(Option.INFO, NbdClient.info_payload("a", []))
        )
        ev = conn.next_event()
        assert isinstance(ev, ExportRequested)
        return conn, ev

    def test_answer_twice(self) -> None:
        conn, ev = self.setup_conn()
        info = ExportInfo("a", 512, Capabilities(read_only=True))
        conn.accept_export(ev, info)
        with pytest.raises(LocalProtocolError, match="not the pending"):
            conn.accept_export(ev, info)

    def test_reject_with_a_success_code(self) -> None:
        conn, ev = self.setup_conn()
        with pytest.raises(LocalProtocolError):
            conn.reject(ev, ERR.ACK)

    def test_wrong_answer_type(self) -> None:
        conn, ev = self.setup_conn()
        with pytest.raises(LocalProtocolError):
            conn.list_exports(ev, [])  # type: ignore[arg-type]

    def test_tls_reqd_is_forbidden_without_tls(self) -> None:
        # NOTLS mode: "The server MUST NOT respond to any option request with
        # NBD_REP_ERR_TLS_REQD"
        conn, ev = self.setup_conn()
        with pytest.raises(LocalProtocolError, match="TLS"):
            conn.reject(ev, ERR.ERR_TLS_REQD)
        conn.reject(ev, ERR.ERR_POLICY, "still answerable")

    def test_tls_established_out_of_phase(self) -> None:
        with pytest.raises(LocalProtocolError):
            ServerConnection().tls_established()

    def test_reply_to_unknown_cookie(self) -> None:
        c, app = client(Disk.make("a"))
        c.go("a")
        with pytest.raises(LocalProtocolError, match="cookie"):
            app.conn.reply_ok(12345)
        c.send_raw(pack_request(0, Command.READ, 5, 0, 1))  # answered by the app
        assert app.conn.in_flight == 0

"""Wire layouts and constants against the text of ``doc/proto.md``.

Golden bytes are written from the spec's message descriptions ("S: 64 bits,
0x4e42444d41474943 (ASCII 'NBDMAGIC')" ...), field by field.
"""

from __future__ import annotations

import errno

from hypothesis import given
from hypothesis import strategies as st

from nbdqcow.nbd import constants as c
from nbdqcow.nbd import wire as w
from nbdqcow.nbd.constants import (
    Command,
    CommandFlag,
    Errno,
    InfoType,
    Option,
    OptionReply,
    ReplyType,
    TransmissionFlag,
    to_nbd_errno,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


class TestMagic:
    """proto.md "Newstyle negotiation", "Request message", replies."""

    def test_ascii_magics(self) -> None:
        assert c.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
        assert c.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"

    def test_numeric_magics(self) -> None:
        assert c.OPTION_REPLY_MAGIC == 0x3E889045565A9
        assert c.REQUEST_MAGIC == 0x25609513
        assert c.SIMPLE_REPLY_MAGIC == 0x67446698
        assert c.STRUCTURED_REPLY_MAGIC == 0x668E33EF
        assert c.EXTENDED_REQUEST_MAGIC == 0x21E41C71
        assert c.EXTENDED_REPLY_MAGIC == 0x6E8A278C


class TestValues:
    """proto.md "Values": the numbers the enums stand for."""

    def test_options(self) -> None:
        assert [int(o) for o in Option] == list(range(1, 12))
        assert Option.GO == 7 and Option.EXTENDED_HEADERS == 11

    def test_option_replies(self) -> None:
        assert OptionReply.ACK == 1 and OptionReply.META_CONTEXT == 4
        assert OptionReply.ERR_UNSUP == 2**31 + 1
        assert OptionReply.ERR_BLOCK_SIZE_REQD == 2**31 + 8
        assert OptionReply.ERR_EXT_HEADER_REQD == 2**31 + 10
        assert OptionReply.ERR_POLICY.is_error and not OptionReply.SERVER.is_error

    def test_transmission_flags_bits(self) -> None:
        expect = {
            "HAS_FLAGS": 0,
            "READ_ONLY": 1,
            "SEND_FLUSH": 2,
            "SEND_FUA": 3,
            "ROTATIONAL": 4,
            "SEND_TRIM": 5,
            "SEND_WRITE_ZEROES": 6,
            "SEND_DF": 7,
            "CAN_MULTI_CONN": 8,
            "SEND_RESIZE": 9,
            "SEND_CACHE": 10,
            "SEND_FAST_ZERO": 11,
            "BLOCK_STATUS_PAYLOAD": 12,
        }
        for name, bit in expect.items():
            assert TransmissionFlag[name] == 1 << bit

    def test_commands_and_flags(self) -> None:
        assert [int(x) for x in Command] == list(range(9))
        assert CommandFlag.FUA == 1 and CommandFlag.NO_HOLE == 2 and CommandFlag.DF == 4
        assert CommandFlag.REQ_ONE == 8 and CommandFlag.FAST_ZERO == 16
        assert CommandFlag.PAYLOAD_LEN == 32

    def test_reply_types_and_info(self) -> None:
        assert ReplyType.OFFSET_DATA == 1 and ReplyType.OFFSET_HOLE == 2
        assert ReplyType.BLOCK_STATUS == 5 and ReplyType.BLOCK_STATUS_EXT == 6
        assert ReplyType.ERROR == 2**15 + 1 and ReplyType.ERROR_OFFSET == 2**15 + 2
        assert [int(i) for i in InfoType] == [0, 1, 2, 3]

    def test_errnos(self) -> None:
        assert {e.name: e.value for e in Errno} == {
            "EPERM": 1,
            "EIO": 5,
            "ENOMEM": 12,
            "EINVAL": 22,
            "ENOSPC": 28,
            "EOVERFLOW": 75,
            "ENOTSUP": 95,
            "ESHUTDOWN": 108,
        }

    def test_host_errno_mapping(self) -> None:
        # "a server SHOULD map EDQUOT and EFBIG to ENOSPC"
        assert to_nbd_errno(errno.EDQUOT) is Errno.ENOSPC
        assert to_nbd_errno(errno.EFBIG) is Errno.ENOSPC
        assert to_nbd_errno(errno.EROFS) is Errno.EPERM
        assert to_nbd_errno(errno.EOPNOTSUPP) is Errno.ENOTSUP
        assert to_nbd_errno(errno.ENOENT) is Errno.EIO
        assert to_nbd_errno(None) is Errno.EIO


class TestGoldenBytes:
    def test_greeting(self) -> None:
        # S: NBDMAGIC, IHAVEOPT, 16 bits handshake flags (FIXED_NEWSTYLE|NO_ZEROES)
        assert w.pack_greeting(3) == b"NBDMAGICIHAVEOPT\x00\x03"

    def test_option(self) -> None:
        # C: IHAVEOPT, 32 bits option, 32 bits length, data
        assert w.pack_option(Option.EXPORT_NAME, b"disk") == (
            b"IHAVEOPT\x00\x00\x00\x01\x00\x00\x00\x04disk"
        )

    def test_option_reply(self) -> None:
        # S: 64 bits 0x3e889045565a9, option, reply type, length
        got = w.pack_option_reply(Option.LIST, OptionReply.ERR_POLICY, b"no")
        assert got == bytes.fromhex("0003e889045565a9000000038000000200000002") + b"no"

    def test_request(self) -> None:
        got = w.pack_request(CommandFlag.FUA, Command.WRITE, 0x0102030405060708, 4096, 512)
        assert got == bytes.fromhex("25609513000100010102030405060708000000000000100000000200")
        assert len(got) == 28

    def test_extended_request(self) -> None:
        got = w.pack_extended_request(0, Command.READ, 1, 2, 1 << 33)
        assert got == bytes.fromhex(
            "21e41c7100000000000000000000000100000000000000020000000200000000"
        )

    def test_simple_reply(self) -> None:
        assert w.pack_simple_reply(Errno.EINVAL, 9) == bytes.fromhex(
            "67446698000000160000000000000009"
        )

    def test_structured_chunk(self) -> None:
        assert w.pack_structured_reply(1, ReplyType.NONE, 9, 0) == bytes.fromhex(
            "668e33ef00010000000000000000000900000000"
        )

    def test_extended_chunk(self) -> None:
        assert w.pack_extended_reply(1, ReplyType.OFFSET_HOLE, 9, 512, 12) == bytes.fromhex(
            "6e8a278c0001000200000000000000090000000000000200000000000000000c"
        )

    def test_payload_layouts(self) -> None:
        assert w.INFO_EXPORT.size == 12  # type16 size64 flags16
        assert w.INFO_BLOCK_SIZE.size == 14
        assert w.OFFSET_HOLE.size == 12  # "length MUST be exactly 12"
        assert w.pack_error_payload(Errno.EIO, b"bad") == bytes.fromhex("000000050003") + b"bad"
        assert w.pack_block_status(1, [(512, 3)], extended=False) == bytes.fromhex(
            "000000010000020000000003"
        )
        assert w.pack_block_status(1, [(512, 3)], extended=True) == bytes.fromhex(
            "000000010000000100000000000002000000000000000003"
        )


class TestRoundTrip:
    @given(u16, u16, u64, u64, u32)
    def test_request(self, flags: int, type_: int, cookie: int, off: int, n: int) -> None:
        h = w.unpack_request(w.pack_request(flags, type_, cookie, off, n), extended=False)
        assert (h.magic, h.flags, h.type, h.cookie, h.offset, h.length) == (
            c.REQUEST_MAGIC,
            flags,
            type_,
            cookie,
            off,
            n,
        )

    @given(u16, u16, u64, u64, u64)
    def test_extended_request(self, flags: int, type_: int, cookie: int, off: int, n: int) -> None:
        h = w.unpack_request(w.pack_extended_request(flags, type_, cookie, off, n), extended=True)
        assert (h.magic, h.length, h.offset) == (c.EXTENDED_REQUEST_MAGIC, n, off)

    @given(u16, u16, u64, u64, u64)
    def test_reply_headers(self, flags: int, type_: int, cookie: int, off: int, n: int) -> None:
        r = w.unpack_reply_header(w.pack_extended_reply(flags, type_, cookie, off, n))
        assert (r.kind, r.flags, r.type, r.cookie, r.offset, r.length) == (
            "extended",
            flags,
            type_,
            cookie,
            off,
            n,
        )
        s = w.unpack_reply_header(w.pack_structured_reply(flags, type_, cookie, n & 0xFFFFFFFF))
        assert (s.kind, s.cookie, s.length) == ("structured", cookie, n & 0xFFFFFFFF)
        p = w.unpack_reply_header(w.pack_simple_reply(n & 0xFFFFFFFF, cookie))
        assert (p.kind, p.error, p.cookie) == ("simple", n & 0xFFFFFFFF, cookie)

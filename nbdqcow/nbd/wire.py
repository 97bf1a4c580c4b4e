"""NBD wire structures: ``struct.Struct`` layouts with the spec's field list
beside each, and pack/unpack helpers (``doc/proto.md`` "Handshake",
"Request message", "Simple reply message", "Structured reply chunk message",
"Option reply types", "Structured reply types"; extended headers from the
``extension-ext-header`` branch).

Both sides are here: the server core packs replies and unpacks requests, and
the test client (``tests/nbdclient.py``) does the reverse.  Everything is
big-endian ("network byte order").  Unpackers take any buffer and never
check magic numbers: deciding what a wrong magic means is the caller's job.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from nbdqcow.backends.base import Buffer
from nbdqcow.nbd.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    InfoType,
    ReplyType,
)

__all__ = [
    "BLOCK_STATUS_DESC",
    "BLOCK_STATUS_EXT_DESC",
    "BLOCK_STATUS_EXT_HEAD",
    "BLOCK_STATUS_HEAD",
    "CLIENT_FLAGS",
    "ERROR_HEAD",
    "EXPORT_NAME_REPLY",
    "EXTENDED_DATA_HEAD",
    "EXTENDED_REPLY",
    "EXTENDED_REQUEST",
    "GREETING",
    "INFO_BLOCK_SIZE",
    "INFO_EXPORT",
    "OFFSET_DATA_HEAD",
    "OFFSET_HOLE",
    "OPTION_HEADER",
    "OPTION_REPLY_HEADER",
    "REPLY_SIZES",
    "REQUEST",
    "SIMPLE_REPLY",
    "STRUCTURED_DATA_HEAD",
    "STRUCTURED_REPLY",
    "ZEROES_124",
    "ReplyHeader",
    "RequestHeader",
    "pack_block_status",
    "pack_error_payload",
    "pack_extended_reply",
    "pack_extended_request",
    "pack_greeting",
    "pack_info_export",
    "pack_option",
    "pack_option_reply",
    "pack_request",
    "pack_simple_reply",
    "pack_structured_reply",
    "unpack_reply_header",
    "unpack_request",
]

# S: 64 bits NBDMAGIC, 64 bits IHAVEOPT, 16 bits handshake flags
GREETING = struct.Struct(">QQH")
# C: 32 bits client flags
CLIENT_FLAGS = struct.Struct(">I")
# C: 64 bits IHAVEOPT, 32 bits option, 32 bits length of option data
OPTION_HEADER = struct.Struct(">QII")
# S: 64 bits 0x3e889045565a9, 32 bits option, 32 bits reply type, 32 bits length
OPTION_REPLY_HEADER = struct.Struct(">QIII")
# S (EXPORT_NAME accepted): 64 bits export size, 16 bits transmission flags
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: The reserved zeroes after the EXPORT_NAME reply unless NO_ZEROES.
ZEROES_124 = bytes(124)
# NBD_REP_INFO payload for NBD_INFO_EXPORT: 16 bits type, 64 bits size, 16 bits flags
INFO_EXPORT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE: 16 bits type, 32 bits minimum, preferred, maximum
INFO_BLOCK_SIZE = struct.Struct(">HIII")

# C: 32 bits 0x25609513, 16 bits flags, 16 bits type, 64 bits cookie,
#    64 bits offset, 32 bits length                        ("Request message")
REQUEST = struct.Struct(">IHHQQI")
# C: 32 bits 0x21e41c71, 16 bits flags, 16 bits type, 64 bits cookie,
#    64 bits offset, 64 bits length                ("Extended request header")
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
# S: 32 bits 0x67446698, 32 bits error, 64 bits cookie  ("Simple reply message")
SIMPLE_REPLY = struct.Struct(">IIQ")
# S: 32 bits 0x668e33ef, 16 bits flags, 16 bits type, 64 bits cookie,
#    32 bits length of payload                   ("Structured reply chunk")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# S: 32 bits 0x6e8a278c, 16 bits flags, 16 bits type, 64 bits cookie,
#    64 bits offset (the request's), 64 bits length of payload ("Extended reply")
EXTENDED_REPLY = struct.Struct(">IHHQQQ")

# A structured OFFSET_DATA chunk header and the 64-bit offset that starts its
# payload, packed in one call (the read hot path)
STRUCTURED_DATA_HEAD = struct.Struct(">IHHQIQ")
# The same with an extended reply header
EXTENDED_DATA_HEAD = struct.Struct(">IHHQQQQ")

# OFFSET_DATA payload starts with 64 bits offset, then the data
OFFSET_DATA_HEAD = struct.Struct(">Q")
# OFFSET_HOLE payload: 64 bits offset, 32 bits hole size
OFFSET_HOLE = struct.Struct(">QI")
# Error chunk payload: 32 bits error, 16 bits message length, message
ERROR_HEAD = struct.Struct(">IH")
# BLOCK_STATUS: 32 bits context id, then {32 bits length, 32 bits flags}*
BLOCK_STATUS_HEAD = struct.Struct(">I")
BLOCK_STATUS_DESC = struct.Struct(">II")
# BLOCK_STATUS_EXT: 32 bits context id, 32 bits descriptor count,
#                   then {64 bits length, 64 bits flags}*
BLOCK_STATUS_EXT_HEAD = struct.Struct(">II")
BLOCK_STATUS_EXT_DESC = struct.Struct(">QQ")


def pack_greeting(flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def pack_option(option: int, data: bytes = b"") -> bytes:
    """An option as a client sends it (header and data)."""
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def pack_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """An option reply with its (small) payload."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def pack_info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(InfoType.EXPORT, size, flags)


def pack_request(flags: int, type_: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, type_, cookie, offset, length)


def pack_extended_request(flags: int, type_: int, cookie: int, offset: int, length: int) -> bytes:
    return EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, type_, cookie, offset, length)


def pack_simple_reply(error: int, cookie: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def pack_structured_reply(flags: int, type_: int, cookie: int, length: int) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length)


def pack_extended_reply(flags: int, type_: int, cookie: int, offset: int, length: int) -> bytes:
    return EXTENDED_REPLY.pack(EXTENDED_REPLY_MAGIC, flags, type_, cookie, offset, length)


def pack_error_payload(error: int, message: bytes) -> bytes:
    """The payload of an ``NBD_REPLY_TYPE_ERROR`` chunk."""
    return ERROR_HEAD.pack(error, len(message)) + message


def pack_block_status(
    context_id: int, descriptors: Sequence[tuple[int, int]], extended: bool
) -> bytes:
    """The payload of a BLOCK_STATUS (or BLOCK_STATUS_EXT) chunk."""
    if extended:
        parts = [BLOCK_STATUS_EXT_HEAD.pack(context_id, len(descriptors))]
        parts += [BLOCK_STATUS_EXT_DESC.pack(n, f) for n, f in descriptors]
    else:
        parts = [BLOCK_STATUS_HEAD.pack(context_id)]
        parts += [BLOCK_STATUS_DESC.pack(n, f) for n, f in descriptors]
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class RequestHeader:
    """A transmission request header, compact or extended."""

    magic: int
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def unpack_request(buf: Buffer, extended: bool) -> RequestHeader:
    """Parse a 28-byte (compact) or 32-byte (extended) request header."""
    s = EXTENDED_REQUEST if extended else REQUEST
    return RequestHeader(*s.unpack(buf))


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    """A reply header as the client sees it.

    ``kind`` is ``"simple"``, ``"structured"`` or ``"extended"``; for a
    simple reply ``error`` is set and ``type``/``flags``/``length`` are 0.
    """

    kind: str
    cookie: int
    error: int = 0
    flags: int = 0
    type: int = ReplyType.NONE
    offset: int = 0
    length: int = 0


def unpack_reply_header(buf: Buffer) -> ReplyHeader:
    """Parse a reply header whose magic decides its size (client side).

    ``buf`` must hold at least :data:`SIMPLE_REPLY` ``.size`` bytes for a
    simple reply, 20 for a structured one and 32 for an extended one.

    Raises:
        ValueError: unknown magic.
    """
    (magic,) = struct.unpack_from(">I", buf)
    if magic == SIMPLE_REPLY_MAGIC:
        _, error, cookie = SIMPLE_REPLY.unpack_from(buf)
        return ReplyHeader("simple", cookie, error=error)
    if magic == STRUCTURED_REPLY_MAGIC:
        _, flags, type_, cookie, length = STRUCTURED_REPLY.unpack_from(buf)
        return ReplyHeader("structured", cookie, flags=flags, type=type_, length=length)
    if magic == EXTENDED_REPLY_MAGIC:
        _, flags, type_, cookie, offset, length = EXTENDED_REPLY.unpack_from(buf)
        return ReplyHeader(
            "extended", cookie, flags=flags, type=type_, offset=offset, length=length
        )
    raise ValueError(f"unknown reply magic {magic:#x}")


#: Reply header sizes by magic, for a client that reads the magic first.
REPLY_SIZES = {
    SIMPLE_REPLY_MAGIC: SIMPLE_REPLY.size,
    STRUCTURED_REPLY_MAGIC: STRUCTURED_REPLY.size,
    EXTENDED_REPLY_MAGIC: EXTENDED_REPLY.size,
}

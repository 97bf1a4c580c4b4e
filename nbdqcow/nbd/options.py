"""Option payloads of the fixed-newstyle handshake: parsing what the client
sends and building the informational replies (proto.md "Option types",
``NBD_OPT_INFO``/``NBD_OPT_GO``, ``NBD_REP_INFO``, ``NBD_REP_SERVER``,
``NBD_REP_META_CONTEXT``).

Parsers raise :class:`OptionInvalid`, which the connection turns into an
``NBD_REP_ERR_INVALID`` reply carrying the message: a malformed option is
answered, not fatal (the option length already told us where it ends).
"""

from __future__ import annotations

import struct

from nbdqcow.nbd.answers import ExportInfo, ExportListing
from nbdqcow.nbd.constants import InfoType, Option, OptionReply
from nbdqcow.nbd.settings import MAX_STRING
from nbdqcow.nbd.wire import INFO_BLOCK_SIZE, INFO_EXPORT, pack_option_reply

__all__ = [
    "OptionInvalid",
    "block_size_reply",
    "block_sizes",
    "decode_string",
    "encode_message",
    "info_replies",
    "meta_context_reply",
    "option_name",
    "parse_info_request",
    "parse_meta_request",
    "server_reply",
]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


# Names of the known options, built once: an enum lookup and an f-string
# per option cost more than the rest of a handshake option (issue 6).
_OPTION_NAMES = {int(o): f"NBD_OPT_{o.name}" for o in Option}


def option_name(option: int) -> str:
    """``NBD_OPT_GO`` for 7, ``option 99`` for an unknown one (messages)."""
    return _OPTION_NAMES.get(option) or f"option {option}"


class OptionInvalid(Exception):
    """A syntactically invalid option; becomes ``NBD_REP_ERR_INVALID``.
    Internal to the core: never escapes :class:`ServerConnection`."""


def decode_string(raw: bytes, what: str) -> str:
    """Decode a protocol string: UTF-8, no NUL, at most 4096 bytes
    (proto.md "Conventions")."""
    if len(raw) > MAX_STRING:
        raise OptionInvalid(f"{what} is {len(raw)} bytes long; the limit is {MAX_STRING}")
    if b"\0" in raw:
        raise OptionInvalid(f"{what} contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptionInvalid(f"{what} is not valid UTF-8 (byte {e.start})") from None


def encode_message(message: str) -> bytes:
    """UTF-8 for the wire, cut at 4096 bytes on a character boundary."""
    raw = message.encode("utf-8", "replace")
    if len(raw) > MAX_STRING:
        raw = raw[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw


class _Cursor:
    """Bounds-checked reads from one option's data."""

    def __init__(self, data: bytes, option: str) -> None:
        self.data = data
        self.pos = 0
        self.option = option

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise OptionInvalid(
                f"{self.option}: {what} needs {n} bytes but only "
                f"{len(self.data) - self.pos} remain in the option"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        (v,) = _U16.unpack(self.take(2, what))
        return int(v)

    def u32(self, what: str) -> int:
        (v,) = _U32.unpack(self.take(4, what))
        return int(v)

    def string(self, what: str) -> str:
        n = self.u32(f"length of {what}")
        return decode_string(self.take(n, what), what)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise OptionInvalid(
                f"{self.option}: {len(self.data) - self.pos} unexpected bytes after the data"
            )


def parse_info_request(data: bytes, option: int | str) -> tuple[str, tuple[int, ...]]:
    """``NBD_OPT_INFO``/``GO`` data: 32-bit name length, name, 16-bit count
    of info requests, 16-bit types.  ``option`` (its number or name) is for
    error messages."""
    # A well-formed request is parsed in a few struct calls (every client
    # sends one per connection: issue 6's handshake rate); anything else
    # goes through the cursor below, which names what is wrong.
    n = len(data)
    if n >= 6:
        (name_len,) = _U32.unpack_from(data)
        end = 4 + name_len
        if name_len <= MAX_STRING and end + 2 <= n:
            (count,) = _U16.unpack_from(data, end)
            if end + 2 + 2 * count == n:
                raw = data[4:end]
                if b"\0" not in raw:
                    try:
                        name = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        pass
                    else:
                        requests: tuple[int, ...] = struct.unpack_from(f">{count}H", data, end + 2)
                        return name, requests
    if not isinstance(option, str):
        option = option_name(option)
    c = _Cursor(data, option)
    name = c.string("export name")
    count = c.u16("number of information requests")
    requests = tuple(c.u16("information request") for _ in range(count))
    c.end()
    return name, requests


def parse_meta_request(data: bytes, option: str) -> tuple[str, tuple[str, ...]]:
    """``NBD_OPT_LIST/SET_META_CONTEXT`` data: 32-bit name length, name,
    32-bit number of queries, each a 32-bit length and a string."""
    c = _Cursor(data, option)
    name = c.string("export name")
    count = c.u32("number of queries")
    # Each query takes at least its 4-byte length: reject an absurd count
    # before looping over it.
    if count * 4 > len(data) - c.pos:
        raise OptionInvalid(f"{option}: {count} queries do not fit in the option")
    queries = tuple(c.string("query") for _ in range(count))
    c.end()
    return name, queries


def info_replies(
    option: int, export: ExportInfo, requests: tuple[int, ...], flags: int
) -> list[bytes]:
    """The ``NBD_REP_INFO`` replies for an accepted INFO/GO (ACK not included).

    NAME and DESCRIPTION only when asked for (and the description is not
    empty); BLOCK_SIZE always (qemu does the same: it is the only way to tell
    a client the maximum payload); EXPORT last, always ("MUST").  Unknown
    request types are ignored ("MUST ignore").
    """
    out: list[bytes] = []
    if InfoType.NAME in requests:
        out.append(
            pack_option_reply(
                option, OptionReply.INFO, _U16.pack(InfoType.NAME) + encode_message(export.name)
            )
        )
    if InfoType.DESCRIPTION in requests and export.description:
        out.append(
            pack_option_reply(
                option,
                OptionReply.INFO,
                _U16.pack(InfoType.DESCRIPTION) + encode_message(export.description),
            )
        )
    out.append(block_size_reply(option, export))
    out.append(
        pack_option_reply(
            option, OptionReply.INFO, INFO_EXPORT.pack(InfoType.EXPORT, export.size, flags)
        )
    )
    return out


def block_sizes(export: ExportInfo) -> tuple[int, int, int]:
    """The (minimum, preferred, maximum) of ``NBD_INFO_BLOCK_SIZE``, forced
    into the shape proto.md "Block size constraints" mandates whatever the
    backend reports: preferred "MUST be a power of 2 at least as large as the
    maximum of the minimum block size and 2^9"; maximum "MUST be either an
    integer multiple of the minimum block size or the value 0xffffffff" and
    at least the preferred size.  (The minimum is a power of 2 <= 64 KiB by
    :class:`~nbdqcow.backends.base.Capabilities`' own contract.)"""
    c = export.caps
    minimum = max(1, c.min_block)
    preferred = max(c.preferred_block, minimum, 512)
    if preferred & (preferred - 1):
        preferred = 1 << preferred.bit_length()  # round up to a power of 2
    maximum = max(c.max_block, preferred)
    if maximum >= 0xFFFFFFFF:
        maximum = 0xFFFFFFFF
    else:
        maximum -= maximum % minimum
    return minimum, preferred, maximum


def block_size_reply(option: int, export: ExportInfo) -> bytes:
    """One ``NBD_REP_INFO`` with ``NBD_INFO_BLOCK_SIZE``."""
    minimum, preferred, maximum = block_sizes(export)
    return pack_option_reply(
        option,
        OptionReply.INFO,
        INFO_BLOCK_SIZE.pack(InfoType.BLOCK_SIZE, minimum, preferred, maximum),
    )


def server_reply(option: int, listing: ExportListing) -> bytes:
    """One ``NBD_REP_SERVER``: 32-bit name length, name, description."""
    name = encode_message(listing.name)
    data = _U32.pack(len(name)) + name + encode_message(listing.description)
    return pack_option_reply(option, OptionReply.SERVER, data)


def meta_context_reply(option: int, context_id: int, name: str) -> bytes:
    """One ``NBD_REP_META_CONTEXT``: 32-bit id, name."""
    return pack_option_reply(
        option, OptionReply.META_CONTEXT, _U32.pack(context_id) + name.encode("utf-8")
    )

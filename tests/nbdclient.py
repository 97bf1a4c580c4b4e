"""A small synchronous NBD client for tests, built on ``nbdqcow.nbd.wire``.

It covers what the Debian clients cannot: extended headers, ``DF``, both
meta contexts with raw descriptors, and malformed input (``send_raw``,
arbitrary flags and option payloads).  It is strict about what the server
sends: a reply that breaks proto.md raises :class:`ServerMisbehaved`.

Usage::

    with NbdClient.connect_unix(path) as c:
        c.handshake()
        c.structured_reply()
        c.set_meta_context("", ["base:allocation"])
        info = c.go("")
        data = c.read(0, 4096)

The transport is anything with ``read_exact(n)`` and ``write(data)``
(:class:`SocketStream` over a socket; the core's unit tests use an in-memory
one), so the same client drives the asyncio server and the bare protocol core.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import Protocol

from nbdqcow.nbd.constants import (
    EXTENDED_REPLY_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    HandshakeFlag,
    InfoType,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
)
from nbdqcow.nbd.wire import (
    EXPORT_NAME_REPLY,
    EXTENDED_REPLY,
    GREETING,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OPTION_REPLY_HEADER,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    pack_extended_request,
    pack_option,
    pack_request,
)

__all__ = [
    "ExportInfo",
    "NbdClient",
    "NbdError",
    "OptReply",
    "OptionError",
    "Reply",
    "ServerMisbehaved",
    "SocketStream",
    "Stream",
]


class Stream(Protocol):
    def read_exact(self, n: int) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class ServerMisbehaved(Exception):
    """The server sent something proto.md forbids."""


class OptionError(Exception):
    """An option got an error reply."""

    def __init__(self, option: int, reply: int, message: str) -> None:
        super().__init__(f"option {option}: {_rep_name(reply)}: {message}")
        self.option = option
        self.reply = reply
        self.message = message


class NbdError(Exception):
    """A transmission request failed; ``errno`` is the NBD error value."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(f"NBD error {errno}: {message}")
        self.errno = errno
        self.message = message


def _rep_name(reply: int) -> str:
    try:
        return OptionReply(reply).name
    except ValueError:
        return str(reply)


class SocketStream:
    """A blocking socket as a :class:`Stream`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError(f"server closed the connection ({got} of {n} bytes read)")
            got += k
        return bytes(buf)

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


@dataclass
class OptReply:
    """One option reply: its type and raw payload."""

    option: int
    type: int
    data: bytes


@dataclass
class ExportInfo:
    """What GO/INFO/EXPORT_NAME told us."""

    size: int = 0
    flags: int = 0
    name: str | None = None
    description: str | None = None
    block_size: tuple[int, int, int] | None = None
    unknown: list[OptReply] = field(default_factory=list)


@dataclass
class Reply:
    """A complete transmission reply.

    ``chunks`` lists ``(flags, type, payload)`` of every structured chunk;
    ``data`` is the assembled READ data (holes filled with zeroes);
    ``extents`` maps a context id to its ``(length, status)`` descriptors.
    """

    cookie: int
    error: int = 0
    message: str = ""
    data: bytes = b""
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    chunks: list[tuple[int, int, bytes]] = field(default_factory=list)
    kind: str = "simple"


@dataclass
class _Partial:
    """A structured reply still waiting for its DONE chunk."""

    reply: Reply
    buf: bytearray
    spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Sent:
    command: int
    flags: int
    offset: int
    length: int


class NbdClient:
    """A blocking NBD client over a :class:`Stream`."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.handshake_flags = 0
        self.structured = False
        self.extended = False
        self.contexts: dict[int, str] = {}
        self.export: ExportInfo | None = None
        self._cookies = itertools.count(1)
        self._sent: dict[int, _Sent] = {}
        self._partial: dict[int, _Partial] = {}

    # --- connecting -----------------------------------------------------------

    @classmethod
    def connect_unix(cls, path: str, timeout: float = 10.0) -> NbdClient:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        return cls(SocketStream(s))

    @classmethod
    def connect_tcp(cls, host: str, port: int, timeout: float = 10.0) -> NbdClient:
        s = socket.create_connection((host, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(SocketStream(s))

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- raw access -----------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.stream.write(data)

    def recv_exact(self, n: int) -> bytes:
        return self.stream.read_exact(n)

    # --- handshake --------------------------------------------------------------

    def handshake(self, client_flags: int | None = None) -> int:
        """Read the greeting and send client flags (default: fixed newstyle,
        plus NO_ZEROES when offered).  Returns the server's handshake flags."""
        magic, opt_magic, flags = GREETING.unpack(self.recv_exact(GREETING.size))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ServerMisbehaved(f"bad greeting {magic:#x} {opt_magic:#x}")
        self.handshake_flags = flags
        if client_flags is None:
            client_flags = ClientFlag.FIXED_NEWSTYLE
            if flags & HandshakeFlag.NO_ZEROES:
                client_flags |= ClientFlag.NO_ZEROES
        self.client_flags = client_flags
        self.send_raw(struct.pack(">I", client_flags))
        return int(flags)

    def recv_option_reply(self) -> OptReply:
        magic, option, type_, length = OPTION_REPLY_HEADER.unpack(
            self.recv_exact(OPTION_REPLY_HEADER.size)
        )
        if magic != OPTION_REPLY_MAGIC:
            raise ServerMisbehaved(f"bad option reply magic {magic:#x}")
        return OptReply(option, type_, self.recv_exact(length) if length else b"")

    def option(self, option: int, data: bytes = b"") -> list[OptReply]:
        """Send an option and collect replies up to the final one (ACK or an
        error).  Raises :class:`OptionError` on an error reply."""
        self.send_raw(pack_option(option, data))
        out: list[OptReply] = []
        while True:
            r = self.recv_option_reply()
            if r.option != option:
                raise ServerMisbehaved(f"reply for option {r.option} to option {option}")
            if r.type & (1 << 31):
                raise OptionError(option, r.type, r.data.decode("utf-8", "replace"))
            out.append(r)
            if r.type == OptionReply.ACK:
                if r.data:
                    raise ServerMisbehaved("ACK with a payload")
                return out

    def structured_reply(self) -> None:
        self.option(Option.STRUCTURED_REPLY)
        self.structured = True

    def extended_headers(self) -> None:
        self.option(Option.EXTENDED_HEADERS)
        self.extended = self.structured = True

    def abort(self) -> None:
        self.option(Option.ABORT)

    def list_exports(self) -> list[tuple[str, str]]:
        out = []
        for r in self.option(Option.LIST)[:-1]:
            if r.type != OptionReply.SERVER:
                raise ServerMisbehaved(f"LIST reply type {r.type}")
            (n,) = struct.unpack(">I", r.data[:4])
            out.append((r.data[4 : 4 + n].decode(), r.data[4 + n :].decode()))
        return out

    @staticmethod
    def meta_payload(name: str, queries: list[str]) -> bytes:
        raw = name.encode()
        parts = [struct.pack(">I", len(raw)), raw, struct.pack(">I", len(queries))]
        for q in queries:
            qb = q.encode()
            parts += [struct.pack(">I", len(qb)), qb]
        return b"".join(parts)

    def _meta(self, option: int, name: str, queries: list[str]) -> list[tuple[int, str]]:
        out = []
        for r in self.option(option, self.meta_payload(name, queries))[:-1]:
            if r.type != OptionReply.META_CONTEXT:
                raise ServerMisbehaved(f"meta context reply type {r.type}")
            (cid,) = struct.unpack(">I", r.data[:4])
            out.append((cid, r.data[4:].decode()))
        return out

    def list_meta_context(self, name: str, queries: list[str]) -> list[str]:
        return [n for _, n in self._meta(Option.LIST_META_CONTEXT, name, queries)]

    def set_meta_context(self, name: str, queries: list[str]) -> dict[int, str]:
        got = self._meta(Option.SET_META_CONTEXT, name, queries)
        self.contexts = dict(got)
        if len(self.contexts) != len(got):
            raise ServerMisbehaved(f"SET_META_CONTEXT ids are not unique: {got}")
        return self.contexts

    @staticmethod
    def info_payload(name: str, requests: list[int]) -> bytes:
        raw = name.encode()
        return (
            struct.pack(">I", len(raw))
            + raw
            + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests)
        )

    def _info(self, option: int, name: str, requests: list[int] | None) -> ExportInfo:
        if requests is None:
            requests = [InfoType.NAME, InfoType.DESCRIPTION, InfoType.BLOCK_SIZE]
        info = ExportInfo()
        saw_export = False
        for r in self.option(option, self.info_payload(name, requests))[:-1]:
            if r.type != OptionReply.INFO:
                info.unknown.append(r)
                continue
            (t,) = struct.unpack(">H", r.data[:2])
            if t == InfoType.EXPORT:
                _, info.size, info.flags = INFO_EXPORT.unpack(r.data)
                saw_export = True
            elif t == InfoType.NAME:
                info.name = r.data[2:].decode()
            elif t == InfoType.DESCRIPTION:
                info.description = r.data[2:].decode()
            elif t == InfoType.BLOCK_SIZE:
                _, a, b, c = INFO_BLOCK_SIZE.unpack(r.data)
                info.block_size = (a, b, c)
            else:
                info.unknown.append(r)
        if not saw_export:
            raise ServerMisbehaved("no NBD_INFO_EXPORT before ACK")
        return info

    def info(self, name: str = "", requests: list[int] | None = None) -> ExportInfo:
        return self._info(Option.INFO, name, requests)

    def go(self, name: str = "", requests: list[int] | None = None) -> ExportInfo:
        self.export = self._info(Option.GO, name, requests)
        return self.export

    def export_name(self, name: str = "") -> ExportInfo:
        """``NBD_OPT_EXPORT_NAME``: no reply header, just size and flags."""
        self.send_raw(pack_option(Option.EXPORT_NAME, name.encode()))
        size, flags = EXPORT_NAME_REPLY.unpack(self.recv_exact(EXPORT_NAME_REPLY.size))
        if not self.client_flags & ClientFlag.NO_ZEROES and self.recv_exact(124) != bytes(124):
            raise ServerMisbehaved("the 124 reserved bytes are not zero")
        self.export = ExportInfo(size=size, flags=flags)
        return self.export

    def starttls(self, context: ssl.SSLContext, server_hostname: str | None = None) -> None:
        """STARTTLS and wrap the socket (SocketStream only)."""
        self.option(Option.STARTTLS)
        assert isinstance(self.stream, SocketStream)
        self.stream.sock = context.wrap_socket(self.stream.sock, server_hostname=server_hostname)
        self.structured = self.extended = False
        self.contexts = {}

    # --- transmission -----------------------------------------------------------

    def send_request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
        cookie: int | None = None,
    ) -> int:
        """Send one request (extended header if negotiated); returns its cookie."""
        if cookie is None:
            cookie = next(self._cookies)
        pack = pack_extended_request if self.extended else pack_request
        self.send_raw(pack(flags, command, cookie, offset, length) + payload)
        self._sent[cookie] = _Sent(command, flags, offset, length)
        return cookie

    def recv_reply(self) -> Reply:
        """Read until one reply is complete (a simple reply, or a structured
        one up to its DONE chunk) and return it.  Chunks of other replies
        may be interleaved (proto.md allows it); they are kept until their
        own DONE arrives."""
        while True:
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            if magic == SIMPLE_REPLY_MAGIC:
                if self.extended:
                    raise ServerMisbehaved("simple reply with extended headers")
                _, error, cookie = SIMPLE_REPLY.unpack(b"\0" * 4 + self.recv_exact(12))
                sent = self._sent.pop(cookie, None)
                if sent is None or cookie in self._partial:
                    raise ServerMisbehaved(f"simple reply to cookie {cookie:#x} not awaiting one")
                if sent.command == Command.READ and self.structured:
                    raise ServerMisbehaved("simple reply to READ after structured replies")
                data = b""
                if sent.command == Command.READ and error == 0:
                    data = self.recv_exact(sent.length)
                return Reply(cookie, error=error, data=data)
            if magic == STRUCTURED_REPLY_MAGIC and not self.extended:
                _, flags, type_, cookie, length = STRUCTURED_REPLY.unpack(
                    b"\0" * 4 + self.recv_exact(STRUCTURED_REPLY.size - 4)
                )
            elif magic == EXTENDED_REPLY_MAGIC and self.extended:
                _, flags, type_, cookie, offset, length = EXTENDED_REPLY.unpack(
                    b"\0" * 4 + self.recv_exact(EXTENDED_REPLY.size - 4)
                )
                if cookie in self._sent and offset != self._sent[cookie].offset:
                    raise ServerMisbehaved(f"extended reply offset {offset} is not the request's")
            else:
                raise ServerMisbehaved(f"unexpected reply magic {magic:#x}")
            if not self.structured:
                raise ServerMisbehaved("structured chunk without negotiation")
            sent = self._sent.get(cookie)
            if sent is None:
                raise ServerMisbehaved(f"chunk for unknown cookie {cookie:#x}")
            part = self._partial.get(cookie)
            if part is None:
                kind = "extended" if self.extended else "structured"
                size = sent.length if sent.command == Command.READ else 0
                part = self._partial[cookie] = _Partial(Reply(cookie, kind=kind), bytearray(size))
            payload = self.recv_exact(length) if length else b""
            part.reply.chunks.append((flags, type_, payload))
            self._chunk(part, sent, type_, payload)
            if flags & ReplyFlag.DONE:
                del self._sent[cookie], self._partial[cookie]
                reply = part.reply
                if sent.command == Command.READ and not reply.error:
                    covered = sum(b - a for a, b in part.spans)
                    if covered != sent.length:
                        raise ServerMisbehaved(f"READ chunks cover {covered} of {sent.length}")
                    reply.data = bytes(part.buf)
                return reply

    def _chunk(self, part: _Partial, sent: _Sent, type_: int, payload: bytes) -> None:
        reply = part.reply
        if type_ & (1 << 15):
            error, mlen = struct.unpack(">IH", payload[:6])
            if error == 0:
                raise ServerMisbehaved("error chunk with error 0")
            reply.error = error
            reply.message = payload[6 : 6 + mlen].decode("utf-8", "replace")
            return
        if type_ == ReplyType.NONE:
            if payload:
                raise ServerMisbehaved("NONE chunk with payload")
            return
        if type_ in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE):
            if sent.command != Command.READ:
                raise ServerMisbehaved("content chunk for a non-READ")
            if type_ == ReplyType.OFFSET_DATA:
                (off,) = struct.unpack(">Q", payload[:8])
                n = len(payload) - 8
                data = payload[8:]
            else:
                if len(payload) != 12:
                    raise ServerMisbehaved(f"OFFSET_HOLE payload of {len(payload)} bytes")
                off, n = struct.unpack(">QI", payload)
                data = bytes(n)
            rel = off - sent.offset
            if n <= 0 or rel < 0 or rel + n > sent.length:
                raise ServerMisbehaved(f"content chunk {off}+{n} outside the request")
            if any(a < rel + n and rel < b for a, b in part.spans):
                raise ServerMisbehaved(f"content chunk {off}+{n} overlaps an earlier one")
            part.spans.append((rel, rel + n))
            part.buf[rel : rel + n] = data
            return
        if type_ in (ReplyType.BLOCK_STATUS, ReplyType.BLOCK_STATUS_EXT):
            if (type_ == ReplyType.BLOCK_STATUS_EXT) != self.extended:
                raise ServerMisbehaved("block status chunk type does not match the headers")
            if self.extended:
                cid, count = struct.unpack(">II", payload[:8])
                body, fmt = payload[8:], ">QQ"
                if len(body) != 16 * count:
                    raise ServerMisbehaved("BLOCK_STATUS_EXT descriptor count mismatch")
            else:
                (cid,) = struct.unpack(">I", payload[:4])
                body, fmt = payload[4:], ">II"
            descs = [tuple(x) for x in struct.iter_unpack(fmt, body)]
            if not descs or any(n == 0 for n, _ in descs):
                raise ServerMisbehaved("block status with no or empty extents")
            if cid in reply.extents:
                raise ServerMisbehaved(f"two block status chunks for context {cid}")
            # "the sum of the length fields of the first N-1 extents (if any)
            # MUST be less than the requested length"; the last may run past.
            head = sum(int(n) for n, _ in descs[:-1])
            if descs[:-1] and head >= sent.length:
                raise ServerMisbehaved(f"context {cid}: extents run on past the request")
            if sent.flags & CommandFlag.REQ_ONE and (
                len(descs) != 1 or int(descs[0][0]) > sent.length
            ):
                raise ServerMisbehaved(f"context {cid}: REQ_ONE answered with {descs}")
            reply.extents[cid] = [(int(n), int(s)) for n, s in descs]
            return
        raise ServerMisbehaved(f"unknown chunk type {type_}")

    def request(
        self, command: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> Reply:
        """Send one request and wait for its reply (nothing else in flight)."""
        self.send_request(command, offset, length, flags, payload)
        return self.recv_reply()

    @staticmethod
    def _check(reply: Reply) -> Reply:
        if reply.error:
            raise NbdError(reply.error, reply.message)
        return reply

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        return self._check(self.request(Command.READ, offset, length, flags)).data

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        if self.extended:
            flags |= CommandFlag.PAYLOAD_LEN
        self._check(self.request(Command.WRITE, offset, len(data), flags, data))

    def flush(self) -> None:
        self._check(self.request(Command.FLUSH))

    def trim(self, offset: int, length: int, flags: int = 0) -> None:
        self._check(self.request(Command.TRIM, offset, length, flags))

    def zero(self, offset: int, length: int, flags: int = 0) -> None:
        self._check(self.request(Command.WRITE_ZEROES, offset, length, flags))

    def cache(self, offset: int, length: int) -> None:
        self._check(self.request(Command.CACHE, offset, length))

    def block_status(
        self, offset: int, length: int, flags: int = 0
    ) -> dict[str, list[tuple[int, int]]]:
        """Extents per context *name*."""
        r = self._check(self.request(Command.BLOCK_STATUS, offset, length, flags))
        return {self.contexts.get(cid, str(cid)): d for cid, d in r.extents.items()}

    def disconnect(self) -> None:
        """``NBD_CMD_DISC`` (no reply)."""
        pack = pack_extended_request if self.extended else pack_request
        self.send_raw(pack(0, Command.DISC, next(self._cookies), 0, 0))

"""A deliberately small NBD client for server tests (simple replies only).

Built from proto.md directly, independent of ``nbdqcow.nbd``, so that the
server is checked against the spec rather than against its own core.  It can
also send malformed input, which no real client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO = 1, 2, 3, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR_BIT = 1 << 31
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2


@dataclass
class OptionReply:
    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & ERR_BIT)


class NbdClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer
        self.size = 0
        self.flags = 0
        self._cookie = 0

    @classmethod
    async def open(cls, path: str) -> NbdClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def greeting(self) -> int:
        magic, opt, hflags = struct.unpack(">QQH", await self.r.readexactly(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        return int(hflags)

    def send_raw(self, data: bytes) -> None:
        self.w.write(data)

    async def start(self) -> None:
        await self.greeting()
        self.send_raw(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send_raw(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    async def option_reply(self) -> OptionReply:
        magic, opt, typ, n = struct.unpack(">QIII", await self.r.readexactly(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return OptionReply(opt, typ, await self.r.readexactly(n))

    async def go(self, name: str = "disk") -> OptionReply | None:
        """NBD_OPT_GO; returns the error reply, or None on success."""
        b = name.encode()
        self.send_option(OPT_GO, struct.pack(">I", len(b)) + b + struct.pack(">H", 0))
        while True:
            rep = await self.option_reply()
            if rep.is_error:
                return rep
            if rep.type == REP_INFO and struct.unpack(">H", rep.data[:2])[0] == 0:
                self.size, self.flags = struct.unpack(">QH", rep.data[2:12])
            if rep.type == REP_ACK:
                return None

    @classmethod
    async def connect(cls, path: str, name: str = "disk") -> NbdClient:
        c = await cls.open(path)
        await c.start()
        err = await c.go(name)
        assert err is None, err
        return c

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", cookie: int | None = None) -> int:
        if cookie is None:
            self._cookie += 1
            cookie = self._cookie
        self.send_raw(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)
                      + payload)
        return cookie

    async def reply(self, read_len: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data): ``read_len`` bytes follow a successful read."""
        magic, err, cookie = struct.unpack(">IIQ", await self.r.readexactly(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        data = await self.r.readexactly(read_len) if read_len and not err else b""
        return int(cookie), int(err), data

    async def pread(self, offset: int, length: int) -> bytes:
        cookie = self.request(CMD_READ, offset, length)
        got, err, data = await self.reply(length)
        assert (got, err) == (cookie, 0), (got, err)
        return data

    async def pwrite(self, offset: int, data: bytes, flags: int = 0) -> int:
        """Returns the error code (0 on success)."""
        cookie = self.request(CMD_WRITE, offset, len(data), flags, data)
        got, err, _ = await self.reply()
        assert got == cookie
        return err

    async def closed_by_server(self, timeout: float = 5) -> bool:
        """True if the server closes the connection within ``timeout``."""
        try:
            while await asyncio.wait_for(self.r.read(65536), timeout):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def disconnect(self) -> None:
        self.request(CMD_DISC)
        await self.close()

    async def close(self) -> None:
        self.w.close()
        with contextlib.suppress(ConnectionError):
            await self.w.wait_closed()

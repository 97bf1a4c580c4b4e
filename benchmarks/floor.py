"""The floor: the smallest honest pure-Python NBD server, for raw files.

``python -m benchmarks.floor --socket PATH [--read-only] FILE``

Issue 6 sets its targets from a ~250-line asyncio server measured on
another machine ("the evidence says a Python server can").  This module is
that kind of server, written for the harness so the same claim can be
checked here, in the same run as everything else
(``python -m benchmarks.run --servers qemu-nbd,nbdqcow,nbdkit,floor``):
whatever this server cannot reach on a machine, no Python server built on
asyncio's event loop reaches there either, and a ratio target above it is
a target for the machine, not for nbdqcow.

It follows the issue's lessons and nothing else:

* one event loop thread; sockets driven from ``add_reader`` callbacks, no
  coroutine per connection, no transport or protocol objects;
* every request already received is parsed before the loop is entered
  again, and the replies of one receive leave in one ``sendmsg``;
* file I/O is called inline (page-cache reads and writes), READ payloads
  of 64 KiB or more go out with ``os.sendfile`` behind a header sent with
  ``MSG_MORE``, on a socket whose send buffer is raised to 4 MiB;
* WRITE payloads are written from the receive buffer itself (no copy),
  small READ buffers are reused, nothing is allocated per connection
  before its first request.

What it leaves out is what nbdqcow is for: qcow2, structured replies and
block status, TRIM and zeroes, TLS, several exports, limits and timeouts
against hostile clients, FLUSH off the event loop, logging, metrics.  It
is correct for the clients the harness drives (libnbd's nbdcopy, fio's
nbd engine, nbdinfo): fixed newstyle handshake (``NBD_OPT_GO``,
``NBD_OPT_INFO``, ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_ABORT``; anything
else gets ``NBD_REP_ERR_UNSUP``), simple replies, READ, WRITE (with FUA),
FLUSH and DISC, bounds checked (``EINVAL``), writes refused with ``EPERM``
on a read-only export; a malformed request closes the connection.  Not a
product: it never leaves benchmarks/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import signal
import socket
import struct
import sys
from collections import deque

__all__ = ["main"]

# doc/proto.md, "Handshake" (fixed newstyle) and "Transmission".
_GREETING = b"NBDMAGIC" + struct.pack(">QH", 0x49484156454F5054, 0x0001 | 0x0002)
_FIXED_NEWSTYLE, _NO_ZEROES = 0x0001, 0x0002
_OPT_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_MAGIC = 0x49484156454F5054
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_OPT_REPLY_MAGIC = 0x3E889045565A9
_OPT_EXPORT_NAME, _OPT_ABORT, _OPT_INFO, _OPT_GO = 1, 2, 6, 7
_REP_ACK, _REP_INFO = 1, 3
_REP_ERR_UNSUP, _REP_ERR_INVALID = (1 << 31) + 1, (1 << 31) + 3
_INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
_MAX_OPTION = 4096

_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_SIMPLE_REPLY_MAGIC = 0x67446698
_CMD_READ, _CMD_WRITE, _CMD_DISC, _CMD_FLUSH = 0, 1, 2, 3
_CMD_FLAG_FUA = 1
_FLAG_HAS_FLAGS, _FLAG_READ_ONLY, _FLAG_SEND_FLUSH, _FLAG_SEND_FUA = 1, 2, 4, 8
_FLAG_CAN_MULTI_CONN = 256

_MAX_PAYLOAD = 32 << 20  # the largest request this server accepts
_SENDFILE_MIN = 64 << 10  # READs from here on go out with os.sendfile
_RECV_SIZE = 1 << 20  # the receive buffer; grows for a bigger WRITE
_SNDBUF = 4 << 20
_IOV_MAX = 1024


class _Export:
    def __init__(self, path: str, read_only: bool) -> None:
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.read_only = read_only
        flags = _FLAG_HAS_FLAGS | _FLAG_SEND_FLUSH | _FLAG_SEND_FUA | _FLAG_CAN_MULTI_CONN
        # One file, one page cache: a FLUSH on any connection covers them
        # all, so multi-conn is safe (as nbdkit's file plugin says too).
        self.flags = flags | _FLAG_READ_ONLY if read_only else flags


class _Connection:
    """One client: a handshake state machine, then the request loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, export: _Export
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.export = export
        self.buf = bytearray(2 * _MAX_OPTION)  # _RECV_SIZE at transmission
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.out: deque[bytes | bytearray | memoryview | tuple[int, int]] = deque()
        self.held: list[bytearray] = []  # READ buffers in ``out``
        self.free: list[bytearray] = []  # reusable READ buffers (one size)
        self.free_size = 0
        self.phase = 0  # 0: client flags, 1: options, 2: transmission
        self.no_zeroes = False
        self.closing = False
        self.reading = True
        self.writing = False
        self.out.append(_GREETING)
        self.flush()
        if not self.closing:
            loop.add_reader(sock, self.readable)

    # -- input ---------------------------------------------------------------
    def readable(self) -> None:
        if self.end == len(self.buf):
            self.room()
        try:
            n = self.sock.recv_into(self.view[self.end:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not n:
            self.close()
            return
        self.end += n
        if self.phase == 2:
            self.requests()
        else:
            self.options()
        if not self.closing:
            self.flush()

    def room(self) -> None:
        """Make room to receive into a full buffer: compact it, and grow it
        when the WRITE at its head (header and payload) would not fit."""
        need = 0
        if self.phase == 2 and self.end - self.start >= 28:
            fields = _REQUEST.unpack_from(self.buf, self.start)
            if fields[2] == _CMD_WRITE:
                need = 28 + fields[5]
        self.make_room(need)

    def make_room(self, need: int) -> None:
        """Move the unparsed bytes to the front; grow the buffer when even
        then ``need`` bytes (one WRITE with its header) would not fit."""
        pending = self.end - self.start
        size = len(self.buf)
        if need > size:
            size = need
        if size != len(self.buf):
            new = bytearray(size)
            new[:pending] = self.view[self.start:self.end]
            self.view.release()
            self.buf, self.view = new, memoryview(new)
        elif self.start:
            self.view[:pending] = self.view[self.start:self.end]
        self.start, self.end = 0, pending

    # -- handshake (doc/proto.md "Fixed newstyle negotiation") ---------------
    def options(self) -> None:
        view = self.view
        while not self.closing and self.phase < 2:
            avail = self.end - self.start
            if self.phase == 0:
                if avail < 4:
                    return
                (cflags,) = struct.unpack_from(">I", view, self.start)
                self.start += 4
                if not cflags & _FIXED_NEWSTYLE:
                    self.close()
                    return
                self.no_zeroes = bool(cflags & _NO_ZEROES)
                self.phase = 1
                continue
            if avail < _OPT_HEADER.size:
                return
            magic, option, length = _OPT_HEADER.unpack_from(view, self.start)
            if magic != _OPT_MAGIC or length > _MAX_OPTION:
                self.close()
                return
            if avail < _OPT_HEADER.size + length:
                return
            at = self.start + _OPT_HEADER.size
            data = bytes(view[at : at + length])
            self.start = at + length
            self.option(option, data)

    def option(self, option: int, data: bytes) -> None:
        export = self.export
        if option == _OPT_EXPORT_NAME:
            self.out.append(struct.pack(">QH", export.size, export.flags))
            if not self.no_zeroes:
                self.out.append(bytes(124))
            self.transmission()
        elif option in (_OPT_GO, _OPT_INFO):
            # name length, name, number of info requests, requests: any
            # name is this one export; NBD_INFO_EXPORT is always sent.
            if len(data) < 6:
                self.reply(option, _REP_ERR_INVALID)
                return
            (nlen,) = struct.unpack_from(">I", data)
            if len(data) < 6 + nlen:
                self.reply(option, _REP_ERR_INVALID)
                return
            (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
            if len(data) != 6 + nlen + 2 * nreq:
                self.reply(option, _REP_ERR_INVALID)
                return
            self.reply(option, _REP_INFO, _INFO_EXPORT.pack(0, export.size, export.flags))
            self.reply(option, _REP_ACK)
            if option == _OPT_GO:
                self.transmission()
        elif option == _OPT_ABORT:
            self.reply(option, _REP_ACK)
            self.closing = True
            self.flush()
            self.close()
        else:
            self.reply(option, _REP_ERR_UNSUP)

    def reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self.out.append(_OPT_REPLY.pack(_OPT_REPLY_MAGIC, option, kind, len(data)) + data)

    def transmission(self) -> None:
        self.phase = 2
        # Lazily, now that requests will come: the issue measured 32 MiB
        # per connection up front cutting handshakes from 5 000/s to 69/s.
        self.make_room(_RECV_SIZE)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        if self.end > self.start:
            self.requests()

    # -- transmission (doc/proto.md "Transmission phase") --------------------
    def requests(self) -> None:
        export = self.export
        fd, size, read_only = export.fd, export.size, export.read_only
        buf, view, out, held = self.buf, self.view, self.out, self.held
        pos, end = self.start, self.end
        pack = _SIMPLE_REPLY.pack
        while end - pos >= 28:
            magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(buf, pos)
            if magic != _REQUEST_MAGIC:
                self.close()
                return
            bad = length > _MAX_PAYLOAD or offset + length > size
            if command == _CMD_READ:
                pos += 28
                if bad:
                    out.append(pack(_SIMPLE_REPLY_MAGIC, errno.EINVAL, cookie))
                elif length >= _SENDFILE_MIN:
                    out.append(pack(_SIMPLE_REPLY_MAGIC, 0, cookie))
                    out.append((offset, length))
                else:
                    data = self.read_buffer(length)
                    try:
                        got = os.preadv(fd, [data], offset)
                        while got < length:  # short read: the rest, or EOF
                            more = os.preadv(fd, [memoryview(data)[got:]], offset + got)
                            if not more:
                                raise OSError(errno.EIO, "short read")
                            got += more
                    except OSError as e:
                        self.free.append(data)
                        out.append(pack(_SIMPLE_REPLY_MAGIC, e.errno or errno.EIO, cookie))
                        continue
                    out.append(pack(_SIMPLE_REPLY_MAGIC, 0, cookie))
                    out.append(data)
                    held.append(data)
            elif command == _CMD_WRITE:
                if length > _MAX_PAYLOAD:
                    self.close()  # cannot skip a payload this size: give up
                    return
                if end - pos - 28 < length:
                    break  # the payload is still coming
                at = pos + 28
                pos = at + length
                if read_only:
                    err = errno.EPERM
                elif bad:
                    err = errno.EINVAL
                else:
                    err = self.write(view[at:pos], offset, flags & _CMD_FLAG_FUA)
                out.append(pack(_SIMPLE_REPLY_MAGIC, err, cookie))
            elif command == _CMD_FLUSH:
                pos += 28
                err = 0
                if not read_only:
                    try:
                        os.fdatasync(fd)
                    except OSError as e:
                        err = e.errno or errno.EIO
                out.append(pack(_SIMPLE_REPLY_MAGIC, err, cookie))
            elif command == _CMD_DISC:
                pos += 28
                self.closing = True
                break
            else:
                pos += 28
                out.append(pack(_SIMPLE_REPLY_MAGIC, errno.EINVAL, cookie))
        self.start = pos
        if pos == end:
            self.start = self.end = 0
        elif len(buf) - end < 64 << 10:
            self.room()  # no tiny receives at the end of the buffer
        if self.closing:
            self.flush()
            self.close()

    def read_buffer(self, length: int) -> bytearray:
        if length == self.free_size and self.free:
            return self.free.pop()
        if length != self.free_size:
            self.free.clear()
            self.free_size = length
        return bytearray(length)

    def write(self, data: memoryview, offset: int, fua: int) -> int:
        fd = self.export.fd
        try:
            done = 0
            while done < len(data):
                done += os.pwritev(fd, [data[done:]], offset + done)
            if fua:
                os.fdatasync(fd)
        except OSError as e:
            return e.errno or errno.EIO
        finally:
            data.release()
        return 0

    # -- output --------------------------------------------------------------
    def flush(self) -> None:
        """Send what is queued; on a full socket wait for it to drain, and
        stop reading requests meanwhile."""
        out, sock = self.out, self.sock
        try:
            while out:
                item = out[0]
                if type(item) is tuple:
                    offset, length = item
                    sent = os.sendfile(sock.fileno(), self.export.fd, offset, length)
                    if not sent:
                        raise OSError(errno.EIO, "file shorter than the export")
                    if sent < length:
                        out[0] = (offset + sent, length - sent)
                    else:
                        out.popleft()
                    continue
                batch: list[bytes | bytearray | memoryview] = []
                more = 0
                for item in out:
                    if type(item) is tuple:
                        more = socket.MSG_MORE  # its header goes with the data
                        break
                    batch.append(item)  # type: ignore[arg-type]
                    if len(batch) == _IOV_MAX:
                        break
                sent = sock.sendmsg(batch, (), more)
                for item in batch:
                    n = len(item)
                    if sent >= n:
                        out.popleft()
                        sent -= n
                    else:
                        out[0] = memoryview(item)[sent:]
                        break
        except (BlockingIOError, InterruptedError):
            if not self.writing:
                self.writing = True
                self.loop.add_writer(sock, self.writable)
            if self.reading:
                self.reading = False
                self.loop.remove_reader(sock)
            return
        except OSError:
            self.close()
            return
        # Everything is sent: the READ buffers are free again.
        held = self.held
        if held:
            size = self.free_size
            self.free.extend(b for b in held if len(b) == size)
            held.clear()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(sock)
        if not self.reading and not self.closing:
            self.reading = True
            self.loop.add_reader(sock, self.readable)
            if self.end > self.start:
                self.readable_buffered()

    def writable(self) -> None:
        self.flush()

    def readable_buffered(self) -> None:
        # Requests that arrived while output was blocked are already here.
        if self.phase == 2:
            self.requests()
        if not self.closing:
            self.flush()

    def close(self) -> None:
        self.closing = True
        loop, sock = self.loop, self.sock
        if sock.fileno() >= 0:
            if self.reading:
                loop.remove_reader(sock)
            if self.writing:
                loop.remove_writer(sock)
            sock.close()
        self.reading = self.writing = False


def _serve(path: str, image: str, read_only: bool) -> int:
    export = _Export(image, read_only)
    loop = asyncio.new_event_loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    listener.setblocking(False)

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the next readable retries
            sock.setblocking(False)
            _Connection(loop, sock, export)

    loop.add_reader(listener, accept)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        loop.remove_reader(listener)
        listener.close()
        os.unlink(path)
        loop.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.floor", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--socket", required=True, help="Unix socket to listen on")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("image", help="raw file to serve")
    args = p.parse_args(argv)
    try:
        return _serve(args.socket, args.image, args.read_only)
    except OSError as e:
        print(f"floor: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m nbdqcow.healthcheck``: is an NBD server answering?  (Docker HEALTHCHECK.)

It speaks just enough NBD to tell a working server from a port that merely
accepts connections (proto.md, "Handshake" and "Option haggling"): read the
fixed-newstyle greeting, send the client flags, ask ``NBD_OPT_LIST`` (or
``NBD_OPT_INFO`` for one export with ``--export``), then ``NBD_OPT_ABORT`` so
the server sees an orderly goodbye rather than a dropped connection.

Stdlib only, blocking sockets, one overall deadline: it runs in a fresh process
every few seconds inside the container and must not hang nor need the event
loop.  Exit status 0 means healthy, 1 unhealthy (Docker reserves 2); the one
output line says why.

A server that requires TLS answers the LIST with ``NBD_REP_ERR_TLS_REQD``;
that is a healthy server, reported as such (the check does not carry a
certificate).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nbdqcow.config import DEFAULT_PORT, Address, UnixAddress, parse_address

__all__ = ["ExportInfo", "HealthError", "ProbeResult", "main", "probe"]

# proto.md, "Newstyle negotiation" (values repeated here on purpose: the check
# must keep working even if the protocol core has a bug).
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OLDSTYLE_MAGIC = 0x00420281861253
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR = 1 << 31
INFO_EXPORT = 0
#: Option error replies by name, for messages (proto.md, "Option reply types").
REP_ERRORS = {
    REP_ERR + 1: "ERR_UNSUP",
    REP_ERR + 2: "ERR_POLICY",
    REP_ERR + 3: "ERR_INVALID",
    REP_ERR + 4: "ERR_PLATFORM",
    REP_ERR + 5: "ERR_TLS_REQD",
    REP_ERR + 6: "ERR_UNKNOWN",
    REP_ERR + 7: "ERR_SHUTDOWN",
    REP_ERR + 8: "ERR_BLOCK_SIZE_REQD",
    REP_ERR + 9: "ERR_TOO_BIG",
}
REP_ERR_TLS_REQD = REP_ERR + 5
#: A reply payload longer than this is not from a sane server.
MAX_REPLY = 1 << 20


class HealthError(Exception):
    """The server is not healthy; the message says what went wrong."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    description: str = ""
    size: int | None = None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    exports: tuple[ExportInfo, ...] = ()
    #: The server refused to talk before STARTTLS (healthy, but opaque).
    tls_required: bool = False
    oldstyle: bool = False


class _Conn:
    """A blocking socket with one deadline for the whole conversation."""

    def __init__(self, address: Address, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        if isinstance(address, UnixAddress):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address.path)
        else:
            self.sock = socket.create_connection((address.host, address.port), timeout=timeout)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise HealthError("the server closed the connection during the handshake")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        self.sock.sendall(data)

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != REPLY_MAGIC:
            raise HealthError(f"bad option reply magic {magic:#x}")
        if ropt != opt:
            raise HealthError(f"reply for option {ropt}, expected {opt}")
        if length > MAX_REPLY:
            raise HealthError(f"option reply of {length} bytes")
        return rtype, self.recv_exact(length)

    def close(self) -> None:
        self.sock.close()


def _error(opt_name: str, rtype: int, data: bytes) -> HealthError:
    name = REP_ERRORS.get(rtype, f"error {rtype:#x}")
    text = data.decode("utf-8", "replace").strip()
    return HealthError(f"{opt_name}: server replied {name}" + (f": {text}" if text else ""))


def probe(address: Address, export: str | None = None, timeout: float = 5.0) -> ProbeResult:
    """Handshake with the NBD server at ``address``.

    Args:
        address: where the server listens.
        export: check this export with NBD_OPT_INFO instead of listing exports.
        timeout: seconds for the whole exchange.

    Raises:
        HealthError: the server did not behave as an NBD server should.
        OSError: it could not be reached (refused, timed out, no such socket).
    """
    conn = _Conn(address, timeout)
    try:
        magic, second = struct.unpack(">QQ", conn.recv_exact(16))
        if magic != NBDMAGIC:
            raise HealthError(f"not an NBD server (greeting {magic:#018x})")
        if second == OLDSTYLE_MAGIC:
            return ProbeResult(oldstyle=True)
        if second != IHAVEOPT:
            raise HealthError(f"unknown NBD handshake magic {second:#x}")
        (server_flags,) = struct.unpack(">H", conn.recv_exact(2))
        # Only echo flags the server offered: unknown client flags make a
        # server drop the connection (proto.md, "Client flags").
        conn.send(struct.pack(">I", server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)))
        try:
            result = _ask(conn, export)
        finally:
            _abort(conn)
        return result
    finally:
        conn.close()


def _abort(conn: _Conn) -> None:
    """Say goodbye with NBD_OPT_ABORT, even after an error reply, so the
    server logs an orderly end rather than a client that vanished."""
    with contextlib.suppress(HealthError, OSError):
        conn.option(OPT_ABORT)
        # The server may ACK, or just close: either is fine; do not wait long.
        conn.deadline = min(conn.deadline, time.monotonic() + 0.5)
        conn.reply(OPT_ABORT)


def _ask(conn: _Conn, export: str | None) -> ProbeResult:
    if export is not None:
        name = export.encode()
        conn.option(OPT_INFO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 0))
        size: int | None = None
        while True:
            rtype, data = conn.reply(OPT_INFO)
            if rtype == REP_ACK:
                break
            if rtype == REP_ERR_TLS_REQD:
                return ProbeResult(tls_required=True)
            if rtype & REP_ERR:
                raise _error(f"export {export!r}", rtype, data)
            if rtype == REP_INFO and len(data) >= 12 and data[:2] == b"\0\0":
                (size,) = struct.unpack(">Q", data[2:10])
        if size is None:
            raise HealthError(f"export {export!r}: no NBD_INFO_EXPORT in the reply")
        return ProbeResult(exports=(ExportInfo(export, size=size),))
    conn.option(OPT_LIST)
    exports: list[ExportInfo] = []
    while True:
        rtype, data = conn.reply(OPT_LIST)
        if rtype == REP_ACK:
            return ProbeResult(exports=tuple(exports))
        if rtype == REP_ERR_TLS_REQD:
            return ProbeResult(tls_required=True)
        if rtype & REP_ERR:
            # ERR_POLICY / ERR_UNSUP: the server is alive and chose not to list.
            if rtype in (REP_ERR + 1, REP_ERR + 2):
                return ProbeResult()
            raise _error("export list", rtype, data)
        if rtype != REP_SERVER or len(data) < 4:
            raise HealthError(f"unexpected reply type {rtype} to NBD_OPT_LIST")
        (n,) = struct.unpack(">I", data[:4])
        if 4 + n > len(data):
            raise HealthError("export name longer than its reply")
        exports.append(
            ExportInfo(
                data[4 : 4 + n].decode("utf-8", "replace"),
                data[4 + n :].decode("utf-8", "replace"),
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nbdqcow.healthcheck",
        description="Check that an NBD server answers the handshake (exit 0 if healthy).",
    )
    parser.add_argument(
        "address",
        nargs="?",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help="HOST[:PORT], [IPV6]:PORT or unix:PATH (default %(default)s)",
    )
    parser.add_argument("--export", "-x", metavar="NAME", help="check that this export exists")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing when healthy")
    args = parser.parse_args(argv)
    try:
        address = parse_address(args.address)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = probe(address, args.export, args.timeout)
    except (HealthError, OSError) as exc:
        why = str(exc) if isinstance(exc, HealthError) else (exc.strerror or repr(exc))
        if isinstance(exc, TimeoutError):
            why = f"no answer within {args.timeout:g}s"
        print(f"unhealthy: {address}: {why}", file=sys.stderr)
        return 1
    if not args.quiet:
        if result.oldstyle:
            what = "oldstyle NBD server"
        elif result.tls_required:
            what = "NBD server (requires TLS)"
        elif args.export is not None:
            what = f"export {args.export!r}: {result.exports[0].size} bytes"
        else:
            names = ", ".join(repr(e.name) for e in result.exports)
            what = f"{len(result.exports)} export(s)" + (f": {names}" if names else "")
        print(f"healthy: {address}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

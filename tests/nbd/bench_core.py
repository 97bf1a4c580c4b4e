"""Per-request cost of the bare protocol core (issue 6): parse a stream of
4 KiB requests and build their replies, no sockets, no backend.

    python -m tests.nbd.bench_core            # us/request per reply mode
    python -m tests.nbd.bench_core --profile structured

Requests arrive in batches of 32 (one receive per queue-depth-32 burst, as
a client with 32 requests in flight sends them), are answered from one
preallocated 4 KiB buffer, and every batch's output is taken with
``data_to_send``.  The figure is the best of 5 runs of 64k requests in
process CPU time (not wall time), since the machine is shared.  Not a test
(no ``test_`` prefix): a measurement to quote, before and after a change to
the request path.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import struct
import time
from collections.abc import Callable

from nbdqcow.backends.base import Capabilities
from nbdqcow.nbd import (
    Command,
    ExportInfo,
    ExportRequested,
    HandshakeComplete,
    Option,
    Read,
    ServerConnection,
    Write,
)
from nbdqcow.nbd.wire import pack_extended_request, pack_option, pack_request

QD = 32
N = QD * 2000
BLOCK = 4096
MODES = ("simple", "structured", "extended")


def connect(mode: str) -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(struct.pack(">I", 3))
    if mode != "simple":
        opt = Option.EXTENDED_HEADERS if mode == "extended" else Option.STRUCTURED_REPLY
        conn.receive_data(pack_option(opt))
    conn.receive_data(pack_option(Option.GO, struct.pack(">I", 4) + b"disk\0\0"))
    ev = conn.next_event()
    assert isinstance(ev, ExportRequested)
    conn.accept_export(ev, ExportInfo("disk", 1 << 30, Capabilities(read_only=False)))
    assert isinstance(conn.next_event(), HandshakeComplete)
    conn.data_to_send()
    return conn


def batches(mode: str, command: int) -> list[bytes]:
    pack = pack_extended_request if mode == "extended" else pack_request
    payload = bytes(BLOCK) if command == Command.WRITE else b""
    return [
        b"".join(
            pack(0, command, i * QD + j, ((i * 7919 + j) % 4096) * BLOCK, BLOCK) + payload
            for j in range(QD)
        )
        for i in range(N // QD)
    ]


def serve(conn: ServerConnection, stream: list[bytes]) -> None:
    buf = memoryview(bytearray(BLOCK))
    runs = [buf]
    receive, next_event, data_to_send = conn.receive_data, conn.next_event, conn.data_to_send
    reply_read, reply_ok = conn.reply_read, conn.reply_ok
    for chunk in stream:
        receive(chunk)
        while (ev := next_event()) is not None:
            if isinstance(ev, Read):
                reply_read(ev.cookie, runs)
            elif isinstance(ev, Write):
                reply_ok(ev.cookie)
        data_to_send()


def serve_batch(conn: ServerConnection, stream: list[bytes]) -> None:
    """The same through :meth:`ServerConnection.next_events`, the batch
    interface the transmission pump uses."""
    buf = memoryview(bytearray(BLOCK))
    runs = [buf]
    receive, next_events, data_to_send = conn.receive_data, conn.next_events, conn.data_to_send
    reply_read, reply_ok = conn.reply_read, conn.reply_ok
    for chunk in stream:
        receive(chunk)
        while evs := next_events(QD):
            for ev in evs:
                if type(ev) is Read:
                    reply_read(ev.cookie, runs)
                elif type(ev) is Write:
                    reply_ok(ev.cookie)
        data_to_send()


def serve_buffered(conn: ServerConnection, stream: list[bytes]) -> None:
    """The same through ``get_buffer``/``buffer_updated``, the way the
    asyncio server (a ``recv_into`` loop) feeds the core."""
    buf = memoryview(bytearray(BLOCK))
    runs = [buf]
    next_event, data_to_send = conn.next_event, conn.data_to_send
    get_buffer, buffer_updated = conn.get_buffer, conn.buffer_updated
    reply_read, reply_ok = conn.reply_read, conn.reply_ok
    for chunk in stream:
        view = memoryview(chunk)
        while view:
            dest = get_buffer(len(view))
            n = min(len(dest), len(view))
            dest[:n] = view[:n]
            buffer_updated(n)
            view = view[n:]
            while (ev := next_event()) is not None:
                if isinstance(ev, Read):
                    reply_read(ev.cookie, runs)
                elif isinstance(ev, Write):
                    reply_ok(ev.cookie)
        data_to_send()


def serve_pump(conn: ServerConnection, stream: list[bytes]) -> None:
    """The core as :mod:`nbdqcow.pump` drives it: ``get_buffer`` /
    ``buffer_updated`` and batches from ``next_events``."""
    buf = memoryview(bytearray(BLOCK))
    runs = [buf]
    next_events, data_to_send = conn.next_events, conn.data_to_send
    get_buffer, buffer_updated = conn.get_buffer, conn.buffer_updated
    reply_read, reply_ok = conn.reply_read, conn.reply_ok
    for chunk in stream:
        view = memoryview(chunk)
        while view:
            dest = get_buffer(len(view))
            n = min(len(dest), len(view))
            dest[:n] = view[:n]
            buffer_updated(n)
            view = view[n:]
            while evs := next_events(QD):
                for ev in evs:
                    if type(ev) is Read:
                        reply_read(ev.cookie, runs)
                    elif type(ev) is Write:
                        reply_ok(ev.cookie)
                if len(evs) < QD:
                    break
        data_to_send()


def measure(mode: str, command: int, runner: Callable[..., None] = serve) -> float:
    best = float("inf")
    for _ in range(5):
        conn, stream = connect(mode), batches(mode, command)
        t = time.process_time()
        runner(conn, stream)
        best = min(best, time.process_time() - t)
    return best / N * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=MODES, help="cProfile the READ stream in this mode")
    args = ap.parse_args()
    if args.profile:
        conn, stream = connect(args.profile), batches(args.profile, Command.READ)
        prof = cProfile.Profile()
        prof.runcall(serve, conn, stream)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return
    for mode in MODES:
        for name, command in (("READ", Command.READ), ("WRITE", Command.WRITE)):
            print(f"{mode:10s} 4 KiB {name:5s} {measure(mode, command):6.2f} us/request")
    for name, command in (("READ", Command.READ), ("WRITE", Command.WRITE)):
        us = measure("structured", command, serve_buffered)
        print(f"structured 4 KiB {name:5s} {us:6.2f} us/request (get_buffer path)")
    for name, command in (("READ", Command.READ), ("WRITE", Command.WRITE)):
        us = measure("structured", command, serve_batch)
        print(f"structured 4 KiB {name:5s} {us:6.2f} us/request (next_events)")
    for name, command in (("READ", Command.READ), ("WRITE", Command.WRITE)):
        us = measure("structured", command, serve_pump)
        print(f"structured 4 KiB {name:5s} {us:6.2f} us/request (get_buffer + next_events: "
              "the pump's way)")


if __name__ == "__main__":
    main()

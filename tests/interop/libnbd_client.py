"""Scenarios run by /usr/bin/python3 with libnbd's bindings (``import nbd``).

Not a test module: the interop tests start it as a subprocess, because the
bindings exist only for the Debian interpreter.  Usage::

    libnbd_client.py SCENARIO URI [TLS_DIR]

Prints one JSON object with what it observed; the caller asserts on it.
Strict mode is turned off where a check must reach the *server* rather than
be refused by libnbd itself.
"""

import errno
import json
import sys

import nbd


def connect(uri, tls_dir=None, strict=True):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    if tls_dir:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(tls_dir)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


def errno_of(fn):
    try:
        fn()
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return None


def ops(uri):
    h = connect(uri)
    size = h.get_size()
    out = {
        "size": size,
        "can": {k: bool(getattr(h, "can_" + k)()) for k in
                ("flush", "fua", "trim", "zero", "fast_zero", "cache", "multi_conn", "df")},
        "structured": bool(h.get_structured_replies_negotiated()),
        "read_only": bool(h.is_read_only()),
    }
    h.pwrite(b"\xa5" * 65536, 65536, nbd.CMD_FLAG_FUA)
    h.flush()
    out["fua_read"] = h.pread(65536, 65536) == b"\xa5" * 65536
    h.trim(4096, 65536 + 8192)
    h.zero(65536, 200000)
    out["zero_read"] = h.pread(65536, 200000) == bytes(65536)
    h.pwrite(b"\x5a" * 8192, 300000)
    h.zero(8192, 300000 + 1024, nbd.CMD_FLAG_NO_HOLE)
    out["zero_no_hole_read"] = h.pread(8192, 300000) == b"\x5a" * 1024 + bytes(7168)
    # FAST_ZERO: must either succeed (and zero) or fail with ENOTSUP untouched.
    h.pwrite(b"\x77" * 4096, 500000)
    e = errno_of(lambda: h.zero(4096, 500000, nbd.CMD_FLAG_FAST_ZERO))
    out["fast_zero"] = e
    out["fast_zero_read_ok"] = h.pread(4096, 500000) == (
        bytes(4096) if e is None else b"\x77" * 4096)
    h.cache(1 << 20, 0)
    # 16 concurrent reads of distinct patterns, collected out of order
    for i in range(16):
        h.pwrite(bytes([i + 1]) * 4096, (2 << 20) + i * 65536)
    bufs, cookies = [], []
    for i in range(16):
        b = nbd.Buffer(4096)
        bufs.append(b)
        cookies.append(h.aio_pread(b, (2 << 20) + i * 65536))
    out["max_in_flight"] = h.aio_in_flight()
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        h.aio_command_completed(c)
    out["concurrent_reads_ok"] = all(
        bufs[i].to_bytearray() == bytes([i + 1]) * 4096 for i in range(16))
    h.shutdown()
    # errors answered by the server: out of range, misuse of flags
    h = connect(uri, strict=False)
    out["read_past_end"] = errno_of(lambda: h.pread(512, size))
    out["write_past_end"] = errno_of(lambda: h.pwrite(b"x" * 512, size - 256))
    out["after_errors_ok"] = h.pread(4096, 65536) == b"\xa5" * 4096
    h.shutdown()
    return out


def read_only(uri):
    h = connect(uri, strict=False)
    out = {"read_only": bool(h.is_read_only())}
    out["write"] = errno_of(lambda: h.pwrite(b"x" * 512, 0))
    out["trim"] = errno_of(lambda: h.trim(512, 0))
    out["zero"] = errno_of(lambda: h.zero(512, 0))
    out["read_ok"] = len(h.pread(4096, 0)) == 4096
    h.shutdown()
    return out


def tls(uri, tls_dir):
    try:
        h = connect(uri, tls_dir)
    except nbd.Error as e:
        return {"connected": False, "error": str(e)}
    out = {"connected": True, "tls": bool(h.get_tls_negotiated())}
    h.pwrite(b"\x3c" * 100000, 12345)
    out["roundtrip"] = h.pread(100000, 12345) == b"\x3c" * 100000
    h.shutdown()
    return out


def stress(uri):
    """Many large requests in flight at once, so that replies are sent in
    parts and must still never interleave; every byte is checked."""
    import random

    h = connect(uri)
    size = h.get_size()
    rnd = random.Random(7)
    blocks = []
    for i in range(48):
        n = rnd.choice((4096, 65536, 300000, 1 << 20))
        off = rnd.randrange(0, size - n) & ~511
        blocks.append((off, n, i + 1))
    model = bytearray(h.pread(size, 0))
    bufs = []
    for off, n, v in blocks:
        b = nbd.Buffer.from_bytearray(bytearray([v]) * n)
        bufs.append(b)
        h.aio_pwrite(b, off)
        model[off:off + n] = bytes([v]) * n
    peak = h.aio_in_flight()
    while h.aio_in_flight() > 0:
        h.poll(-1)
    reads = []
    for _ in range(64):
        n = rnd.choice((65536, 500000, 1 << 20))
        off = rnd.randrange(0, size - n)
        b = nbd.Buffer(n)
        reads.append((off, n, b))
        h.aio_pread(b, off)
    peak = max(peak, h.aio_in_flight())
    while h.aio_in_flight() > 0:
        h.poll(-1)
    ok = all(b.to_bytearray() == model[off:off + n] for off, n, b in reads)
    h.shutdown()
    return {"ok": ok, "peak_in_flight": peak}


def write_until_closed(uri, nblocks):
    """Write 64 KiB blocks (block i filled with i % 250 + 1), 16 in flight,
    until done or the server goes away; report which writes were acked."""
    nblocks = int(nblocks)
    h = connect(uri)
    inflight = {}
    acked = []
    err = None
    i = 0
    try:
        while i < nblocks or inflight:
            while i < nblocks and len(inflight) < 16:
                buf = nbd.Buffer.from_bytearray(bytearray([i % 250 + 1]) * 65536)
                inflight[h.aio_pwrite(buf, i * 65536)] = (i, buf)
                i += 1
            h.poll(-1)
            for c in list(inflight):
                try:
                    if h.aio_command_completed(c):
                        acked.append(inflight.pop(c)[0])
                        if len(acked) == 32:
                            print("started", flush=True)  # the caller may now interrupt
                except nbd.Error as e:
                    inflight.pop(c)
                    err = str(e)
            if err:
                break
    except nbd.Error as e:
        err = str(e)
    return {"acked": acked, "error": err}


def multi_conn(uri):
    """Write on one connection, FLUSH on another (proto.md CAN_MULTI_CONN:
    the flush must cover the first connection's completed writes); both
    connections stay open while the caller inspects the image file."""
    a = connect(uri)
    b = connect(uri)
    out = {"multi_conn": bool(a.can_multi_conn())}
    a.pwrite(b"\x5e" * 1048576, 1048576)
    a.pwrite(b"\x6f" * 65536, 3 * 1048576 + 4096)
    b.flush()
    out["visible_on_b"] = b.pread(65536, 3 * 1048576 + 4096) == b"\x6f" * 65536
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # hold both connections until told to go
    a.shutdown()
    b.shutdown()
    return {"done": True}


def plain(uri):
    # a client that insists on no TLS
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        return {"connected": False, "error": str(e)}
    out = {"connected": True, "size": h.get_size()}
    h.shutdown()
    return out


if __name__ == "__main__":
    scenario, uri = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    scenarios = {
        "ops": ops, "read_only": read_only, "tls": tls, "plain": plain, "stress": stress,
        "write_until_closed": write_until_closed, "multi_conn": multi_conn,
    }
    result = scenarios[scenario](uri, *args)
    print(json.dumps(result))

"""The core through the real server: ``nbdqcow serve`` in a subprocess (the
interop harness), driven over Unix and TCP sockets by ``tests/nbdclient.py``
for what no Debian client does -- extended headers, DF, 64-bit block status,
pipelining with out-of-order replies, malformed input.

Expected data comes from qemu-io/qemu-img on the same file, never from
constants.
"""

from __future__ import annotations

import json
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdqcow.nbd import Command, CommandFlag, Errno, ReplyType, TransmissionFlag
from tests.interop.certs import make_ca
from tests.interop.harness import Served, serve
from tests.nbdclient import NbdClient, NbdError
from tests.tools import require

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.raw"
    subprocess.run(
        [require("qemu-img"), "create", "-f", "raw", str(img), str(SIZE)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [require("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 1M 192k", str(img)],
        check=True,
        capture_output=True,
    )
    return img


@pytest.fixture(params=["unix", "tcp"])
def served(request: pytest.FixtureRequest, tmp_path: Path, image: Path) -> Iterator[Served]:
    s = serve(tmp_path, image, transport=request.param)
    yield s
    assert s.stop() == 0, s.stderr()


def connect(s: Served) -> NbdClient:
    if s.transport == "unix":
        assert s.socket_path is not None
        return NbdClient.connect_unix(s.socket_path)
    assert s.port is not None
    return NbdClient.connect_tcp("127.0.0.1", s.port)


def extended(s: Served) -> NbdClient:
    c = connect(s)
    c.handshake()
    c.extended_headers()
    c.set_meta_context("disk", ["base:allocation", "qemu:allocation-depth"])
    info = c.go("disk")
    assert info.size == SIZE and info.flags & TransmissionFlag.SEND_DF
    return c


def qemu_map(image: Path) -> list[int]:
    """base:allocation status per 512-byte sector, from ``qemu-img map``."""
    out = subprocess.run(
        [require("qemu-img"), "map", "--output=json", "-f", "raw", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [
        (0 if e["data"] else 1) | (2 if e["zero"] else 0)
        for e in json.loads(out)
        for _ in range(e["length"] // 512)
    ]


def qemu_read(image: Path, offset: int, length: int) -> bytes:
    return image.read_bytes()[offset : offset + length]


def test_extended_headers_session(served: Served, image: Path) -> None:
    with extended(served) as c:
        assert c.read(MiB - 4096, 8192) == qemu_read(image, MiB - 4096, 8192)
        # A read over data and holes: content chunks with extended headers.
        r = c.request(Command.READ, 0, 2 * MiB)
        assert r.kind == "extended" and not r.error
        assert r.data == qemu_read(image, 0, 2 * MiB)
        # DF: exactly one content chunk, holes as explicit zeroes.
        r = c.request(Command.READ, MiB - 512, 1024, CommandFlag.DF)
        assert [t for _, t, _ in r.chunks] == [ReplyType.OFFSET_DATA]
        assert r.data == qemu_read(image, MiB - 512, 1024)

        c.write(4 * MiB, b"extended" * 512, CommandFlag.FUA)
        c.zero(4 * MiB + 4096, 4096)
        c.flush()
        assert qemu_read(image, 4 * MiB, 4096) == b"extended" * 512

        r = c.request(Command.BLOCK_STATUS, 0, SIZE)
        assert {t for _, t, _ in r.chunks} == {ReplyType.BLOCK_STATUS_EXT}
        status = {c.contexts[k]: v for k, v in r.extents.items()}
        alloc = status["base:allocation"]
        sectors = [s for n, s in alloc for _ in range(n // 512)]
        assert sectors == qemu_map(image)[: len(sectors)]
        assert set(status) == {"base:allocation", "qemu:allocation-depth"}
        c.disconnect()


def test_pipelined_requests_complete(served: Served, image: Path) -> None:
    with extended(served) as c:
        cookies = {}
        for i in range(16):
            off = MiB + i * 8192
            cookies[c.send_request(Command.READ, off, 8192)] = off
        got = {}
        for _ in range(16):
            r = c.recv_reply()
            got[r.cookie] = r.data
        assert set(got) == set(cookies)
        for cookie, off in cookies.items():
            assert got[cookie] == qemu_read(image, off, 8192)
        c.disconnect()


def test_errors_keep_the_stream_in_sync(served: Served) -> None:
    with extended(served) as c:
        with pytest.raises(NbdError) as ei:
            c.read(SIZE, 512)
        assert ei.value.errno == Errno.EINVAL and ei.value.message
        with pytest.raises(NbdError) as ei:
            c.write(SIZE - 1, b"xy")
        assert ei.value.errno == Errno.ENOSPC
        r = c.request(Command.READ, 0, 16, CommandFlag.PAYLOAD_LEN, b"p" * 16)
        assert r.error == Errno.EINVAL
        r = c.request(99, 0, 0)
        assert r.error == Errno.EINVAL
        assert len(c.read(0, 4096)) == 4096
        c.disconnect()


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">I", 0xDEADBEEF) + bytes(28),  # bad magic
        struct.pack(">IHHQQQ", 0x21E41C71, 0, Command.WRITE, 1, 0, 1 << 40),  # absurd payload
    ],
    ids=["bad-magic", "absurd-length"],
)
def test_malformed_requests_drop_only_that_connection(served: Served, garbage: bytes) -> None:
    with extended(served) as bad:
        bad.send_raw(garbage)
        with pytest.raises((EOFError, ConnectionError)):
            bad.recv_exact(1)
    with extended(served) as good:  # the server is still there
        assert len(good.read(0, 512)) == 512
        good.disconnect()


def test_unknown_client_flags_drop_the_connection(served: Served) -> None:
    with connect(served) as c:
        c.handshake(client_flags=0x80000003)
        with pytest.raises((EOFError, ConnectionError)):
            c.list_exports()


def test_starttls_then_extended_headers(tmp_path: Path, image: Path) -> None:
    """STARTTLS through the real server, then a full extended session over
    TLS (negotiated state before STARTTLS must not survive it)."""
    certs = make_ca(tmp_path / "tls")
    s = serve(tmp_path, image, transport="unix", tls_dir=str(certs), tls_mode="optional")
    try:
        ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
        ctx.load_cert_chain(str(certs / "client-cert.pem"), str(certs / "client-key.pem"))
        with connect(s) as c:
            c.handshake()
            c.structured_reply()
            c.starttls(ctx, server_hostname="localhost")
            assert c.list_exports()[0][0] == "disk"
            c.extended_headers()
            c.set_meta_context("disk", ["base:allocation"])
            c.go("disk")
            assert c.read(MiB, 4096) == qemu_read(image, MiB, 4096)
            status = c.block_status(0, 2 * MiB)["base:allocation"]
            sectors = [x for n, x in status for _ in range(n // 512)]
            assert sectors == qemu_map(image)[: len(sectors)]
            c.disconnect()
    finally:
        assert s.stop() == 0, s.stderr()

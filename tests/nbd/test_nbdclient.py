"""The test client against a reference server, and our core against it: ``tests/nbdclient.py`` talks
to qemu-nbd over a real Unix socket, so that what it reports (and what the
core's tests conclude from it) is checked against another implementation.

The differential tests send the same (often malformed) options to qemu-nbd
and to our core and expect the same answer.

qemu-nbd 7.2 predates extended headers, so negotiating them must fail with
``ERR_UNSUP`` and the client must fall back, as qemu's own client does.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdqcow.nbd import (
    Command,
    CommandFlag,
    Errno,
    InfoType,
    Option,
    OptionReply,
    TransmissionFlag,
)
from tests.nbd.helpers import Disk, memory_client
from tests.nbdclient import NbdClient, NbdError, OptionError
from tests.tools import require

pytestmark = pytest.mark.interop

MiB = 1 << 20


@contextlib.contextmanager
def _serve_with_qemu_nbd(tmp_path: Path, size: str) -> Iterator[tuple[str, Path]]:
    """qemu-nbd on a Unix socket over a sparse raw image of ``size``, with
    64 KiB of data at 1 MiB (holes and data for reads and status)."""
    qemu_img = require("qemu-img")
    qemu_io = require("qemu-io")
    binary = require("qemu-nbd")
    image = tmp_path / "disk.raw"
    subprocess.run(
        [qemu_img, "create", "-f", "raw", str(image), size], check=True, capture_output=True
    )
    subprocess.run(
        [qemu_io, "-f", "raw", "-c", "write -P 0xab 1M 64k", str(image)],
        check=True,
        capture_output=True,
    )
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen(
        [
            binary,
            "-f",
            "raw",
            "-k",
            sock,
            "-x",
            "disk",
            "-D",
            "test disk",
            "-A",
            "-t",
            "--shared=0",
            str(image),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"qemu-nbd did not start: {err}")
            time.sleep(0.02)
        yield sock, image
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def qemu_nbd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with _serve_with_qemu_nbd(tmp_path_factory.mktemp("qemu-nbd"), "4M") as served:
        yield served


@pytest.fixture(scope="module")
def big_qemu_nbd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """64 MiB, so that lengths above the 32 MiB maximum block are in range."""
    with _serve_with_qemu_nbd(tmp_path_factory.mktemp("qemu-nbd-big"), "64M") as served:
        yield served


def _qemu_map(image: Path) -> list[tuple[int, int]]:
    """``qemu-img map`` as base:allocation (length, flags) pairs."""
    out = subprocess.run(
        [require("qemu-img"), "map", "--output=json", "-f", "raw", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [
        (e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0)) for e in json.loads(out)
    ]


def _flatten(extents: list[tuple[int, int]]) -> list[int]:
    """Status per 512-byte sector, to compare extent lists however merged."""
    return [s for n, s in extents for _ in range(n // 512)]


def test_structured_session_against_qemu_nbd(qemu_nbd: tuple[str, Path]) -> None:
    sock, image = qemu_nbd
    with NbdClient.connect_unix(sock) as c:
        c.handshake()
        with pytest.raises(OptionError) as ei:
            c.extended_headers()
        assert ei.value.reply == OptionReply.ERR_UNSUP
        c.extended = False  # fall back, as qemu's client does
        c.structured_reply()
        assert c.list_exports() == [("disk", "test disk")]
        listed = c.list_meta_context("disk", [])
        assert {"base:allocation", "qemu:allocation-depth"} <= set(listed)
        c.set_meta_context("disk", ["base:allocation", "qemu:allocation-depth"])
        info = c.go("disk")
        assert info.size == 4 * MiB and info.name == "disk"
        assert info.flags & TransmissionFlag.SEND_DF

        assert c.read(MiB - 512, 1024) == bytes(512) + b"\xab" * 512
        assert c.read(MiB, 4096, CommandFlag.DF) == b"\xab" * 4096
        status = c.block_status(0, 4 * MiB)
        alloc = status["base:allocation"]
        covered = sum(n for n, _ in alloc)
        assert 0 < covered <= 4 * MiB
        sectors = covered // 512
        assert _flatten(alloc)[:sectors] == _flatten(_qemu_map(image))[:sectors]
        assert {d for _, d in status["qemu:allocation-depth"]} <= {0, 1}

        c.write(2 * MiB, b"nbdclient" * 100)
        c.flush()
        with pytest.raises(NbdError) as e2:
            c.read(4 * MiB, 512)
        assert e2.value.errno == Errno.EINVAL
        assert e2.value.message  # structured errors carry qemu's message
        c.disconnect()
    assert image.read_bytes()[2 * MiB : 2 * MiB + 900] == b"nbdclient" * 100


def test_simple_session_against_qemu_nbd(qemu_nbd: tuple[str, Path]) -> None:
    sock, _ = qemu_nbd
    with NbdClient.connect_unix(sock) as c:
        c.handshake(client_flags=1)  # fixed newstyle, without NO_ZEROES
        info = c.export_name("disk")  # checks the 124 zero bytes
        assert info.size == 4 * MiB
        assert c.read(MiB, 16) == b"\xab" * 16
        with pytest.raises(NbdError):
            c.read(4 * MiB, 1)
        c.disconnect()


def test_unknown_option_against_qemu_nbd(qemu_nbd: tuple[str, Path]) -> None:
    sock, _ = qemu_nbd
    with NbdClient.connect_unix(sock) as c:
        c.handshake()
        with pytest.raises(OptionError) as ei:
            c.option(0x7654321, b"data")
        assert ei.value.reply == OptionReply.ERR_UNSUP
        with pytest.raises(OptionError) as ei:
            c.option(Option.SET_META_CONTEXT, c.meta_payload("disk", ["base:allocation"]))
        assert ei.value.reply == OptionReply.ERR_INVALID  # needs structured replies first
        c.abort()


# --- differential: the same option, to qemu-nbd and to our core ---------------

INFO, META = NbdClient.info_payload, NbdClient.meta_payload
OPTION_CASES = {
    "unknown option": (0x77, b"x"),
    "unknown option of 100 KiB": (0x77, b"x" * 100_000),
    "LIST with 100 KiB": (Option.LIST, b"x" * 100_000),
    "LIST with data": (Option.LIST, b"x"),
    "STRUCTURED_REPLY with data": (Option.STRUCTURED_REPLY, b"x"),
    "SET_META_CONTEXT before SR": (Option.SET_META_CONTEXT, META("disk", ["base:allocation"])),
    "LIST_META_CONTEXT before SR": (Option.LIST_META_CONTEXT, META("disk", [])),
    "INFO without data": (Option.INFO, b""),
    "INFO name past the end": (Option.INFO, struct.pack(">I", 50) + b"disk"),
    "INFO trailing bytes": (Option.INFO, INFO("disk", []) + b"zz"),
    "INFO unknown export": (Option.INFO, INFO("nope", [])),
    "INFO NUL in name": (Option.INFO, INFO("di\0sk", [])),
    "STARTTLS without TLS": (Option.STARTTLS, b""),
    "PEEK_EXPORT": (Option.PEEK_EXPORT, b""),
    "ABORT with data": (Option.ABORT, b"x"),
}


def _outcome(c: NbdClient, option: int, data: bytes) -> str:
    try:
        return f"ACK after {len(c.option(option, data))} replies"
    except OptionError as e:
        return OptionReply(e.reply).name


def _ours() -> NbdClient:
    c, _ = memory_client(Disk.make("disk"))
    c.handshake()
    return c


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_option_answers_match_qemu_nbd(qemu_nbd: tuple[str, Path], case: str) -> None:
    option, data = OPTION_CASES[case]
    with NbdClient.connect_unix(qemu_nbd[0]) as q:
        q.handshake()
        assert _outcome(_ours(), option, data) == _outcome(q, option, data)


def test_repeated_structured_reply_matches_qemu_nbd(qemu_nbd: tuple[str, Path]) -> None:
    with NbdClient.connect_unix(qemu_nbd[0]) as q:
        q.handshake()
        ours = _ours()
        for c in (q, ours):
            c.structured_reply()
        assert _outcome(ours, Option.STRUCTURED_REPLY, b"") == _outcome(
            q, Option.STRUCTURED_REPLY, b""
        )


@pytest.mark.parametrize(
    "queries", [[], ["base:"], ["qemu:"], ["qemu:allocation-depth"], ["x:y"], ["nocolon"]]
)
def test_meta_context_queries_match_qemu_nbd(
    qemu_nbd: tuple[str, Path], queries: list[str]
) -> None:
    with NbdClient.connect_unix(qemu_nbd[0]) as q:
        q.handshake()
        q.structured_reply()
        ours = _ours()
        ours.structured_reply()
        assert sorted(ours.list_meta_context("disk", queries)) == sorted(
            q.list_meta_context("disk", queries)
        )
        assert sorted(ours.set_meta_context("disk", queries).values()) == sorted(
            q.set_meta_context("disk", queries).values()
        )


MATCHING_REQUESTS = {
    "read past the end": (Command.READ, 0, 4 * MiB, 512, b""),
    "read straddling the end": (Command.READ, 0, 4 * MiB - 512, 1024, b""),
    "trim past the end": (Command.TRIM, 0, 4 * MiB, 512, b""),
    "block status past the end": (Command.BLOCK_STATUS, 0, 4 * MiB, 512, b""),
    "block status of length 0": (Command.BLOCK_STATUS, 0, 0, 0, b""),
    "read of length 0": (Command.READ, 0, 512, 0, b""),
    "write of length 0": (Command.WRITE, CommandFlag.FUA, 512, 0, b""),
    "trim of length 0": (Command.TRIM, 0, 4 * MiB, 0, b""),
    "zeroes of length 0": (Command.WRITE_ZEROES, 0, 0, 0, b""),
    "cache of length 0": (Command.CACHE, 0, 0, 0, b""),
    "read of length 0 past the end": (Command.READ, 0, 4 * MiB + 512, 0, b""),
    "unknown command": (42, 0, 0, 512, b""),
    "unknown flag": (Command.READ, 1 << 9, 0, 512, b""),
    "REQ_ONE on a read": (Command.READ, CommandFlag.REQ_ONE, 0, 512, b""),
    "NO_HOLE on a write": (Command.WRITE, CommandFlag.NO_HOLE, 0, 4, b"abcd"),
    "FUA on a read": (Command.READ, CommandFlag.FUA, 0, 512, b""),
    "flush with an offset": (Command.FLUSH, 0, 5, 5, b""),
    "read over 32 MiB": (Command.READ, 0, 0, 33 * MiB, b""),
}


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("case", sorted(MATCHING_REQUESTS))
def test_request_errors_match_qemu_nbd(
    qemu_nbd: tuple[str, Path], case: str, structured: bool
) -> None:
    command, flags, offset, length, payload = MATCHING_REQUESTS[case]
    errors = []
    with NbdClient.connect_unix(qemu_nbd[0]) as q:
        ours, _ = memory_client(Disk.make("disk", size=4 * MiB, cache=True))
        for c in (q, ours):
            c.handshake()
            if structured:
                c.structured_reply()
                c.set_meta_context("disk", ["base:allocation"])
            c.go("disk")
            errors.append(c.request(command, offset, length, flags, payload).error)
    assert errors[1] == errors[0]


# Within a 64 MiB export, above the 32 MiB maximum block both servers advertise.
OVERSIZED_REQUESTS = {
    "read": (Command.READ, 0, 33 * MiB),
    "DF read": (Command.READ, CommandFlag.DF, 33 * MiB),
    "cache": (Command.CACHE, 0, 33 * MiB),
    "write zeroes": (Command.WRITE_ZEROES, 0, 48 * MiB),
    "trim": (Command.TRIM, 0, 48 * MiB),
    "block status": (Command.BLOCK_STATUS, 0, 48 * MiB),
}


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("case", sorted(OVERSIZED_REQUESTS))
def test_oversized_request_errors_match_qemu_nbd(
    big_qemu_nbd: tuple[str, Path], case: str, structured: bool
) -> None:
    command, flags, length = OVERSIZED_REQUESTS[case]
    errors = []
    with NbdClient.connect_unix(big_qemu_nbd[0]) as q:
        ours, _ = memory_client(Disk.make("disk", size=64 * MiB, cache=True))
        for c in (q, ours):
            c.handshake()
            if structured:
                c.structured_reply()
                c.set_meta_context("disk", ["base:allocation"])
            assert c.go("disk", [InfoType.BLOCK_SIZE]).block_size[2] == 32 * MiB
            errors.append(c.request(command, 0, length, flags).error)
    assert errors[1] == errors[0]

"""``validate_request``: the edge checks as a table (proto.md "Request
types", "Block size constraints", "Error values")."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdqcow.nbd.constants import Command as C
from nbdqcow.nbd.constants import CommandFlag as F
from nbdqcow.nbd.constants import Errno as E
from nbdqcow.nbd.constants import TransmissionFlag as T
from nbdqcow.nbd.validate import EMPTY_OK, ExportState, payload_length, validate_request

MiB = 1 << 20
ALL = (
    T.HAS_FLAGS
    | T.SEND_FLUSH
    | T.SEND_FUA
    | T.SEND_TRIM
    | T.SEND_WRITE_ZEROES
    | T.SEND_DF
    | T.SEND_CACHE
    | T.SEND_FAST_ZERO
)
RW = ExportState(
    size=MiB, flags=ALL, min_block=1, max_payload=64 * 1024, structured=True, meta_contexts=1
)
RO = replace(RW, flags=ALL | T.READ_ONLY)
BARE = ExportState(size=MiB, flags=T.HAS_FLAGS)
ALIGNED = replace(RW, min_block=512, size=MiB + 100)
EXT = replace(RW, extended=True)

# (id, command, flags, offset, length, export, expected errno or None)
TABLE = [
    ("read ok", C.READ, 0, 0, 4096, RW, None),
    ("write ok", C.WRITE, F.FUA, 0, 4096, RW, None),
    ("flush ok", C.FLUSH, 0, 0, 0, RW, None),
    ("flush ignores range", C.FLUSH, 0, 5, 7, RW, None),
    ("trim ok", C.TRIM, 0, 0, MiB, RW, None),
    ("zero no-hole fast", C.WRITE_ZEROES, F.NO_HOLE | F.FAST_ZERO, 0, MiB, RW, None),
    ("cache ok", C.CACHE, 0, 0, 512, RW, None),
    ("block status req-one", C.BLOCK_STATUS, F.REQ_ONE, 0, MiB, RW, None),
    ("fua accepted on read", C.READ, F.FUA, 0, 1, RW, None),
    ("df read", C.READ, F.DF, 0, 4096, RW, None),
    # 1. command
    ("unknown command", 42, 0, 0, 1, RW, E.EINVAL),
    ("resize unsupported", C.RESIZE, 0, 0, 0, RW, E.EINVAL),
    # 2. flags
    ("unknown flag bit", C.READ, 1 << 9, 0, 1, RW, E.EINVAL),
    ("no-hole on write", C.WRITE, F.NO_HOLE, 0, 1, RW, E.EINVAL),
    ("req-one on read", C.READ, F.REQ_ONE, 0, 1, RW, E.EINVAL),
    ("df on write", C.WRITE, F.DF, 0, 1, RW, E.EINVAL),
    ("df not advertised", C.READ, F.DF, 0, 1, replace(RW, flags=ALL & ~T.SEND_DF), E.EINVAL),
    ("fua not advertised", C.WRITE, F.FUA, 0, 1, replace(RW, flags=ALL & ~T.SEND_FUA), E.EINVAL),
    (
        "fast zero not advertised",
        C.WRITE_ZEROES,
        F.FAST_ZERO,
        0,
        1,
        replace(RW, flags=ALL & ~T.SEND_FAST_ZERO),
        E.EINVAL,
    ),
    ("payload-len without extended headers", C.WRITE, F.PAYLOAD_LEN, 0, 1, RW, E.EINVAL),
    ("payload-len write extended", C.WRITE, F.PAYLOAD_LEN, 0, 1, EXT, None),
    ("payload on a read", C.READ, F.PAYLOAD_LEN, 0, 1, EXT, E.EINVAL),
    # 3. read-only
    ("write read-only", C.WRITE, 0, 0, 1, RO, E.EPERM),
    ("trim read-only", C.TRIM, 0, 0, 1, RO, E.EPERM),
    ("zero read-only", C.WRITE_ZEROES, 0, 0, 1, RO, E.EPERM),
    ("write read-only past end", C.WRITE, 0, MiB, 1, RO, E.EPERM),
    ("read read-only", C.READ, 0, 0, 1, RO, None),
    # 4. not advertised
    ("flush not advertised", C.FLUSH, 0, 0, 0, BARE, E.EINVAL),
    ("trim not advertised", C.TRIM, 0, 0, 1, BARE, E.EINVAL),
    ("zero not advertised", C.WRITE_ZEROES, 0, 0, 1, BARE, E.EINVAL),
    ("cache not advertised", C.CACHE, 0, 0, 1, BARE, E.EINVAL),
    ("block status without SR", C.BLOCK_STATUS, 0, 0, 1, BARE, E.EINVAL),
    (
        "block status without context",
        C.BLOCK_STATUS,
        0,
        0,
        1,
        replace(RW, meta_contexts=0),
        E.EINVAL,
    ),
    # 6. zero length
    # (valid no-ops answered by the connection itself, as qemu-nbd does)
    ("zero-length read", C.READ, 0, 0, 0, RW, None),
    ("zero-length write", C.WRITE, 0, 0, 0, RW, None),
    ("zero-length write at the end", C.WRITE, 0, MiB, 0, RW, None),
    ("zero-length write past the end", C.WRITE, 0, MiB + 1, 0, RW, E.ENOSPC),
    ("zero-length write read-only", C.WRITE, 0, 0, 0, RO, E.EPERM),
    ("zero-length unaligned", C.TRIM, 0, 100, 0, ALIGNED, E.EINVAL),
    ("zero-length block status", C.BLOCK_STATUS, 0, 0, 0, RW, E.EINVAL),
    # 7. range
    ("read past end", C.READ, 0, MiB - 1, 2, RW, E.EINVAL),
    ("read at end", C.READ, 0, MiB, 1, RW, E.EINVAL),
    ("read huge offset", C.READ, 0, 2**64 - 1, 1, RW, E.EINVAL),
    ("write past end", C.WRITE, 0, MiB - 1, 2, RW, E.ENOSPC),
    ("zero past end", C.WRITE_ZEROES, 0, MiB, 1, RW, E.ENOSPC),
    ("trim past end", C.TRIM, 0, MiB, 1, RW, E.EINVAL),
    ("block status past end", C.BLOCK_STATUS, 0, 0, MiB + 1, RW, E.EINVAL),
    ("read last byte", C.READ, 0, MiB - 1, 1, RW, None),
    # 8. alignment
    ("aligned read", C.READ, 0, 512, 1024, ALIGNED, None),
    ("unaligned offset", C.READ, 0, 100, 512, ALIGNED, E.EINVAL),
    ("unaligned length", C.WRITE, 0, 0, 100, ALIGNED, E.EINVAL),
    ("unaligned tail to the end", C.READ, 0, MiB, 100, ALIGNED, None),
    ("unaligned trim", C.TRIM, 0, 1, 512, ALIGNED, E.EINVAL),
    ("block status may be unaligned", C.BLOCK_STATUS, 0, 1, 3, ALIGNED, None),
    # 9. payload size
    ("read over max", C.READ, 0, 0, 64 * 1024 + 1, RW, E.EINVAL),
    ("df read over max", C.READ, F.DF, 0, 64 * 1024 + 1, RW, E.EINVAL),
    ("cache over max", C.CACHE, 0, 0, 64 * 1024 + 1, RW, E.EINVAL),
    ("zero over max is an effect length", C.WRITE_ZEROES, 0, 0, MiB, RW, None),
    ("block status over max is an effect length", C.BLOCK_STATUS, 0, 0, MiB, RW, None),
    ("write over max", C.WRITE, 0, 0, 64 * 1024 + 1, RW, E.EINVAL),
    ("trim over max is an effect length", C.TRIM, 0, 0, MiB, RW, None),
]


@pytest.mark.parametrize(
    ("command", "flags", "offset", "length", "export", "expected"),
    [t[1:] for t in TABLE],
    ids=[t[0] for t in TABLE],
)
def test_table(
    command: int, flags: int, offset: int, length: int, export: ExportState, expected: E | None
) -> None:
    got = validate_request(command, flags, offset, length, export)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.errno is expected
        assert got.message  # every rejection says why


def test_messages_name_the_values() -> None:
    got = validate_request(C.WRITE, 0, MiB - 1, 2, RW)
    assert got is not None
    assert "NBD_CMD_WRITE" in got.message and str(MiB - 1) in got.message


def test_payload_length() -> None:
    assert payload_length(C.WRITE, 0, 512, extended=False) == 512
    assert payload_length(C.WRITE, 0, 512, extended=True) == 512
    assert payload_length(C.READ, 0, 512, extended=False) == 0
    assert payload_length(C.READ, F.PAYLOAD_LEN, 512, extended=False) == 0
    assert payload_length(C.BLOCK_STATUS, F.PAYLOAD_LEN, 16, extended=True) == 16


@given(
    command=st.integers(0, 0xFFFF),
    flags=st.integers(0, 0xFFFF),
    offset=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**64 - 1),
    export=st.sampled_from([RW, RO, BARE, ALIGNED, EXT]),
)
def test_accepted_requests_are_safe(
    command: int, flags: int, offset: int, length: int, export: ExportState
) -> None:
    """Whatever is accepted is in range, aligned and allowed: the backend can
    trust it (ARCHITECTURE.md 8.1: validate at the edge, assert inside)."""
    if validate_request(command, flags, offset, length, export) is not None:
        return
    assert command in (C.READ, C.WRITE, C.FLUSH, C.TRIM, C.CACHE, C.WRITE_ZEROES, C.BLOCK_STATUS)
    if command != C.FLUSH:
        assert offset + length <= export.size
        # Only these may be empty; the connection answers them itself.
        assert length > 0 or command in EMPTY_OK
    if command in (C.WRITE, C.TRIM, C.WRITE_ZEROES):
        assert not export.flags & T.READ_ONLY
    if command in (C.READ, C.WRITE, C.CACHE):
        assert length <= export.max_payload
        if export.min_block > 1:
            assert offset % export.min_block == 0

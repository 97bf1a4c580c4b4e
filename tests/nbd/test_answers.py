"""``ExportInfo``: capabilities to transmission flags (proto.md
"Transmission flags") and the block-size policy."""

from __future__ import annotations

import pytest

from nbdqcow.backends.base import Capabilities
from nbdqcow.nbd import ALLOCATION_DEPTH, BASE_ALLOCATION, ExportInfo
from nbdqcow.nbd import TransmissionFlag as T

ALWAYS = T.HAS_FLAGS


@pytest.mark.parametrize(
    ("caps", "structured", "expected"),
    [
        (
            Capabilities(read_only=True, flush=False, fua=False, multi_conn=False),
            False,
            ALWAYS | T.READ_ONLY,
        ),
        # write-type commands are never advertised on a read-only export
        (
            Capabilities(read_only=True, trim=True, zero=True, fast_zero=True, multi_conn=False),
            False,
            ALWAYS | T.READ_ONLY | T.SEND_FLUSH | T.SEND_FUA,
        ),
        (
            Capabilities(read_only=False, trim=True, zero=True, fast_zero=True, cache=True),
            True,
            ALWAYS
            | T.SEND_FLUSH
            | T.SEND_FUA
            | T.SEND_TRIM
            | T.SEND_WRITE_ZEROES
            | T.SEND_FAST_ZERO
            | T.SEND_DF
            | T.CAN_MULTI_CONN
            | T.SEND_CACHE,
        ),
        # FAST_ZERO only together with WRITE_ZEROES
        (
            Capabilities(read_only=False, zero=False, fast_zero=True, rotational=True),
            False,
            ALWAYS | T.SEND_FLUSH | T.SEND_FUA | T.ROTATIONAL | T.CAN_MULTI_CONN,
        ),
    ],
)
def test_transmission_flags(caps: Capabilities, structured: bool, expected: T) -> None:
    assert ExportInfo("x", 512, caps).transmission_flags(structured) == expected


def test_df_only_with_structured_replies() -> None:
    # "MUST leave this flag clear if structured replies have not been negotiated"
    info = ExportInfo("x", 512, Capabilities(read_only=False))
    assert not info.transmission_flags(False) & T.SEND_DF
    assert info.transmission_flags(True) & T.SEND_DF


def test_contexts() -> None:
    assert ExportInfo("x", 1, Capabilities(read_only=True)).contexts == (
        BASE_ALLOCATION,
        ALLOCATION_DEPTH,
    )
    assert ExportInfo("x", 1, Capabilities(read_only=True, extents=False)).contexts == ()
    only = ExportInfo("x", 1, Capabilities(read_only=True), meta_contexts=(BASE_ALLOCATION,))
    assert only.contexts == (BASE_ALLOCATION,)


@pytest.mark.parametrize(
    ("min_block", "override", "needed"),
    [
        (1, None, False),
        (512, None, False),
        (4096, None, True),
        (4096, False, False),
        (1, True, True),
    ],
)
def test_block_size_policy(min_block: int, override: bool | None, needed: bool) -> None:
    caps = Capabilities(read_only=True, min_block=min_block)
    assert ExportInfo("x", 1, caps, require_block_size=override).needs_block_size is needed

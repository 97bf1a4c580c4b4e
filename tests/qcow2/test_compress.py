"""Cluster decompression (nbdqcow.qcow2.compress)."""

from __future__ import annotations

import os
import zlib

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2.compress import compress_cluster, decompress_cluster


@settings(max_examples=30)
@given(ctype=st.sampled_from([0, 1]), bits=st.integers(9, 16), data=st.data())
def test_round_trip_with_trailing_garbage(ctype: int, bits: int, data: st.DataObject) -> None:
    cs = 1 << bits
    clear = data.draw(st.binary(min_size=cs, max_size=cs) | st.just(bytes(cs)))
    packed = compress_cluster(clear, ctype)
    # The sector-rounded read carries bytes of whatever follows.
    junk = data.draw(st.binary(max_size=511))
    assert decompress_cluster(packed + junk, cs, ctype) == clear


def test_zstd_across_frames() -> None:
    cs = 65536
    clear = os.urandom(cs // 2) + bytes(cs // 2)
    c = zstandard.ZstdCompressor()
    two = c.compress(clear[: cs // 3]) + c.compress(clear[cs // 3 :])
    assert decompress_cluster(two, cs, 1) == clear


@pytest.mark.parametrize("ctype", [0, 1])
def test_bomb_is_bounded(ctype: int) -> None:
    big = bytes(64 * 1024 * 1024)
    packed = compress_cluster(big, ctype) if ctype else zlib.compress(big)[2:-4]
    # A stream that would inflate to 64 MiB yields exactly one cluster.
    assert len(decompress_cluster(packed, 65536, ctype)) == 65536


@pytest.mark.parametrize("ctype", [0, 1])
def test_short_stream_is_corrupt(ctype: int) -> None:
    with pytest.raises(CorruptImage, match="decompresses to 100 bytes"):
        decompress_cluster(compress_cluster(bytes(100), ctype), 4096, ctype, where=" X")


@pytest.mark.parametrize("ctype", [0, 1])
def test_garbage_is_corrupt(ctype: int) -> None:
    with pytest.raises(CorruptImage, match="compressed cluster X"):
        decompress_cluster(b"\xff" * 64, 4096, ctype, where=" X")

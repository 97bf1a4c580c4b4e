"""Header parsing and packing (nbdqcow.qcow2.layout)."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdqcow.errors import CorruptImage, UnsupportedImage
from nbdqcow.qcow2.layout import (
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_DATA_FILE,
    FeatureType,
    Header,
    HeaderExtension,
    IncompatFeature,
)
from tests.qcow2.conftest import Built
from tests.qcow2.imagegen import CASES


@pytest.mark.parametrize("case", [*CASES[::2], CASES[-1]], ids=lambda c: c.name)
def test_pack_is_the_exact_inverse_of_unpack_for_qemu_images(built: Built, case: object) -> None:
    path, _ = built(case)  # type: ignore[arg-type]
    raw = path.read_bytes()[: 2 * 1024 * 1024]
    h = Header.unpack(raw)
    packed = h.pack()
    assert packed == raw[: len(packed)]
    assert Header.unpack(packed) == h
    # What follows the packed bytes in cluster 0 is padding.
    assert not any(raw[len(packed) : h.cluster_size])


def test_known_extensions_decoded(built: Built) -> None:
    by = {c.name: c for c in CASES}
    h = Header.unpack(built(by["bitmaps"])[0].read_bytes()[:65536])
    assert h.bitmaps is not None and h.bitmaps.nb_bitmaps == 2
    assert h.feature_name(FeatureType.INCOMPATIBLE, 0) == "dirty bit"
    h = Header.unpack(built(by["data-file-raw"])[0].read_bytes()[:65536])
    assert h.data_file == b"img.data" and h.has_data_file
    assert h.autoclear_features & 2
    h = Header.unpack(built(by["chain-raw"])[0].read_bytes()[:65536])
    assert h.backing_file == b"mid.qcow2" and h.backing_format == "qcow2"
    h = Header.unpack(built(by["zstd"])[0].read_bytes()[:65536])
    assert h.compression_type == 1 and h.incompatible_features & IncompatFeature.COMPRESSION


def _v3(**kw: object) -> Header:
    base = Header(
        version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=16, size=1 << 30,
        crypt_method=0, l1_size=2, l1_table_offset=0x30000, refcount_table_offset=0x10000,
        refcount_table_clusters=1, nb_snapshots=0, snapshots_offset=0, header_length=112,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


@given(
    tail=st.binary(max_size=40).map(lambda b: b + bytes(-(len(b) + 1) % 8)),
    exts=st.lists(
        st.tuples(st.integers(1, 0xFFFF_FFFF).filter(lambda t: t not in (EXT_BITMAPS,)),
                  st.binary(max_size=60)),
        max_size=4, unique_by=lambda e: e[0],
    ),
    backing=st.none() | st.binary(min_size=1, max_size=100),
    features=st.integers(0, (1 << 64) - 1),
)  # fmt: skip
def test_pack_unpack_round_trip_keeps_unknown_fields(
    tail: bytes, exts: list[tuple[int, bytes]], backing: bytes | None, features: int
) -> None:
    h = _v3(
        header_length=105 + len(tail),
        tail=tail,
        compatible_features=features,
        autoclear_features=features >> 3,
        extensions=tuple(HeaderExtension(t, d) for t, d in exts),
        backing_file=backing,
    ).layout()
    again = Header.unpack(h.pack())
    assert again == h
    assert again.tail == tail


def test_v2_header_has_no_v3_fields() -> None:
    h = _v3(version=2, header_length=72, extensions=(HeaderExtension(EXT_BACKING_FORMAT, b"raw"),),
            backing_file=b"base.raw").layout()  # fmt: skip
    raw = h.pack()
    assert struct.unpack_from(">I", raw, 72)[0] == EXT_BACKING_FORMAT
    again = Header.unpack(raw)
    assert again.refcount_order == 4 and again.header_length == 72
    assert again.backing_format == "raw" and again.backing_file == b"base.raw"


def test_duplicate_extension_refused() -> None:
    h = _v3(extensions=(HeaderExtension(EXT_DATA_FILE, b"a"), HeaderExtension(0x99, b"b")))
    raw = bytearray(h.pack())
    raw[112 + 16 : 112 + 20] = struct.pack(">I", EXT_DATA_FILE)  # second one now duplicates
    with pytest.raises(CorruptImage, match="appears twice"):
        Header.unpack(bytes(raw))


@pytest.mark.parametrize("data", [b"", b"QFI", b"\x00" * 200, b"QFI\xfb\x00\x00\x00\x03"])
def test_short_or_foreign_input(data: bytes) -> None:
    with pytest.raises((UnsupportedImage, CorruptImage)):
        Header.unpack(data)


@given(st.binary(min_size=0, max_size=600))
def test_unpack_never_raises_anything_else(data: bytes) -> None:
    for prefix in (b"", b"QFI\xfb\x00\x00\x00\x03", b"QFI\xfb\x00\x00\x00\x02"):
        try:
            h = Header.unpack(prefix + data)
        except (UnsupportedImage, CorruptImage) as e:
            assert str(e)  # a message for the user
        else:
            assert h.version in (2, 3)

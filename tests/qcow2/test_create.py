"""``create()`` and ``nbdqcow create``: images qemu opens, checks clean and
describes with the settings we asked for."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import tools

from nbdqcow.cli import main
from nbdqcow.errors import ImageError
from nbdqcow.qcow2.create import create, parse_size


def _info(path: Path) -> dict[str, object]:
    r = subprocess.run(
        [tools.require("qemu-img"), "info", "--output=json", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out: dict[str, object] = json.loads(r.stdout)
    return out


def _check_clean(path: Path) -> None:
    r = subprocess.run(
        [tools.require("qemu-img"), "check", str(path)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


MATRIX = [
    dict(size=1 << 30),
    dict(size=0),
    dict(size=10 << 20, version=2),
    dict(size=64 << 30, cluster_size=512, refcount_bits=1),
    dict(size=1 << 40, cluster_size=2 << 20, refcount_bits=64),
    dict(size=5 << 30, cluster_size=16384, extended_l2=True, refcount_bits=8),
    dict(size=1 << 30, lazy_refcounts=True, compression_type="zstd", refcount_bits=2),
]


@pytest.mark.parametrize("kw", MATRIX, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_qemu_agrees(tmp_path: Path, kw: dict[str, object]) -> None:
    img = tmp_path / "x.qcow2"
    size = kw.pop("size")
    assert isinstance(size, int)
    create(img, size, **kw)  # type: ignore[arg-type]
    _check_clean(img)
    info = _info(img)
    assert info["virtual-size"] == size
    assert info["cluster-size"] == kw.get("cluster_size", 65536)
    spec = info["format-specific"]
    assert isinstance(spec, dict)
    data = spec["data"]
    assert data["compat"] == ("0.10" if kw.get("version") == 2 else "1.1")
    assert data["refcount-bits"] == kw.get("refcount_bits", 16)
    if kw.get("version") != 2:
        assert data["lazy-refcounts"] == kw.get("lazy_refcounts", False)
        assert data["extended-l2"] == kw.get("extended_l2", False)
        assert data["compression-type"] == kw.get("compression_type", "zlib")
    # qemu can also write into what we made.
    if size >= 128 * 1024:
        subprocess.run(
            [tools.require("qemu-io"), "-c", "write -P 0x5a 0 128k", str(img)],
            check=True, capture_output=True,
        )  # fmt: skip
        _check_clean(img)


def test_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\1" * (1 << 20))
    img = tmp_path / "top.qcow2"
    create(img, 1 << 20, backing="base.raw", backing_format="raw")
    info = _info(img)
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"
    _check_clean(img)
    r = subprocess.run(
        [tools.require("qemu-io"), "-c", "read -P 1 0 1M", str(img)], capture_output=True,
        text=True,
    )  # fmt: skip
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0


def test_refuses_existing_file(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    img.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        create(img, 1 << 20)
    assert img.read_bytes() == b"precious"


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        (dict(cluster_size=1000), "cluster_size"),
        (dict(cluster_size=4 << 20), "cluster_size"),
        (dict(refcount_bits=3), "refcount_bits"),
        (dict(refcount_bits=128), "refcount_bits"),
        (dict(version=2, refcount_bits=8), "refcount_bits"),
        (dict(version=4), "version"),
        (dict(extended_l2=True, cluster_size=4096), "extended_l2"),
        (dict(compression_type="lz4"), "compression_type"),
        (dict(backing="b.qcow2"), "backing format"),
    ],
)
def test_bad_options_named(tmp_path: Path, kw: dict[str, object], word: str) -> None:
    img = tmp_path / "x.qcow2"
    with pytest.raises(ImageError, match=word):
        create(img, 1 << 20, **kw)  # type: ignore[arg-type]
    assert not img.exists()


def test_parse_size() -> None:
    assert parse_size("1G") == 1 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("64k") == 65536
    assert parse_size("1.5K") == 1536
    assert parse_size("4096") == 4096
    for bad in ("", "x", "1Q", "-1", "0.3"):
        with pytest.raises(ImageError, match="size"):
            parse_size(bad)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.qcow2"
    assert main(["create", "-o", "cluster_size=4k,refcount_bits=8", str(base), "3M"]) == 0
    top = tmp_path / "top.qcow2"
    assert main(["create", "-b", "base.qcow2", "-F", "qcow2", str(top)]) == 0
    info = _info(top)
    assert info["virtual-size"] == 3 << 20
    assert _info(base)["cluster-size"] == 4096
    capsys.readouterr()
    assert main(["create", "-o", "bogus=1", str(tmp_path / "z.qcow2"), "1M"]) == 1
    assert "bogus" in capsys.readouterr().err
    assert main(["create", str(base), "1M"]) == 1
    assert "exists" in capsys.readouterr().err

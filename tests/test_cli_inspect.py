"""``nbdqcow info``, ``map`` and ``convert`` run as real subprocesses and
compared with qemu-img on qemu-made images."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.qcow2.conftest import Built, built  # noqa: F401  (fixture)
from tests.qcow2.imagegen import CASES, MiB, create, qemu_img, qemu_io, qemu_map

BY_NAME = {c.name: c for c in CASES}


def nbdqcow(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "nbdqcow", *map(str, args)],
                       capture_output=True, text=True)  # fmt: skip
    if check:
        assert r.returncode == 0, r.stderr
    return r


def qemu_info(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(qemu_img("info", "--output=json", path))
    return out


INFO_KEYS = ["virtual-size", "cluster-size", "format", "dirty-flag", "backing-filename",
             "backing-filename-format"]  # fmt: skip
SNAP_KEYS = ["id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec",
             "vm-clock-nsec"]  # fmt: skip


@pytest.mark.parametrize("name", ["v2", "zstd", "extl2", "chain-raw", "snapshots", "bitmaps",
                                  "data-file-raw", "refcount1"])  # fmt: skip
def test_info_json_matches_qemu(built: Built, name: str) -> None:  # noqa: F811
    path, _ = built(BY_NAME[name])
    ours = json.loads(nbdqcow("info", "--json", path).stdout)
    theirs = qemu_info(path)
    for k in INFO_KEYS:
        assert ours.get(k) == theirs.get(k), k
    assert ours["format-specific"] == theirs["format-specific"]
    assert [{k: s[k] for k in SNAP_KEYS} for s in ours.get("snapshots", [])] == [
        {k: s[k] for k in SNAP_KEYS} for s in theirs.get("snapshots", [])
    ]
    if "backing-filename" in theirs:
        assert ours["backing-image"]["format"] == theirs["backing-filename-format"]


def test_info_human(built: Built) -> None:  # noqa: F811
    path, _ = built(BY_NAME["snapshots"])
    out = nbdqcow("info", path).stdout
    assert "file format: qcow2" in out
    assert "virtual size: 6 MiB (6291456 bytes)" in out
    assert "s1" in out and "s2" in out and "compat: 1.1" in out


def test_info_reports_refused_backing(tmp_path: Path) -> None:
    img = create(tmp_path / "img.qcow2", MiB)
    qemu_img("rebase", "-u", "-b", "/etc/passwd", "-F", "raw", img)
    r = nbdqcow("info", "--json", img)
    info = json.loads(r.stdout)
    assert info["backing-filename"] == "/etc/passwd"
    assert "outside" in info["backing-refused"]
    assert "backing-image" not in info


def _normal(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # qemu reports an offset for the holes of a raw layer too; only the
    # offsets of data matter.
    return [{k: v for k, v in e.items() if k != "offset" or e["data"]} for e in entries]


@pytest.mark.parametrize("name", ["v3-c4k", "zlib", "extl2", "chain-raw", "chain-qcow2",
                                  "short-backing", "data-file"])  # fmt: skip
def test_map_json_matches_qemu(built: Built, name: str) -> None:  # noqa: F811
    path, _ = built(BY_NAME[name])
    ours = json.loads(nbdqcow("map", "--json", path).stdout)
    assert _normal(ours) == _normal(qemu_map(path))


def test_map_json_of_preallocated_image_matches_qemu(tmp_path: Path) -> None:
    # Allocated clusters over host holes read as zeroes: data and zero.
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, "8M")
    qemu_io(img, f"write -P 7 {MiB} 64k")
    ours = json.loads(nbdqcow("map", "--json", img).stdout)
    assert ours == qemu_map(img)
    assert [e["zero"] for e in ours] == [True, False, True]


def test_map_human(built: Built) -> None:  # noqa: F811
    path, _ = built(BY_NAME["chain-qcow2"])
    lines = nbdqcow("map", path).stdout.splitlines()
    assert lines[0].split()[:4] == ["Offset", "Length", "Depth", "Type"]
    assert any(" data " in line for line in lines) and any(" zero " in line for line in lines)


@pytest.mark.parametrize(("name", "snap"), [("extl2", None), ("zstd", None),
                                            ("snapshots", "s1")])  # fmt: skip
def test_convert_equals_qemu(built: Built, name: str, snap: str | None,  # noqa: F811
                             tmp_path: Path) -> None:  # fmt: skip
    case = next(c for c in CASES if c.name == name)
    path, _ = built(case)
    expected = tmp_path / "qemu.raw"
    args = ["convert", "-O", "raw"] + (["-l", f"snapshot.name={snap}"] if snap else [])
    qemu_img(*args, path, expected)
    out = tmp_path / "out.raw"
    extra = ["-l", snap] if snap else []
    r = nbdqcow("convert", *extra, path, out)
    assert r.stderr == ""  # no progress bar without a terminal
    assert out.read_bytes() == expected.read_bytes()


def test_convert_is_sparse(tmp_path: Path) -> None:
    img = create(tmp_path / "img.qcow2", 64 * MiB)
    qemu_io(img, "write -P 1 0 1M", f"write -P 2 {63 * MiB} 1M")
    out = tmp_path / "out.raw"
    nbdqcow("convert", img, out)
    assert out.stat().st_size == 64 * MiB
    assert out.stat().st_blocks * 512 <= 4 * MiB


def test_convert_skips_zero_blocks_inside_data(tmp_path: Path) -> None:
    # Metadata preallocation: every cluster is "data", almost all of it zero.
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, "16M")
    qemu_io(img, "write -P 7 1000 5000", f"write -P 8 {9 * MiB} 4096")
    out, ref = tmp_path / "out.raw", tmp_path / "ref.raw"
    nbdqcow("convert", img, out)
    qemu_img("convert", "-O", "raw", img, ref)
    assert out.read_bytes() == ref.read_bytes()
    # Only the 4 KiB blocks holding the two writes (1000..6000: two blocks).
    assert out.stat().st_blocks * 512 <= 3 * 4096 + 8192


def test_convert_progress_on_a_terminal(tmp_path: Path) -> None:
    img = create(tmp_path / "img.qcow2", 8 * MiB)
    qemu_io(img, "write -P 1 0 8M")
    primary, secondary = pty.openpty()
    try:
        cmd = [sys.executable, "-m", "nbdqcow", "convert", str(img), str(tmp_path / "o.raw")]
        r = subprocess.run(cmd, stderr=secondary, stdout=subprocess.PIPE)
        os.close(secondary)
        assert r.returncode == 0
        text = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            text += chunk
    finally:
        os.close(primary)
    assert b"100.0/100%" in text


@pytest.mark.parametrize("cmd", ["info", "map", "convert"])
def test_errors_are_one_line(tmp_path: Path, cmd: str) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + (7).to_bytes(4, "big") + bytes(200))
    args: list[str | Path] = [cmd, "-f", "qcow2", bad] + ([tmp_path / "o.raw"] if cmd == "convert"
                                                           else [])  # fmt: skip
    r = nbdqcow(*args, check=False)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "version 7" in r.stderr


def test_convert_refuses_refused_backing(tmp_path: Path) -> None:
    img = create(tmp_path / "img.qcow2", MiB)
    qemu_img("rebase", "-u", "-b", "/etc/passwd", "-F", "raw", img)
    r = nbdqcow("convert", img, tmp_path / "o.raw", check=False)
    assert r.returncode == 1 and "outside" in r.stderr and "Traceback" not in r.stderr
    # Allow-listing the directory is the operator's explicit choice.
    r = nbdqcow("map", "--json", "--allow-dir", "/etc", img, check=False)
    assert r.returncode == 0

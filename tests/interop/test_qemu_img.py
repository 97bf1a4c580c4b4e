"""qemu-img over NBD: convert in and out, compare, and ``map`` (which reads
``base:allocation`` block status) must agree with the image file itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests import tools
from tests.interop.harness import Served, run


def _runs(entries: list[dict[str, Any]]) -> list[tuple[int, int, bool, bool]]:
    """(start, length, data, zero), with neighbours of equal status merged:
    qemu may split a run differently over NBD than on a file."""
    out: list[tuple[int, int, bool, bool]] = []
    for e in entries:
        key = (bool(e["data"]), bool(e["zero"]))
        if out and (out[-1][2], out[-1][3]) == key and out[-1][0] + out[-1][1] == e["start"]:
            s, n, d, z = out[-1]
            out[-1] = (s, n + e["length"], d, z)
        else:
            out.append((e["start"], e["length"], *key))
    return out


def qemu_map(target: str, fmt: str = "raw") -> list[tuple[int, int, bool, bool]]:
    qemu_img = tools.require("qemu-img")
    r = run([qemu_img, "map", "-f", fmt, "--output=json", target])
    return _runs(json.loads(r.stdout))


def test_map_over_nbd_equals_map_of_file(served: Served, raw_image: Path) -> None:
    over_nbd = qemu_map(served.uri())
    of_file = qemu_map(str(raw_image))
    assert over_nbd == of_file
    # and it is not trivially "all data": the fixture has holes
    assert any(not d for _, _, d, _ in of_file)


def test_convert_out_and_compare(served: Served, raw_image: Path, tmp_path: Path) -> None:
    qemu_img = tools.require("qemu-img")
    copy = tmp_path / "copy.qcow2"
    run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", served.uri(), str(copy)])
    run([qemu_img, "compare", "-f", "raw", "-F", "qcow2", str(raw_image), str(copy)])
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", served.uri(), str(raw_image)])


def test_convert_into_export(served: Served, raw_image: Path, tmp_path: Path) -> None:
    qemu_img = tools.require("qemu-img")
    qemu_io = tools.require("qemu-io")
    src = tmp_path / "src.qcow2"
    run([qemu_img, "create", "-f", "qcow2", str(src), str(raw_image.stat().st_size)])
    run([qemu_io, "-f", "qcow2", "-c", "write -P 0x77 512k 300k", "-c", "write -z 0 64k",
         "-c", "write -P 0x78 6M 1M", str(src)])
    # -n: the target exists (it is the export); the zero/hole areas of src
    # become WRITE_ZEROES requests, the rest WRITEs.
    run([qemu_img, "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), served.uri()])
    run([qemu_img, "compare", "-f", "qcow2", "-F", "raw", str(src), served.uri()])
    assert served.stop() == 0, served.stderr()
    run([qemu_img, "compare", "-f", "qcow2", "-F", "raw", str(src), str(raw_image)])


def test_compare_detects_difference(served: Served, tmp_path: Path) -> None:
    qemu_img = tools.require("qemu-img")
    other = tmp_path / "other.raw"
    with open(other, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    r = run([qemu_img, "compare", "-f", "raw", "-F", "raw", served.uri(), str(other)],
            check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Content mismatch at offset 0" in r.stdout

"""qcow2 images served over NBD read like the images themselves: contents
(``qemu-img compare``), allocation (``qemu-img map``) and backing-chain depth
(``qemu:allocation-depth``), for images qemu-img/qemu-io build here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import tools
from tests.interop import harness
from tests.interop.harness import run
from tests.interop.test_qemu_img import qemu_map

MiB = 1024 * 1024


def qemu_io(img: Path, fmt: str, *cmds: str) -> None:
    args = [tools.require("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run([*args, str(img)])


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """base.qcow2 <- top.qcow2 with data in both, zero clusters, a
    compressed cluster and unallocated ranges."""
    qemu_img = tools.require("qemu-img")
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "8M"])
    qemu_io(base, "qcow2", "write -P 0x11 0 1M", "write -P 0x12 4M 512k",
            "write -c -P 0x13 6M 64k")
    run([qemu_img, "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top)])
    qemu_io(top, "qcow2", "write -P 0x21 512k 1M", "write -z 4M 128k", "write -P 0x22 7M 64k")
    return top


def test_qcow2_chain_contents_and_map(tmp_path: Path, chain: Path, transport: str) -> None:
    qemu_img = tools.require("qemu-img")
    s = harness.serve(tmp_path, chain, transport=transport, fmt="qcow2", read_only=True)
    try:
        run([qemu_img, "compare", "-f", "qcow2", "-F", "raw", str(chain), s.uri()])
        assert qemu_map(s.uri()) == qemu_map(str(chain), "qcow2")
        # depth: 1 = top, 2 = base, 0 = nowhere, as qemu-nbd -A reports
        out = run([tools.require("nbdinfo"), "--map=qemu:allocation-depth", "--json",
                   s.uri()]).stdout
        got = [(r["offset"], r["length"], r["type"]) for r in json.loads(out)]
        want = _depths(chain)
        assert got == want
    finally:
        assert s.stop() == 0, s.stderr()


def _depths(img: Path) -> list[tuple[int, int, int]]:
    """qemu:allocation-depth from qemu-img map's ``depth`` field (0-based
    there, and present only for allocated ranges)."""
    r = run([tools.require("qemu-img"), "map", "-f", "qcow2", "--output=json", str(img)])
    out: list[tuple[int, int, int]] = []
    for e in json.loads(r.stdout):
        # qemu-img map: allocated ranges have data or zero set at their depth;
        # unallocated ranges at the bottom of the chain read as zero with
        # depth = chain length and no "present"
        d = e["depth"] + 1 if e.get("present", True) else 0
        if out and out[-1][2] == d and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], d)
        else:
            out.append((e["start"], e["length"], d))
    return out


def test_qcow2_writes_land_in_image(tmp_path: Path, transport: str) -> None:
    """Writable qcow2 export (needs the qcow2 write engine): skipped while the
    engine opens qcow2 read-only only."""
    qemu_img = tools.require("qemu-img")
    img = tmp_path / "rw.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(img), "4M"])
    try:
        s = harness.serve(tmp_path, img, transport=transport, fmt="qcow2")
    except AssertionError as e:
        if "read-only" in str(e) or "not supported" in str(e) or "writ" in str(e):
            pytest.skip(f"qcow2 is read-only in this build: {e}")
        raise
    try:
        out = run([tools.require("qemu-io"), "-f", "raw", "-c", "write -P 0x5c 64k 300k",
                   "-c", "write -z 1M 64k", "-c", "flush", s.uri()], check=False)
        if out.returncode != 0 or "error" in out.stdout.lower():
            pytest.skip(f"qcow2 writes not available: {out.stdout} {out.stderr}")
    finally:
        assert s.stop() == 0, s.stderr()
    run([qemu_img, "check", str(img)])
    qemu_io(img, "qcow2", "read -P 0x5c 64k 300k", "read -P 0 1M 64k")


def test_internal_snapshot_export(tmp_path: Path, transport: str) -> None:
    qemu_img = tools.require("qemu-img")
    img = tmp_path / "snap.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(img), "4M"])
    qemu_io(img, "qcow2", "write -P 0x31 0 1M")
    run([qemu_img, "snapshot", "-c", "before", str(img)])
    qemu_io(img, "qcow2", "write -P 0x32 512k 1M")
    want = tmp_path / "before.raw"
    run([qemu_img, "convert", "-l", "snapshot.name=before", "-O", "raw", str(img), str(want)])
    s = harness.serve(tmp_path, img, transport=transport, fmt="qcow2", read_only=True,
                      extra=["-l", "before"] if harness.IMPL == "nbdqcow"
                      else ["-l", "snapshot.name=before"])
    try:
        run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(want), s.uri()])
        info = json.loads(run([tools.require("nbdinfo"), "--json", s.uri()]).stdout)
        assert info["exports"][0]["is_read_only"] is True
    finally:
        assert s.stop() == 0, s.stderr()


def test_nbdcopy_into_and_out_of_qcow2(tmp_path: Path, transport: str) -> None:
    qemu_img = tools.require("qemu-img")
    nbdcopy = tools.require("nbdcopy")
    img = tmp_path / "target.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(img), "16M"])
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(16 * MiB)
        for i in range(0, 16, 3):  # data every 3 MiB, holes between
            f.seek(i * MiB)
            f.write(bytes([0x40 + i]) * (MiB // 2))
    s = harness.serve(tmp_path, img, transport=transport, fmt="qcow2")
    out = tmp_path / "out.raw"
    try:
        run([nbdcopy, "--connections=4", "--threads=4", "--flush", str(src), s.uri()])
        run([nbdcopy, "--connections=4", "--threads=4", s.uri(), str(out)])
    finally:
        assert s.stop() == 0, s.stderr()
    assert out.read_bytes() == src.read_bytes()
    run([qemu_img, "check", "-f", "qcow2", str(img)])
    run([qemu_img, "compare", "-f", "raw", "-F", "qcow2", str(src), str(img)])
    # holes stayed holes: nbdcopy zeroes (or skips) them, it does not write data
    assert qemu_map(str(img), "qcow2") == qemu_map(str(src))

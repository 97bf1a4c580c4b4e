"""libnbd's command-line clients (nbdinfo, nbdcopy) and ``nbd-client -l``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests import tools
from tests.interop import harness
from tests.interop.harness import Served, run
from tests.interop.test_qemu_img import qemu_map


def nbdinfo(*args: str) -> str:
    return run([tools.require("nbdinfo"), *args]).stdout


def test_nbdinfo_json_describes_export(served: Served, raw_image: Path) -> None:
    info = json.loads(nbdinfo("--json", served.uri()))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (exp,) = info["exports"]
    assert exp["export-name"] == "disk"
    assert exp["export-size"] == raw_image.stat().st_size
    assert set(exp["contexts"]) >= {"base:allocation", "qemu:allocation-depth"}
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache"):
        assert exp[flag] is True, flag
    assert exp["is_read_only"] is False
    assert exp["block_size_minimum"] <= 512 <= exp["block_size_maximum"]


def test_nbdinfo_map_base_allocation_matches_file(served: Served, raw_image: Path) -> None:
    rows = json.loads(nbdinfo("--map", "--json", served.uri()))
    # type bit 0 = NBD_STATE_HOLE, bit 1 = NBD_STATE_ZERO
    got = [(r["offset"], r["length"], not r["type"] & 1, bool(r["type"] & 2)) for r in rows]
    merged: list[tuple[int, int, bool, bool]] = []
    for s, n, d, z in got:
        if merged and merged[-1][2:] == (d, z):
            merged[-1] = (merged[-1][0], merged[-1][1] + n, d, z)
        else:
            merged.append((s, n, d, z))
    assert merged == qemu_map(str(raw_image))


def test_nbdinfo_map_allocation_depth(served: Served, raw_image: Path) -> None:
    out = nbdinfo("--map=qemu:allocation-depth", served.uri())
    rows = [line.split() for line in out.splitlines() if line.strip()]
    # a raw file is one layer: every byte belongs to it (depth 1, "local"),
    # holes included, exactly as qemu-nbd -A reports it.
    assert sum(int(r[1]) for r in rows) == raw_image.stat().st_size
    assert {(r[2], r[3]) for r in rows} == {("1", "local")}


def test_nbdinfo_list(served: Served) -> None:
    out = nbdinfo("--list", "--json", served.uri(""))
    names = [e["export-name"] for e in json.loads(out)["exports"]]
    assert names == ["disk"]


def test_nbd_client_list(served: Served) -> None:
    nbd_client = tools.require("nbd-client")
    r = run([nbd_client, "-l", *served.nbd_client_target()])
    assert "disk" in r.stdout.split(), r.stdout


@pytest.mark.skipif(harness.IMPL != "nbdqcow", reason="several exports per listener")
def test_several_exports_listed_and_served(tmp_path: Path, raw_image: Path,
                                            transport: str) -> None:
    other = tmp_path / "other.raw"
    other.write_bytes(b"\x42" * 65536)
    s = harness.serve(tmp_path, raw_image, transport=transport, names=("disk", "second"),
                      more_images=[other], extra=["-D", "the first disk"])
    try:
        listed = json.loads(nbdinfo("--list", "--json", s.uri("")))
        sizes = {e["export-name"]: e["export-size"] for e in listed["exports"]}
        assert sizes == {"disk": raw_image.stat().st_size, "second": 65536}
        descriptions = {e["export-name"]: e.get("description") for e in listed["exports"]}
        assert descriptions["disk"] == "the first disk"
        # the empty name selects the default (first) export
        assert json.loads(nbdinfo("--json", s.uri("")))["exports"][0]["export-size"] == \
            raw_image.stat().st_size
        out = run([tools.require("nbd-client"), "-l", *s.nbd_client_target()]).stdout
        assert {"disk", "second"} <= set(out.split())
        r = run([tools.require("nbdinfo"), "--json", s.uri("nope")], check=False)
        assert r.returncode != 0
    finally:
        assert s.stop() == 0, s.stderr()


def test_nbdcopy_out_and_in_with_four_connections(served: Served, raw_image: Path,
                                                   tmp_path: Path) -> None:
    nbdcopy = tools.require("nbdcopy")
    out = tmp_path / "out.raw"
    # nbdcopy caps connections at --threads, which defaults to the CPU count
    run([nbdcopy, "--connections=4", "--threads=4", served.uri(), str(out)])
    assert out.read_bytes() == raw_image.read_bytes()
    src = tmp_path / "src.raw"
    data = bytearray(raw_image.stat().st_size)
    for i in range(0, len(data), 1 << 20):
        data[i : i + 300000] = bytes([i >> 20 | 0x80]) * 300000
    src.write_bytes(data)
    run([nbdcopy, "--connections=4", "--threads=4", "--flush", str(src), served.uri()])
    assert served.stop() == 0, served.stderr()
    assert raw_image.read_bytes() == bytes(data)
    if harness.IMPL == "nbdqcow":
        # multi-conn is advertised, so nbdcopy really opened 4 connections
        # per copy (plus nbdcopy's first probe): each logs one line when it
        # ends, naming the export it used.
        used = len(re.findall(r"connection \d+ .* closed: .*\(export 'disk'", served.stderr()))
        assert used >= 8, served.stderr()


def test_ipv6_listener(tmp_path: Path, raw_image: Path) -> None:
    try:
        harness.free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    s = harness.serve(tmp_path, raw_image, transport="tcp6")
    try:
        info = json.loads(nbdinfo("--json", s.uri()))
        assert info["exports"][0]["export-size"] == raw_image.stat().st_size
        r = run([tools.require("qemu-io"), "-f", "raw", "-c", "read -P 0x22 1M 128k", s.uri()])
        assert "Pattern verification failed" not in r.stdout
        out = run([tools.require("nbd-client"), "-l", *s.nbd_client_target()]).stdout
        assert "disk" in out.split()
    finally:
        assert s.stop() == 0, s.stderr()
    if harness.IMPL == "nbdqcow":
        assert "listening on tcp:[::1]:" in s.stderr()

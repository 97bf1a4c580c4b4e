"""``NBD_CMD_CACHE`` on qcow2 exports: advertised, accepted by real clients,
and it really prefetches (the mapping of the range, across the backing
chain), while reads stay exact."""

from __future__ import annotations

import json
from pathlib import Path

from nbdqcow.qcow2 import open_image
from tests import tools
from tests.ops.conftest import Spawn, libnbd_snippet, run

MiB = 1 << 20


def _chain(tmp_path: Path) -> Path:
    """base.qcow2 (pattern over its first 8 MiB) <- top.qcow2 (4 MiB at 16 MiB)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 8M", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x62 16M 4M", str(top)])
    return top


async def test_cache_loads_the_mapping_of_the_whole_chain(tmp_path: Path) -> None:
    tools.require("qemu-img")
    tools.require("qemu-io")
    top = _chain(tmp_path)
    img = open_image(top, read_only=True)
    try:
        assert img.caps.cache
        backing = img.backing
        assert backing is not None and hasattr(backing, "l2_cache")
        # Nothing of the range is mapped before CACHE ...
        assert img.l2_cache.peek(img.map.l2_table_offset(0)) is None
        assert backing.l2_cache.peek(backing.map.l2_table_offset(0)) is None
        await img.cache(0, 32 * MiB)
        # ... and afterwards the tables of both layers are in their caches.
        assert img.l2_cache.peek(img.map.l2_table_offset(0)) is not None
        assert backing.l2_cache.peek(backing.map.l2_table_offset(0)) is not None
        buf = memoryview(bytearray(4096))
        await img.preadv(16 * MiB, [buf])
        assert bytes(buf) == b"\x62" * 4096
    finally:
        await img.aclose()


def test_clients_see_and_use_cache_on_qcow2(tmp_path: Path, spawn: Spawn) -> None:
    tools.require("nbdinfo")
    top = _chain(tmp_path)
    sock = str(tmp_path / "nbd.sock")
    spawn("--socket", sock, str(top), ready=sock)
    uri = f"nbd+unix:///?socket={sock}"
    (exp,) = json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"]
    assert exp["can_cache"] is True
    got = libnbd_snippet(
        "import json, sys, nbd\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "size = h.get_size(); can = h.can_cache()\n"
        "for off in range(0, size, 16 << 20): h.cache(min(16 << 20, size - off), off)\n"
        "a = h.pread(4096, 4 << 20); b = h.pread(4096, 16 << 20); c = h.pread(4096, 40 << 20)\n"
        "h.shutdown()\n"
        "print(json.dumps({'can': can,"
        " 'base': a == b'\\x61' * 4096, 'top': b == b'\\x62' * 4096,"
        " 'zero': c == bytes(4096)}))\n",
        uri)
    assert got == {"can": True, "base": True, "top": True, "zero": True}, got

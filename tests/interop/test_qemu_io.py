"""qemu-io against the server: data written over NBD reads back over NBD and
lands in the image file (checked with qemu-io on the file after the server
stopped, so the server's own read path is not the only witness)."""

from __future__ import annotations

from pathlib import Path

from tests import tools
from tests.interop.harness import Served, run


def qio(served: Served, *cmds: str, ro: bool = False, check: bool = True) -> str:
    """qemu-io over NBD; the NBD layer is always opened as a raw device."""
    qemu_io = tools.require("qemu-io")
    args = [qemu_io, "-f", "raw", *(["-r"] if ro else [])]
    for c in cmds:
        args += ["-c", c]
    r = run([*args, served.uri()], check=check)
    return r.stdout + r.stderr


def test_read_existing_patterns(served: Served) -> None:
    out = qio(served, "read -P 0x11 0 64k", "read -P 0x22 1M 128k", "read -P 0 64k 960k",
              "read -P 0 7M 1M")
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 4, out


def test_write_discard_zero_roundtrip(served: Served, raw_image: Path) -> None:
    out = qio(
        served,
        "write -P 0x5a 2M 256k",
        "write -P 0x6b -f 3M 4k",      # FUA write
        "write -z 2M 64k",             # WRITE_ZEROES, no unmap
        "write -z -n 6M 64k",          # WRITE_ZEROES with FAST_ZERO
        "write -z -u 2228224 64k",     # WRITE_ZEROES, may unmap
        "discard 1M 64k",
        "flush",
        "read -P 0 2M 64k",
        "read -P 0x5a 2162688 64k",
        "read -P 0 2228224 64k",
        "read -P 0x5a 2293760 64k",
        "read -P 0x6b 3M 4k",
        "read -P 0x22 1114112 64k",
    )
    assert "Pattern verification failed" not in out, out
    assert "error" not in out.lower(), out
    assert served.stop() == 0, served.stderr()
    # The file itself, without any server in between.  (The discarded range
    # is advisory: it may read as old data or zeroes, so it is not checked.)
    qemu_io = tools.require("qemu-io")
    r = run([qemu_io, "-f", "raw", "-c", "read -P 0 2M 64k", "-c", "read -P 0x5a 2162688 64k",
             "-c", "read -P 0 2228224 64k", "-c", "read -P 0x6b 3M 4k",
             "-c", "read -P 0x11 0 64k", str(raw_image)])
    assert "Pattern verification failed" not in r.stdout, r.stdout


def test_unaligned_and_large_io(served: Served) -> None:
    out = qio(
        served,
        "write -P 0x33 12345 77777",
        "read -P 0x33 12345 77777",
        "write -P 0x44 4M 4M",
        "read -P 0x44 4M 4M",
        "read -P 0 90122 1000",
    )
    assert "Pattern verification failed" not in out, out


def test_read_only_export_refuses_writes(tmp_path: Path, raw_image: Path,
                                          transport: str) -> None:
    from tests.interop.harness import serve

    s = serve(tmp_path, raw_image, transport=transport, read_only=True)
    try:
        out = qio(s, "read -P 0x11 0 64k", ro=True)
        assert "Pattern verification failed" not in out
        # A writable open of a read-only export is refused by qemu itself
        # (it sees NBD_FLAG_READ_ONLY): "Permission denied".
        out = qio(s, "write -P 0x99 0 4k", check=False)
        assert "Permission denied" in out, out
    finally:
        assert s.stop() == 0, s.stderr()
    qemu_io = tools.require("qemu-io")
    r = run([qemu_io, "-f", "raw", "-r", "-c", "read -P 0x11 0 64k", str(raw_image)])
    assert "Pattern verification failed" not in r.stdout

"""Differential test of the write engine against qemu.

The same seeded random sequence of writes (unaligned, cluster-crossing),
write-zeroes (with and without unmap), trims and flushes is applied to an
image through our engine and to a copy through ``qemu-io``; then
``qemu-img compare`` must find them identical, and both ``qemu-img check``
and our own check must call our image clean.  Backing files must stay
bit-for-bit unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import tools

from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.check import check_image

SIZE = 4 << 20


@dataclass(frozen=True)
class Case:
    name: str
    opts: str
    backing: str | None = None  # "qcow2" or "raw"
    prefill: tuple[str, ...] = ()
    snapshot: bool = False
    trims: bool = True


CASES = [
    Case("64k", "cluster_size=64k"),
    Case("4k-rc1", "cluster_size=4k,refcount_bits=1"),
    Case("512-rc64", "cluster_size=512,refcount_bits=64"),
    Case("v2-4k", "compat=0.10,cluster_size=4k"),
    Case("2m-rc4", "cluster_size=2M,refcount_bits=4"),
    Case(
        "extl2-2m-zstd",
        "cluster_size=2M,extended_l2=on,compression_type=zstd",
        prefill=("write -c -P 9 2M 2M",),
    ),
    Case("extl2-64k", "cluster_size=64k,extended_l2=on", prefill=("write -P 5 0 100k",)),
    Case(
        "compressed-src",
        "cluster_size=4k,refcount_bits=8",
        prefill=("write -c -P 6 0 64k", "write -c -P 7 1M 16k"),
    ),
    Case("snapshot", "cluster_size=4k", prefill=("write -P 8 0 1M",), snapshot=True),
    Case("backing-qcow2", "cluster_size=4k", backing="qcow2"),
    Case("backing-raw-v2", "compat=0.10,cluster_size=64k", backing="raw"),
    Case("backing-extl2", "cluster_size=32k,extended_l2=on", backing="qcow2"),
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([tools.require(args[0]), *args[1:]], capture_output=True, text=True)
    assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
    return r


def qemu_io(img: Path, cmds: list[str], fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = run(*args, str(img))
    assert "error" not in r.stdout.lower() and "fail" not in r.stdout.lower(), r.stdout


def ops_for(
    rng: random.Random, cluster: int, n: int, trims: bool
) -> list[tuple[str, int, int, int]]:
    """(kind, offset, length, arg) with kind in write/zero/trim/flush."""
    out = []
    for _ in range(n):
        r = rng.random()
        # Mostly near cluster boundaries, sometimes anywhere.
        if rng.random() < 0.5:
            off = rng.randrange(0, SIZE // cluster) * cluster + rng.choice(
                [0, 0, -1, 1, 511, cluster // 2]
            )
        else:
            off = rng.randrange(0, SIZE)
        off = max(0, min(off, SIZE - 1))
        length = min(
            SIZE - off,
            rng.choice([1, 512, 4096, cluster, 3 * cluster + 7, rng.randrange(1, 200_000)]),
        )
        if r < 0.6:
            out.append(("write", off, length, rng.randrange(1, 256)))
        elif r < 0.8:
            out.append(("zero", off, length, rng.randrange(2)))
        elif r < 0.92 and trims:
            out.append(("trim", off, length, 0))
        else:
            out.append(("flush", 0, 0, 0))
    return out


def qemu_cmds(ops: list[tuple[str, int, int, int]]) -> list[str]:
    out = []
    for kind, off, length, arg in ops:
        if kind == "write":
            out.append(f"write -P {arg} {off} {length}")
        elif kind == "zero":
            out.append(f"write -z {'-u ' if arg else ''}{off} {length}")
        elif kind == "trim":
            out.append(f"discard {off} {length}")
        else:
            out.append("flush")
    return out


async def apply_ours(img: Path, ops: list[tuple[str, int, int, int]]) -> None:
    im = open_image(img, read_only=False)
    try:
        for kind, off, length, arg in ops:
            if kind == "write":
                await im.pwritev(off, [memoryview(bytes([arg]) * length)])
            elif kind == "zero":
                await im.zero(off, length, may_trim=bool(arg))
            elif kind == "trim":
                await im.trim(off, length)
            else:
                await im.flush()
    finally:
        await im.aclose()


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def build(tmp_path: Path, case: Case) -> tuple[Path, Path | None]:
    img = tmp_path / "ours.qcow2"
    base: Path | None = None
    extra: list[str] = []
    if case.backing == "qcow2":
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=64k", str(base), str(SIZE))
        qemu_io(base, ["write -P 11 0 1M", "write -P 12 2M 300k", "write -c -P 13 3M 64k"])
        extra = ["-b", base.name, "-F", "qcow2"]
    elif case.backing == "raw":
        base = tmp_path / "base.raw"
        base.write_bytes(bytes(range(256)) * (SIZE // 2 // 256))  # shorter than the overlay
        extra = ["-b", base.name, "-F", "raw"]
    run("qemu-img", "create", "-f", "qcow2", "-o", case.opts, *extra, str(img), str(SIZE))
    if case.prefill:
        qemu_io(img, list(case.prefill))
    if case.snapshot:
        run("qemu-img", "snapshot", "-c", "before", str(img))
    return img, base


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_same_as_qemu(tmp_path: Path, case: Case, seed: int) -> None:
    img, base = build(tmp_path, case)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(img, theirs)
    base_hash = digest(base) if base else None
    cluster = int(
        run("qemu-img", "info", "--output=json", str(img))
        .stdout.split('"cluster-size": ')[1]
        .split(",")[0]
    )
    ops = ops_for(
        random.Random(seed * 1000 + zlib.crc32(case.name.encode()) % 1000),
        cluster,
        300 if cluster < (1 << 20) else 80,
        case.trims,
    )
    asyncio.run(apply_ours(img, ops))
    qemu_io(theirs, qemu_cmds(ops))
    r = subprocess.run([tools.require("qemu-img"), "compare", str(img), str(theirs)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([tools.require("qemu-img"), "check", str(img)], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert check_image(str(img)).exit_code == 0
    if base is not None:
        assert digest(base) == base_hash
    if case.snapshot:
        # The snapshot still holds the prefill, whatever we wrote since.
        run("qemu-img", "snapshot", "-a", "before", str(img))
        qemu_io(img, ["read -P 8 0 1M"])

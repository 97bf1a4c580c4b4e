"""Build the qcow2 test matrix with qemu-img/qemu-io (no binary fixtures).

Each builder makes one image (plus its backing or data files) in a directory
and returns the path of the image to open.  Images are small (a few MiB)
except the sparse 4 TiB one; data comes from qemu-io patterns and from a
random "pattern file" so that misplaced clusters cannot go unnoticed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import tools

KiB = 1024
MiB = 1024 * 1024


def run(*args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    r = subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed: {r.stderr.strip()}")
    return r.stdout


def _cwd(args: tuple[str | os.PathLike[str], ...]) -> Path | None:
    # qemu resolves an external data file name against its working
    # directory: run qemu tools in the directory of the image they use.
    paths = [a for a in args if isinstance(a, Path)]
    return paths[0].parent if paths else None


def qemu_img(*args: str | os.PathLike[str]) -> str:
    return run(tools.require("qemu-img"), *args, cwd=_cwd(args))


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str | os.PathLike[str]] = [tools.require("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, path, cwd=path.parent)


def create(path: Path, size: int | str, opts: str = "", *, backing: str | None = None,
           backing_fmt: str = "qcow2") -> Path:  # fmt: skip
    args: list[str | os.PathLike[str]] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    # Relative backing and data file names resolve against the image's
    # directory: run there.
    run(tools.require("qemu-img"), *args, path.name, str(size), cwd=path.parent)
    return path


def random_file(d: Path) -> Path:
    """A 4 MiB file of random bytes used as a qemu-io pattern file."""
    p = d / "random.bin"
    if not p.exists():
        p.write_bytes(random.Random(1234).randbytes(4 * MiB))
    return p


def to_raw(path: Path, out: Path, snapshot: str | None = None) -> Path:
    args: list[str | os.PathLike[str]] = ["convert", "-O", "raw"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    qemu_img(*args, path, out)
    return out


def qemu_map(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(qemu_img("map", "--output=json", path))
    return out


def std_ops(d: Path, size: int, cluster: int) -> list[str]:
    """A mix of data, zeroes (plain and allocated), holes and data at the end."""
    rnd = random_file(d)
    ops = [
        f"write -s {rnd} 0 {100 * KiB}",
        f"write -P 0x5a {300 * KiB} {64 * KiB}",
        f"write -z {512 * KiB} {128 * KiB}",
        f"write -s {rnd} {MiB + 4 * KiB} {256 * KiB}",
        f"write -z {MiB + 4 * KiB + cluster} {cluster}",  # zero over data: ZERO_ALLOC
        f"write -z -u {MiB + 4 * KiB + 3 * cluster} {cluster}",  # unmapped: ZERO_PLAIN
        f"write -P 0x33 {2 * MiB + 512} {3 * 512}",  # partial cluster
        f"write -P 0x77 {size - 4 * KiB} {4 * KiB}",  # data at the very end
    ]
    return ops


@dataclass(frozen=True)
class Case:
    """One matrix entry: ``build(dir)`` returns the image path."""

    name: str
    build: Callable[[Path], Path]
    snapshot: str | None = None
    #: compare block status with qemu-img map (not for snapshots).
    map: bool = True


def _std(opts: str, size: int = 4 * MiB, cluster: int = 64 * KiB) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = create(d / "img.qcow2", size, opts)
        qemu_io(p, *std_ops(d, size, cluster))
        return p

    return build


def _compressed(ctype: str, cluster: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        size = max(4 * MiB, 8 * cluster)
        src = create(d / "src.qcow2", size, f"cluster_size={cluster}")
        qemu_io(src, *std_ops(d, size, cluster))
        # Compressible data too (random data stays uncompressed).
        qemu_io(src, f"write -P 0x42 {3 * MiB} {256 * KiB}")
        out = d / "img.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o",
                 f"compression_type={ctype},cluster_size={cluster}", src, out)  # fmt: skip
        # A compressed write into the now-compressed image, and a normal
        # write over part of a compressed cluster.
        qemu_io(out, f"write -c -P 0x24 {2 * MiB + 4 * cluster} {cluster}",
                f"write -P 0x99 {3 * MiB + 100} 1000")  # fmt: skip
        return out

    return build


def _extl2(d: Path) -> Path:
    rnd = random_file(d)
    base = create(d / "base.qcow2", 4 * MiB)
    qemu_io(base, f"write -s {rnd} 0 {4 * MiB}")
    p = create(d / "img.qcow2", 4 * MiB, "extended_l2=on,cluster_size=64k", backing="base.qcow2")
    qemu_io(
        p,
        "write -P 0x11 4096 2048",  # one subcluster of a cluster
        "write -P 0x12 10000 5000",  # partial subclusters (COW from backing)
        "write -z 70000 6144",  # zero subclusters over backing
        f"write -z {MiB} {128 * KiB}",  # whole zero clusters
        f"write -P 0x13 {MiB + 200 * KiB} {70 * KiB}",
        f"write -z {MiB + 210 * KiB} 4096",  # zero inside an allocated cluster
        f"write -P 0x14 {4 * MiB - 2048} 2048",
    )
    return p


def _chain(base_fmt: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        rnd = random_file(d)
        if base_fmt == "raw":
            base = d / "base.raw"
            with open(base, "wb") as f:
                f.truncate(4 * MiB)
            qemu_io(base, f"write -s {rnd} 0 {MiB}", f"write -P 0x61 {3 * MiB} {512 * KiB}",
                    fmt="raw")  # fmt: skip
        else:
            base = create(d / "base.qcow2", 4 * MiB, "cluster_size=4096")
            qemu_io(base, f"write -s {rnd} 0 {MiB}", f"write -P 0x61 {3 * MiB} {512 * KiB}")
        mid = create(d / "mid.qcow2", 4 * MiB, "cluster_size=16k", backing=base.name,
                     backing_fmt=base_fmt)  # fmt: skip
        qemu_io(mid, f"write -P 0x62 {512 * KiB} {512 * KiB}", f"write -z {100 * KiB} {64 * KiB}")
        top = create(d / "img.qcow2", 4 * MiB, backing=mid.name)
        qemu_io(top, f"write -P 0x63 {700 * KiB} {200 * KiB}", f"write -z {3 * MiB} {64 * KiB}",
                f"write -P 0x64 {4 * MiB - 512} 512")  # fmt: skip
        return top

    return build


def _short_backing(d: Path) -> Path:
    base = create(d / "base.qcow2", 2 * MiB + 512, "cluster_size=4096")
    qemu_io(base, f"write -P 0x71 0 {2 * MiB + 512}")
    top = create(d / "img.qcow2", 4 * MiB, backing="base.qcow2")
    qemu_io(top, f"write -P 0x72 {MiB} 4096")
    return top


def _snapshots(d: Path) -> Path:
    rnd = random_file(d)
    p = create(d / "img.qcow2", 4 * MiB)
    qemu_io(p, f"write -s {rnd} 0 {MiB}")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io(p, f"write -P 0x81 {512 * KiB} {MiB}", f"write -z 0 {64 * KiB}")
    qemu_img("snapshot", "-c", "s2", p)
    qemu_img("resize", p, str(6 * MiB))
    qemu_io(p, f"write -P 0x82 {6 * MiB - 8192} 8192", f"write -z {600 * KiB} 4096")
    return p


def _bitmaps(d: Path) -> Path:
    p = create(d / "img.qcow2", 4 * MiB)
    qemu_img("bitmap", "--add", p, "b0")
    qemu_io(p, *std_ops(d, 4 * MiB, 64 * KiB))
    qemu_img("bitmap", "--add", p, "b1")
    return p


def _data_file(raw: bool) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        opts = "data_file=img.data" + (",data_file_raw=on" if raw else "")
        p = create(d / "img.qcow2", 4 * MiB, opts)
        qemu_io(p, *std_ops(d, 4 * MiB, 64 * KiB))
        return p

    return build


CASES: list[Case] = [
    Case("v2", _std("compat=0.10")),
    Case("v3-c512", _std("cluster_size=512", cluster=512)),
    Case("v3-c4k", _std("cluster_size=4096", cluster=4096)),
    Case("v3-c64k", _std("cluster_size=65536")),
    Case("v3-c2m", _std("cluster_size=2M", size=16 * MiB, cluster=2 * MiB)),
    Case("refcount1", _std("refcount_bits=1")),
    Case("refcount64", _std("refcount_bits=64")),
    Case("lazy", _std("lazy_refcounts=on")),
    Case("odd-size", _std("cluster_size=65536", size=4 * MiB + 1536)),
    Case("zlib", _compressed("zlib", 64 * KiB)),
    Case("zstd", _compressed("zstd", 64 * KiB)),
    Case("zlib-c4k", _compressed("zlib", 4 * KiB)),
    Case("zstd-c2m", _compressed("zstd", 2 * MiB)),
    Case("extl2", _extl2),
    Case("chain-raw", _chain("raw")),
    Case("chain-qcow2", _chain("qcow2")),
    Case("short-backing", _short_backing),
    Case("snapshots", _snapshots),
    Case("snapshot-s1", _snapshots, snapshot="s1", map=False),
    Case("snapshot-s2", _snapshots, snapshot="s2", map=False),
    Case("bitmaps", _bitmaps),
    Case("data-file", _data_file(False)),
    Case("data-file-raw", _data_file(True)),
]

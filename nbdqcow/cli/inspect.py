"""``nbdqcow info``, ``nbdqcow map`` and ``nbdqcow convert``: look into an
image (qemu-img's ``info``, ``map`` and ``convert -O raw``).

* ``info [--json] IMAGE`` -- format, virtual size, cluster size, version,
  features, backing chain, snapshots, bitmaps.  Reads metadata only; a
  backing file the policy refuses is reported, not fatal.
* ``map [--json] IMAGE`` -- allocation extents.  ``--json`` prints the
  fields of ``qemu-img map --output=json`` with the same meaning
  (``depth`` 0 is the image itself; ``present`` false means no layer
  allocates the range).
* ``convert IMAGE OUTPUT`` -- the whole virtual disk to a sparse raw file,
  skipping what block status reports as reading zeroes and aligned 4 KiB
  blocks of zeroes inside data (qemu-img's default ``-S 4k``); a progress
  bar on stderr when it is a terminal.

Backing references follow :class:`~nbdqcow.qcow2.BackingPolicy`:
``--allow-dir`` adds trusted directories, ``--probe-backing-format``
allows probing a backing file whose format the image does not name.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
from typing import Any

from nbdqcow.backends.base import BlockBackend, ExtentFlag
from nbdqcow.backends.open import FORMATS, open_backend, probe_format
from nbdqcow.errors import ImageError, NbdqcowError
from nbdqcow.io import HostFile
from nbdqcow.qcow2 import BackingPolicy, Qcow2Image
from nbdqcow.qcow2.backing import ChainGuard, resolve_reference
from nbdqcow.qcow2.bitmap import read_bitmap_directory
from nbdqcow.qcow2.image import read_header
from nbdqcow.qcow2.layout import CompressionType
from nbdqcow.qcow2.snapshot import read_snapshot_table

__all__ = ["register"]

#: convert copies at most this much per read.
COPY_CHUNK = 4 * 1024 * 1024


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--format", dest="fmt", choices=FORMATS,
                   help="image format (default: probe)")  # fmt: skip
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="also allow backing/data files in DIR (repeatable)")  # fmt: skip
    p.add_argument("--probe-backing-format", action="store_true",
                   help="probe the format of backing files the image does not name")  # fmt: skip
    p.add_argument("image")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("info", help="show image information (like qemu-img info)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)
    p.set_defaults(func=run_info)

    p = subparsers.add_parser("map", help="show allocation extents (like qemu-img map)")
    p.add_argument("--json", action="store_true", help="qemu-img map --output=json format")
    p.add_argument("-l", "--snapshot", help="map this internal snapshot")
    _common(p)
    p.set_defaults(func=run_map)

    p = subparsers.add_parser("convert", help="copy the virtual disk to a sparse raw file")
    p.add_argument("-l", "--snapshot", help="copy this internal snapshot")
    _common(p)
    p.add_argument("output")
    p.set_defaults(func=run_convert)


def _policy(args: argparse.Namespace) -> BackingPolicy:
    return BackingPolicy(allow_dirs=tuple(args.allow_dir),
                         probe_format=args.probe_backing_format)  # fmt: skip


# -- info ---------------------------------------------------------------------------


def _layer_info(path: str, fmt: str | None, policy: BackingPolicy, guard: ChainGuard) -> dict[
    str, Any
]:
    fmt = fmt or probe_format(path)
    st = os.stat(path)
    info: dict[str, Any] = {
        "filename": path,
        "format": fmt,
        "actual-size": st.st_blocks * 512,
    }
    if fmt == "raw":
        guard.enter(path)
        info["virtual-size"] = st.st_size
        return info
    f = HostFile(path, writable=False)
    try:
        guard.enter(path, f.fd)
        h = read_header(f, f.size())
        info["virtual-size"] = h.size
        info["cluster-size"] = h.cluster_size
        info["dirty-flag"] = h.dirty
        snaps = read_snapshot_table(f, h, f.size())
        if snaps:
            info["snapshots"] = [
                {
                    "id": s.id,
                    "name": s.name,
                    "vm-state-size": s.vm_state_size_large,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec // 10**9,
                    "vm-clock-nsec": s.vm_clock_nsec % 10**9,
                    **({"icount": s.icount} if s.icount is not None else {}),
                    **({"disk-size": s.disk_size} if s.disk_size is not None else {}),
                }
                for s in snaps
            ]
        data: dict[str, Any] = {
            "compat": "0.10" if h.version == 2 else "1.1",
            "compression-type": CompressionType(h.compression_type).name.lower(),
            "refcount-bits": h.refcount_bits,
        }
        if h.version >= 3:
            data["lazy-refcounts"] = h.lazy_refcounts
            bitmaps = read_bitmap_directory(f, h)
            if bitmaps:
                data["bitmaps"] = [
                    {"flags": b.flag_names, "name": b.name, "granularity": b.granularity}
                    for b in bitmaps
                ]
            data["corrupt"] = h.corrupt
            data["extended-l2"] = h.extended_l2
        if h.data_file is not None:
            data["data-file"] = h.data_file.decode("utf-8", "replace")
            data["data-file-raw"] = bool(h.autoclear_features & 2)
        info["format-specific"] = {"type": "qcow2", "data": data}
    finally:
        f.close()
    if h.backing_file is not None:
        name = h.backing_file.decode("utf-8", "replace")
        info["backing-filename"] = name
        if h.backing_format is not None:
            info["backing-filename-format"] = h.backing_format
        try:
            bpath = resolve_reference(h.backing_file, path, policy, kind="backing file")
            info["full-backing-filename"] = bpath
            bfmt = h.backing_format
            if bfmt is None and not policy.probe_format:
                raise ImageError("the image does not name the backing file's format")
            info["backing-image"] = _layer_info(bpath, bfmt, policy, guard)
        except NbdqcowError as e:
            info["backing-refused"] = str(e)
    return info


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit} ({n} bytes)"
    return f"{n} bytes"


def _print_info(info: dict[str, Any], indent: str = "") -> None:
    out = sys.stdout
    print(f"{indent}image: {info['filename']}", file=out)
    print(f"{indent}file format: {info['format']}", file=out)
    print(f"{indent}virtual size: {_size(info['virtual-size'])}", file=out)
    print(f"{indent}disk size: {_size(info['actual-size'])}", file=out)
    if "cluster-size" in info:
        print(f"{indent}cluster_size: {info['cluster-size']}", file=out)
    if "backing-filename" in info:
        line = f"{indent}backing file: {info['backing-filename']}"
        if "full-backing-filename" in info:
            line += f" (actual path: {info['full-backing-filename']})"
        print(line, file=out)
        print(f"{indent}backing file format: {info.get('backing-filename-format', '(none)')}")
    if "backing-refused" in info:
        print(f"{indent}backing file refused: {info['backing-refused']}", file=out)
    if info.get("snapshots"):
        print(f"{indent}Snapshot list:", file=out)
        print(f"{indent}{'ID':<8}{'TAG':<20}{'VM SIZE':>10}  DISK SIZE", file=out)
        for s in info["snapshots"]:
            disk = s.get("disk-size")
            print(f"{indent}{s['id']:<8}{s['name']:<20}{s['vm-state-size']:>10}  "
                  f"{disk if disk is not None else '-'}", file=out)  # fmt: skip
    spec = info.get("format-specific", {}).get("data")
    if spec:
        print(f"{indent}Format specific information:", file=out)
        for k, v in spec.items():
            if k == "bitmaps":
                print(f"{indent}    bitmaps:", file=out)
                for b in v:
                    print(f"{indent}        [{b['name']}] granularity {b['granularity']}"
                          f" flags {','.join(b['flags']) or '-'}", file=out)  # fmt: skip
            else:
                text = str(v).lower() if isinstance(v, bool) else v
                print(f"{indent}    {k.replace('-', ' ')}: {text}", file=out)
    if "backing-image" in info:
        print(f"{indent}backing image:", file=out)
        _print_info(info["backing-image"], indent + "    ")


def run_info(args: argparse.Namespace) -> int:
    policy = _policy(args)
    info = _layer_info(args.image, args.fmt, policy, ChainGuard(policy))
    if args.json:
        print(json.dumps(info, indent=4))
    else:
        _print_info(info)
    return 0


# -- map ----------------------------------------------------------------------------


def _absent_depth(b: BlockBackend, offset: int) -> int:
    """qemu-img map's ``depth`` for a range no layer allocates: the layer
    that decided it reads as zeroes -- the bottom of the chain, or the first
    layer whose backing file ends before ``offset``."""
    depth = 0
    while isinstance(b, Qcow2Image) and b.backing is not None and offset < b.backing.size:
        b = b.backing
        depth += 1
    return depth


def _layer_sizes(b: BlockBackend) -> list[int]:
    sizes = []
    while isinstance(b, Qcow2Image) and b.backing is not None:
        b = b.backing
        sizes.append(b.size)
    return sizes


async def _map(args: argparse.Namespace) -> list[dict[str, Any]]:
    b = open_backend(args.image, fmt=args.fmt, snapshot=args.snapshot, policy=_policy(args))
    try:
        sizes = _layer_sizes(b)
        out: list[dict[str, Any]] = []
        pos = 0
        while pos < b.size:
            for e in await b.block_status(pos, b.size - pos):
                # Unallocated ranges are split where a backing file ends.
                inner = {z for z in sizes if e.offset < z < e.end} if not e.depth else set()
                cuts = [e.offset, *sorted(inner), e.end]
                for start, end in itertools.pairwise(cuts):
                    ent: dict[str, Any] = {
                        "start": start,
                        "length": end - start,
                        "depth": e.depth - 1 if e.depth else _absent_depth(b, start),
                        "present": e.depth > 0,
                        "zero": bool(e.flags & ExtentFlag.ZERO),
                        "data": not e.flags & ExtentFlag.HOLE,
                    }
                    if e.host_offset is not None:
                        ent["offset"] = e.host_offset + (start - e.offset)
                    _merge(out, ent)
                pos = e.end
        return out
    finally:
        await b.aclose()


def _merge(out: list[dict[str, Any]], ent: dict[str, Any]) -> None:
    last = out[-1] if out else None
    if (
        last is not None
        and all(last[k] == ent[k] for k in ("depth", "present", "zero", "data"))
        and ("offset" in last) == ("offset" in ent)
        and ("offset" not in ent or last["offset"] + last["length"] == ent["offset"])
    ):
        last["length"] += ent["length"]
    else:
        out.append(ent)


def run_map(args: argparse.Namespace) -> int:
    entries = asyncio.run(_map(args))
    if args.json:
        # One entry per line, like qemu-img.
        print("[" + ",\n".join(json.dumps(e) for e in entries) + "]")
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Depth':<7}{'Type':<7}Mapped to")
    for e in entries:
        kind = "data" if e["data"] else ("zero" if e["present"] else "hole")
        mapped = f"{e['offset']:#x}" if "offset" in e and e["data"] else ""
        print(f"{e['start']:<#20x}{e['length']:<#20x}{e['depth']:<7}{kind:<7}{mapped}")
    return 0


# -- convert ------------------------------------------------------------------------


class _Progress:
    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.enabled = sys.stderr.isatty()
        self._last = -1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        pct = done * 1000 // self.total
        if pct != self._last:
            self._last = pct
            bar = "#" * (pct // 25)
            sys.stderr.write(f"\r    ({pct / 10:5.1f}/100%) [{bar:<40}]")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            self.update(self.total)
            sys.stderr.write("\n")


#: Like ``qemu-img convert``'s default ``-S 4k``: aligned 4 KiB blocks of
#: zeroes inside data are left as holes in the output.
SPARSE_BLOCK = 4096
_ZERO_BLOCK = bytes(SPARSE_BLOCK)


def _write_sparse(fd: int, data: memoryview, at: int) -> None:
    """Write ``data`` at ``at``, skipping aligned all-zero 4 KiB blocks (the
    output starts as a hole, so they already read as zeroes)."""
    n = len(data)
    start = -1  # start of the pending run of blocks to write
    pos = 0
    while pos < n:
        # Block boundaries are aligned in the output file.
        end = min(n, pos + SPARSE_BLOCK - (at + pos) % SPARSE_BLOCK)
        # memoryview == bytes compares with memcmp for byte formats.
        zero = end - pos == SPARSE_BLOCK and data[pos:end] == _ZERO_BLOCK
        if zero and start >= 0:
            os.pwrite(fd, data[start:pos], at + start)
            start = -1
        elif not zero and start < 0:
            start = pos
        pos = end
    if start >= 0:
        os.pwrite(fd, data[start:], at + start)


async def _convert(args: argparse.Namespace) -> None:
    b = open_backend(args.image, fmt=args.fmt, snapshot=args.snapshot, policy=_policy(args))
    try:
        if os.path.exists(args.output) and os.path.samefile(args.output, args.image):
            raise ImageError(f"output {args.output!r} is the input image")
        with open(args.output, "rb+" if os.path.exists(args.output) else "wb+") as f:
            fd = f.fileno()
            # Start from an all-hole file of the right size: ranges that read
            # as zeroes are then simply never written.
            os.ftruncate(fd, 0)
            os.ftruncate(fd, b.size)
            progress = _Progress(b.size)
            buf = bytearray(min(COPY_CHUNK, max(1, b.size)))
            view = memoryview(buf)
            pos = 0
            while pos < b.size:
                for e in await b.block_status(pos, b.size - pos):
                    if not e.flags & ExtentFlag.ZERO:
                        at = e.offset
                        while at < e.end:
                            n = min(len(buf), e.end - at)
                            await b.preadv(at, [view[:n]])
                            _write_sparse(fd, view[:n], at)
                            at += n
                            progress.update(at)
                    pos = e.end
                    progress.update(pos)
            os.fsync(fd)
            progress.done()
    finally:
        await b.aclose()


def run_convert(args: argparse.Namespace) -> int:
    asyncio.run(_convert(args))
    return 0


"""``nbdqcow create``: make an empty qcow2 image (``qemu-img create -f qcow2``).

Usage::

    nbdqcow create [-f qcow2] [-b BASE -F FMT] [-o cluster_size=64k,refcount_bits=16,...]
                   IMAGE [SIZE]

``-o`` takes qemu-img's option names: ``compat`` (0.10/v2 or 1.1/v3),
``cluster_size``, ``refcount_bits``, ``extended_l2``, ``lazy_refcounts``,
``compression_type``, ``backing_file``, ``backing_fmt``.  SIZE may be
omitted with a backing file; the new image then has the backing file's size.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from nbdqcow.errors import ImageError
from nbdqcow.qcow2.create import create, parse_size
from nbdqcow.qcow2.layout import Header

__all__ = ["register"]

_BOOL = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("create", help="create an empty qcow2 image")
    p.add_argument("-f", dest="fmt", default="qcow2", help="image format (only qcow2)")
    p.add_argument("-b", dest="backing", help="backing file name (stored as given)")
    p.add_argument("-F", dest="backing_format", help="backing file format (raw or qcow2)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="comma-separated key=value creation options")  # fmt: skip
    p.add_argument("image")
    p.add_argument("size", nargs="?")
    p.set_defaults(func=run)


def _parse_options(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise ImageError(f"option {part!r} is not of the form key=value")
            out[key.strip().replace("-", "_")] = value.strip()
    return out


def _bool(key: str, value: str) -> bool:
    try:
        return _BOOL[value.lower()]
    except KeyError:
        raise ImageError(f"option {key}={value!r}: expected on or off") from None


def _backing_size(base: str, image: str, fmt: str) -> int:
    # A relative backing name is relative to the new image's directory.
    path = base if os.path.isabs(base) else os.path.join(os.path.dirname(image) or ".", base)
    if fmt == "raw":
        return os.stat(path).st_size
    with open(path, "rb") as f:
        return Header.unpack(f.read(2 * 1024 * 1024)).size


def run(args: argparse.Namespace) -> int:
    if args.fmt != "qcow2":
        raise ImageError(f"format {args.fmt!r} is not supported by create (only qcow2)")
    opts = _parse_options(args.options)
    kw: dict[str, Any] = {}
    backing: str | None = opts.pop("backing_file", None) or args.backing
    backing_format: str | None = opts.pop("backing_fmt", None) or args.backing_format
    for key, value in opts.items():
        if key == "compat":
            if value in ("0.10", "v2"):
                kw["version"] = 2
            elif value in ("1.1", "v3"):
                kw["version"] = 3
            else:
                raise ImageError(f"option compat={value!r}: expected 0.10 or 1.1")
        elif key == "cluster_size":
            kw["cluster_size"] = parse_size(value)
        elif key == "refcount_bits":
            kw["refcount_bits"] = parse_size(value)
        elif key in ("extended_l2", "lazy_refcounts"):
            kw[key] = _bool(key, value)
        elif key == "compression_type":
            kw["compression_type"] = value
        else:
            raise ImageError(f"unknown creation option {key!r}")
    if args.size is not None:
        size = parse_size(args.size)
    elif backing is not None and backing_format is not None:
        size = _backing_size(backing, args.image, backing_format)
    else:
        raise ImageError("SIZE is required (unless -b and -F name a backing file)")
    create(args.image, size, backing=backing, backing_format=backing_format, **kw)
    print(f"Formatting '{args.image}', fmt=qcow2 size={size}")
    return 0

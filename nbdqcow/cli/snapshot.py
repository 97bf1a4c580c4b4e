"""``nbdqcow snapshot -l|-c NAME|-d NAME|-a NAME IMAGE`` (``qemu-img snapshot``).

Internal snapshots of a qcow2 image that nobody is serving; see
:mod:`nbdqcow.qcow2.snapshot_write` for the on-disk ordering.
"""

from __future__ import annotations

import argparse

from nbdqcow.qcow2.snapshot_write import (
    apply_snapshot,
    create_snapshot,
    delete_snapshot,
    describe,
    list_snapshots,
)

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("snapshot", help="list, create, delete or apply internal snapshots")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-l", dest="list", action="store_true", help="list snapshots")
    g.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot")
    g.add_argument("-d", dest="delete", metavar="NAME", help="delete a snapshot (ID or name)")
    g.add_argument("-a", dest="apply", metavar="NAME", help="revert to a snapshot (ID or name)")
    p.add_argument("image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(describe(list_snapshots(args.image)))
    elif args.create is not None:
        create_snapshot(args.image, args.create)
    elif args.delete is not None:
        delete_snapshot(args.image, args.delete)
    else:
        apply_snapshot(args.image, args.apply)
    return 0

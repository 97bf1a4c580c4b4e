"""``nbdqcow check [--repair leaks|all] [--json] IMAGE`` (``qemu-img check``).

Prints what :func:`nbdqcow.qcow2.check.check_image` found in qemu-img's
wording and exits like qemu-img: 0 clean, 1 the check failed, 2 corruptions,
3 leaks only.
"""

from __future__ import annotations

import argparse
import json

from nbdqcow.qcow2.check import CheckResult, Repair, check_image

__all__ = ["register", "render"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("check", help="check (and repair) a qcow2 image")
    p.add_argument("-r", "--repair", choices=["leaks", "all"], help="repair leaks, or everything")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("image")
    p.set_defaults(func=run)


def render(res: CheckResult) -> str:
    lines = list(res.messages)
    if res.leaks_fixed or res.corruptions_fixed:
        lines += [
            "The following inconsistencies were found and repaired:",
            "",
            f"    {res.leaks_fixed} leaked clusters",
            f"    {res.corruptions_fixed} corruptions",
            "",
            "Double checking the fixed image now...",
        ]
    if res.check_errors:
        lines.append(f"{res.check_errors} internal errors have occurred during the check.")
    if res.corruptions:
        lines += [
            "",
            f"{res.corruptions} errors were found on the image.",
            "Data may be corrupted, or further writes to the image may corrupt it.",
        ]
    if res.leaks:
        lines += ["", f"{res.leaks} leaked clusters were found on the image.",
                  "This means waste of disk space, but no harm to data."]  # fmt: skip
    if not (res.check_errors or res.corruptions or res.leaks):
        lines.append("No errors were found on the image.")
    if res.total_clusters and res.allocated_clusters:
        t = res.total_clusters
        lines.append(
            f"{res.allocated_clusters}/{t} = {100 * res.allocated_clusters / t:.2f}% allocated, "
            f"{100 * res.fragmented_clusters / res.allocated_clusters:.2f}% fragmented, "
            f"{100 * res.compressed_clusters / res.allocated_clusters:.2f}% compressed clusters"
        )
    if res.image_end_offset:
        lines.append(f"Image end offset: {res.image_end_offset}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    res = check_image(args.image, Repair(args.repair or "none"))
    if args.json:
        print(json.dumps(res.as_json(), indent=4))
    else:
        print(render(res))
    return res.exit_code

"""The ``nbdqcow`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed namespace and returning an exit status.  Modules
are discovered, so adding a subcommand touches no other file.

Expected errors (:class:`~nbdqcow.errors.NbdqcowError`, ``OSError``) are
printed as one line on stderr, ``nbdqcow: error: ...``, with a non-zero exit
status; a traceback means a bug.

A subcommand module that fails to import (a bug, or a missing optional
dependency) disables only that subcommand: it is still listed, and running it
prints the import error as one line; every other subcommand keeps working.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, cast

from nbdqcow import __version__
from nbdqcow.errors import NbdqcowError

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``nbdqcow serve: error: ...``)
    rather than the usage synopsis plus the error: one line is what log
    collectors and operators' scripts keep.  Exit status 2, as argparse."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nbdqcow",
        description="Serve and inspect qcow2 and raw disk images over NBD.",
    )
    parser.add_argument("--version", action="version", version=f"nbdqcow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{mod.name}")
        except Exception as exc:  # one broken subcommand must not take the others down
            _register_broken(sub, mod.name, exc)
            continue
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def _register_broken(sub: argparse._SubParsersAction[_Parser], name: str,
                     exc: Exception) -> None:
    """A stand-in for a subcommand whose module does not import."""
    reason = f"{type(exc).__name__}: {exc}"
    p = sub.add_parser(name, help=f"(unavailable: {reason})")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def unavailable(args: argparse.Namespace) -> int:
        raise NbdqcowError(f"the {name!r} subcommand is unavailable: its module failed "
                           f"to import ({reason})")

    p.set_defaults(func=unavailable)


def error(message: str) -> None:
    """Print one user-facing error line."""
    print(f"nbdqcow: error: {message}", file=sys.stderr)


def describe_oserror(exc: OSError) -> str:
    msg = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{exc.filename}: {msg}"
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = cast(Handler, args.func)
    try:
        return func(args)
    except NbdqcowError as exc:
        error(str(exc))
        return 1
    except OSError as exc:
        error(describe_oserror(exc))
        return 1
    except KeyboardInterrupt:
        return 130

"""The error of an inconsistent ``nbdqcow serve`` command line.

Split from :mod:`nbdqcow.cli.serve` (which re-exports it) so that
:mod:`nbdqcow.cli._publish` can raise it too; the leading underscore keeps the
subcommand discovery of :mod:`nbdqcow.cli` from taking this module for a
subcommand.
"""

from __future__ import annotations

from nbdqcow.errors import NbdqcowError

__all__ = ["UsageError"]


class UsageError(NbdqcowError):
    """The command line is inconsistent."""

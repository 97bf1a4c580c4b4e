"""Helpers to find external tools for interop tests, and to stop the
server processes they run.

A test that needs ``qemu-img``, ``nbdinfo`` and the like calls
:func:`require`.  On a developer's machine a missing tool skips the test; in
CI (``CI=true``) it fails it, because a skipped interop suite proves nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: The Debian interpreter that has libnbd's Python bindings (python3-libnbd).
SYSTEM_PYTHON = "/usr/bin/python3"


def require(tool: str) -> str:
    """Return the path of ``tool``, or skip (fail in CI) when it is missing."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        _missing(f"{tool} is not installed")
    assert path is not None
    return path


def require_libnbd_python() -> str:
    """Return the interpreter that can ``import nbd`` (libnbd's bindings)."""
    if not os.path.exists(SYSTEM_PYTHON):
        _missing(f"{SYSTEM_PYTHON} is missing")
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
    if r.returncode != 0:
        _missing("libnbd's Python bindings (python3-libnbd) are not installed")
    return SYSTEM_PYTHON


def _missing(why: str) -> None:
    if IN_CI:
        pytest.fail(f"{why} (CI=true: interop tests must not skip)")
    pytest.skip(why)


def stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float,
                 output: Callable[[], str]) -> int:
    """Send ``sig`` to a server process, as an operator would, and return its
    exit status; one that ignores the signal is killed and fails the test
    with its ``output()``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server ignored signal {sig}:\n{output()}") from None
    return proc.returncode

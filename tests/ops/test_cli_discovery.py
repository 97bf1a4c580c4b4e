"""A subcommand module that fails to import disables only itself.

The package is copied to a temporary directory with one broken subcommand
added (the working tree is shared: no file is added to it), then the real
``nbdqcow`` command is run from that copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbdqcow


def test_broken_subcommand_module_disables_only_itself(tmp_path: Path) -> None:
    pkg = Path(nbdqcow.__file__).parent
    shutil.copytree(pkg, tmp_path / "nbdqcow",
                    ignore=shutil.ignore_patterns("__pycache__", "*.tmp"))
    (tmp_path / "nbdqcow" / "cli" / "broken.py").write_text(
        "import a_module_that_does_not_exist\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def nbdqcow_cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nbdqcow", *args], capture_output=True,
                              text=True, env=env, timeout=60, cwd=tmp_path)

    where = nbdqcow_cmd("--version")
    assert where.returncode == 0 and where.stdout.startswith("nbdqcow "), where
    helped = nbdqcow_cmd("--help")
    assert helped.returncode == 0 and "serve" in helped.stdout
    assert "unavailable" in helped.stdout  # the broken one is listed as such
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(4096))
    checked = nbdqcow_cmd("serve", "--help")
    assert checked.returncode == 0 and "--export" in checked.stdout
    broken = nbdqcow_cmd("broken", "whatever", "--flag")
    assert broken.returncode == 1
    assert broken.stderr.strip().splitlines() == [
        "nbdqcow: error: the 'broken' subcommand is unavailable: its module failed to "
        "import (ModuleNotFoundError: No module named 'a_module_that_does_not_exist')"]

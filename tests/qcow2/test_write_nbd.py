"""The differential write test through the NBD server: the random request
sequence goes to ``nbdqcow serve`` over NBD (``qemu-io -f raw nbd+unix://``)
and, for the reference, straight to a copy through ``qemu-io``; the images
must compare identical and check clean afterwards."""

from __future__ import annotations

import random
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import tools

from nbdqcow.qcow2.check import check_image
from tests.interop import harness
from tests.qcow2.test_write_diff import CASES, build, digest, ops_for, qemu_cmds, qemu_io

pytestmark = pytest.mark.interop

NBD_CASES = [c for c in CASES if c.name in ("64k", "compressed-src", "snapshot", "backing-qcow2",
                                            "extl2-64k", "v2-4k")]  # fmt: skip


@pytest.mark.parametrize("case", NBD_CASES, ids=lambda c: c.name)
def test_same_as_qemu_over_nbd(tmp_path: Path, case: object) -> None:
    from tests.qcow2.test_write_diff import Case

    assert isinstance(case, Case)
    img, base = build(tmp_path, case)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(img, theirs)
    base_hash = digest(base) if base else None
    cluster = int(
        subprocess.run([tools.require("qemu-img"), "info", "--output=json", str(img)],
                       capture_output=True, text=True, check=True)
        .stdout.split('"cluster-size": ')[1].split(",")[0]
    )  # fmt: skip
    ops = ops_for(random.Random(7 + zlib.crc32(case.name.encode())), cluster, 300, case.trims)
    cmds = qemu_cmds(ops)
    s = harness.serve(tmp_path, img, fmt="qcow2")
    try:
        args = [tools.require("qemu-io"), "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        r = subprocess.run([*args, s.uri()], capture_output=True, text=True)
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
    finally:
        assert s.stop() == 0, s.stderr()
    qemu_io(theirs, cmds)
    r = subprocess.run([tools.require("qemu-img"), "compare", str(img), str(theirs)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([tools.require("qemu-img"), "check", str(img)], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert check_image(str(img)).exit_code == 0
    if base is not None:
        assert digest(base) == base_hash

"""Internal snapshots written by us and by qemu-img, read by the other:
``qemu-img check`` clean and data as qemu-io expects after every step."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import tools

from nbdqcow.cli import main
from nbdqcow.errors import ImageError
from nbdqcow.qcow2.check import check_image
from nbdqcow.qcow2.refcount import RefcountOverflow
from nbdqcow.qcow2.snapshot_write import (
    apply_snapshot,
    create_snapshot,
    delete_snapshot,
    list_snapshots,
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools.require(args[0]), *args[1:]], capture_output=True, text=True)


def qio(img: Path, *cmds: str) -> str:
    args = ["qemu-io"]
    for c in cmds:
        args += ["-c", c]
    r = run(*args, str(img))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fail" not in r.stdout.lower(), r.stdout
    return r.stdout


def clean(img: Path) -> None:
    r = run("qemu-img", "check", str(img))
    assert r.returncode == 0, r.stdout + r.stderr
    assert check_image(str(img)).exit_code == 0


def make(tmp_path: Path, opts: str, name: str = "s.qcow2") -> Path:
    img = tmp_path / name
    r = run("qemu-img", "create", "-f", "qcow2", "-o", opts, str(img), "4M")
    assert r.returncode == 0, r.stderr
    qio(img, "write -P 1 0 96k", "write -c -P 7 1M 64k", "write -z 2M 64k")
    return img


OPTS = [
    "cluster_size=4k",
    "cluster_size=64k,refcount_bits=4",
    "compat=0.10,cluster_size=512",
    "cluster_size=64k,extended_l2=on,refcount_bits=64",
]


@pytest.mark.parametrize("opts", OPTS)
def test_ours_then_qemu(tmp_path: Path, opts: str) -> None:
    img = make(tmp_path, opts)
    create_snapshot(str(img), "one")
    clean(img)
    qio(img, "write -P 2 0 8k", "write -P 3 1M 4k")
    clean(img)
    listing = run("qemu-img", "snapshot", "-l", str(img)).stdout
    assert "one" in listing
    # qemu reverts to what we captured...
    assert run("qemu-img", "snapshot", "-a", "one", str(img)).returncode == 0
    qio(img, "read -P 1 0 96k", "read -P 7 1M 64k", "read -P 0 2M 64k")
    clean(img)
    # ...and deletes it.
    assert run("qemu-img", "snapshot", "-d", "one", str(img)).returncode == 0
    clean(img)
    assert list_snapshots(str(img)) == []


@pytest.mark.parametrize("opts", OPTS)
def test_qemu_then_ours(tmp_path: Path, opts: str) -> None:
    img = make(tmp_path, opts)
    assert run("qemu-img", "snapshot", "-c", "q1", str(img)).returncode == 0
    qio(img, "write -P 4 4k 8k")
    assert run("qemu-img", "snapshot", "-c", "q2", str(img)).returncode == 0
    qio(img, "write -P 5 0 64k", "discard 1M 64k")
    create_snapshot(str(img), "n3")
    clean(img)
    assert [s.name for s in list_snapshots(str(img))] == ["q1", "q2", "n3"]
    apply_snapshot(str(img), "q1")
    clean(img)
    qio(img, "read -P 1 0 96k", "read -P 7 1M 64k")
    delete_snapshot(str(img), "q1")
    clean(img)
    apply_snapshot(str(img), "2")  # by ID
    clean(img)
    qio(img, "read -P 1 0 4k", "read -P 4 4k 8k", "read -P 1 12k 84k")
    delete_snapshot(str(img), "q2")
    delete_snapshot(str(img), "n3")
    clean(img)
    # The active state survives deleting every snapshot, and is writable
    # in place again (COPIED restored).
    qio(img, "read -P 4 4k 8k", "write -P 6 0 4k")
    clean(img)


def test_refused_cleanly(tmp_path: Path) -> None:
    img = make(tmp_path, "cluster_size=4k,refcount_bits=1")
    before = img.read_bytes()
    with pytest.raises(RefcountOverflow, match="refcount_bits"):
        create_snapshot(str(img), "x")
    assert img.read_bytes() == before
    img2 = make(tmp_path, "cluster_size=4k", "other.qcow2")
    create_snapshot(str(img2), "x")
    with pytest.raises(ImageError, match="already exists"):
        create_snapshot(str(img2), "x")
    with pytest.raises(ImageError, match="not found"):
        delete_snapshot(str(img2), "nope")
    clean(img2)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, "cluster_size=4k")
    assert main(["snapshot", "-c", "base", str(img)]) == 0
    qio(img, "write -P 9 0 4k")
    assert main(["snapshot", "-l", str(img)]) == 0
    assert "base" in capsys.readouterr().out
    assert main(["snapshot", "-a", "base", str(img)]) == 0
    qio(img, "read -P 1 0 4k")
    assert main(["snapshot", "-d", "missing", str(img)]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["snapshot", "-d", "base", str(img)]) == 0
    clean(img)

"""``check_image``/``nbdqcow check`` beside ``qemu-img check``: on images
qemu made, clean or damaged by crafted refcount changes, both must agree on
leaks, corruptions and the exit status, before and after repair."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import tools

from nbdqcow.cli import main
from nbdqcow.qcow2.check import Repair, check_image
from nbdqcow.qcow2.layout import L2E_OFFSET_MASK, OFLAG_COPIED
from nbdqcow.qcow2.offline import OfflineImage


def _qemu(args: list[str], img: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools.require(args[0]), *args[1:], str(img)], capture_output=True,
                          text=True)  # fmt: skip


def qemu_check(img: Path) -> tuple[int, int, int]:
    r = _qemu(["qemu-img", "check", "--output=json"], img)
    out = json.loads(r.stdout)
    return r.returncode, out.get("leaks", 0), out.get("corruptions", 0)


def ours(img: Path, repair: Repair = Repair.NONE) -> tuple[int, int, int]:
    res = check_image(str(img), repair)
    return res.exit_code, res.leaks, res.corruptions


def make(tmp_path: Path, opts: str, cmds: list[str], snapshot: bool = False) -> Path:
    img = tmp_path / "t.qcow2"
    subprocess.run([tools.require("qemu-img"), "create", "-f", "qcow2", "-o", opts, str(img),
                    "8M"], check=True, capture_output=True)  # fmt: skip
    args = ["qemu-io"]
    for c in cmds:
        args += ["-c", c]
    _qemu(args, img).check_returncode()
    if snapshot:
        _qemu(["qemu-img", "snapshot", "-c", "s1"], img).check_returncode()
        _qemu(["qemu-io", "-c", "write -P 9 0 8k"], img).check_returncode()
    return img


IMAGES = {
    "64k": ("cluster_size=64k", ["write -P 1 0 200k", "write -c -P 2 1M 64k"], False),
    "4k-snap": ("cluster_size=4k", ["write -P 1 0 100k", "write -c -P 2 1M 4k"], True),
    "512-rc1": ("cluster_size=512,refcount_bits=1", ["write -P 1 0 20k"], False),
    "v2-rc16": ("compat=0.10,cluster_size=4k", ["write -P 1 4k 40k"], True),
    "extl2-rc64": (
        "cluster_size=64k,extended_l2=on,refcount_bits=64",
        ["write -P 1 0 10k", "write -P 3 300k 4k"],
        False,
    ),
}


def _data_clusters(im: OfflineImage) -> list[int]:
    l1 = im.read_l1()
    l2 = im.read_l2(l1[0] & L2E_OFFSET_MASK)
    step = 2 if im.geo.extended_l2 else 1
    return [e & L2E_OFFSET_MASK for e in l2[::step] if e & OFLAG_COPIED and e & L2E_OFFSET_MASK]


Damage = Callable[[OfflineImage], None]


def _leak(im: OfflineImage) -> None:
    """A pure leak: a cluster counted but referenced by nothing."""
    off = im.refcounts.alloc(1)
    im.f.truncate(max(im.file_size(), off + im.cluster_size))


def _bump(im: OfflineImage) -> None:
    """A leak on a referenced cluster (its COPIED flag then lies too)."""
    rc = im.refcounts
    if rc.order == 0:
        _leak(im)  # 1-bit refcounts cannot count to 2
    else:
        rc.update(_data_clusters(im)[0] // im.cluster_size, 1)


def _corrupt(im: OfflineImage) -> None:
    im.refcounts.update(_data_clusters(im)[1] // im.cluster_size, -1)


def _leak_and_corrupt(im: OfflineImage) -> None:
    _bump(im)
    _corrupt(im)


def _copied(im: OfflineImage) -> None:
    l1 = im.read_l1()
    off = l1[0] & L2E_OFFSET_MASK
    l2 = im.read_l2(off)
    l2[0] ^= OFLAG_COPIED
    im.write_table(off, l2)


DAMAGE: dict[str, Damage | None] = {
    "clean": None,
    "leak": _leak,
    "bump": _bump,
    "corrupt": _corrupt,
    "both": _leak_and_corrupt,
    "copied": _copied,
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("image", IMAGES)
def test_agrees_with_qemu(tmp_path: Path, image: str, damage: str) -> None:
    img = make(tmp_path, *IMAGES[image])
    fn = DAMAGE[damage]
    if fn is not None:
        with OfflineImage(img, writable=True) as im:
            fn(im)
            im.refcounts.flush()
            im.sync()
    expected = qemu_check(img)
    assert ours(img) == expected
    if damage != "clean":
        assert expected[0] in (2, 3)
    # Repairing leaks: qemu-img afterwards agrees with what we report.
    leaks_copy = tmp_path / "leaks.qcow2"
    leaks_copy.write_bytes(img.read_bytes())
    after = ours(leaks_copy, Repair.LEAKS)
    assert after == qemu_check(leaks_copy)
    assert after[1] == 0
    # Repairing everything leaves an image qemu calls clean, same data.
    ours(img, Repair.ALL)
    assert qemu_check(img) == (0, 0, 0)
    assert ours(img) == (0, 0, 0)
    r = subprocess.run([tools.require("qemu-img"), "compare", str(img), str(leaks_copy)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, "cluster_size=4k", ["write -P 1 0 16k"])
    assert main(["check", str(img)]) == 0
    assert "No errors were found" in capsys.readouterr().out
    with OfflineImage(img, writable=True) as im:
        _leak(im)
        im.refcounts.flush()
    assert main(["check", "--json", str(img)]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["leaks"] == 1 and out["corruptions"] == 0
    assert main(["check", "-r", "leaks", str(img)]) == 0
    assert "1 leaked clusters" in capsys.readouterr().out
    with OfflineImage(img, writable=True) as im:
        _corrupt(im)
        im.refcounts.flush()
    assert main(["check", str(img)]) == 2
    assert main(["check", "--repair", "all", str(img)]) == 0


def test_unreadable_image_is_a_check_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = tmp_path / "junk.qcow2"
    img.write_bytes(b"QFI\xfb" + bytes(100))
    assert main(["check", str(img)]) == 1
    err = capsys.readouterr()
    assert "version" in err.out + err.err


def _entry_damage(kind: str) -> Damage:
    def damage(im: OfflineImage) -> None:
        l1 = im.read_l1()
        l2off = l1[0] & L2E_OFFSET_MASK
        l2 = im.read_l2(l2off)
        cs = im.cluster_size
        if kind == "beyond-eof":
            l2[20] = (1 << 30) | OFLAG_COPIED
        elif kind == "unaligned-data":
            l2[21] = ((l2[1] & L2E_OFFSET_MASK) + 512) | OFLAG_COPIED
        elif kind == "unaligned-l2":
            l1[1] = (3 * cs + 512) | OFLAG_COPIED
            im.write_table(im.header.l1_table_offset, l1)
            return
        elif kind == "refblock-beyond-eof":
            im.write_table(im.header.refcount_table_offset + 8, [1 << 30])
            return
        im.write_table(l2off, l2)

    return damage


@pytest.mark.parametrize(
    "kind", ["beyond-eof", "unaligned-data", "unaligned-l2", "refblock-beyond-eof"]
)
def test_structural_damage_counted_like_qemu(tmp_path: Path, kind: str) -> None:
    img = make(tmp_path, "cluster_size=4k", ["write -P 1 0 100k"])
    with OfflineImage(img, writable=True) as im:
        _entry_damage(kind)(im)
    assert ours(img) == qemu_check(img)
    assert ours(img)[0] == 2


def test_not_qcow2_exits_63_like_qemu(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    r = subprocess.run([tools.require("qemu-img"), "check", "-f", "raw", str(raw)],
                       capture_output=True)  # fmt: skip
    assert main(["check", str(raw)]) == r.returncode == 63

"""Every bad flag, missing file, unreadable image or malformed config: one
clear line on stderr, a non-zero exit status, no traceback, nothing served."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.ops.conftest import make_image

CASES: list[tuple[list[str], int, str]] = [
    # (arguments, exit status, text the one line must contain)
    (["serve", "--bogus", "{raw}"], 2, "unrecognized arguments: --bogus"),
    (["serve", "--format", "vmdk", "{raw}"], 2, "invalid choice: 'vmdk'"),
    (["serve", "--max-connections", "many", "{raw}"], 2, "invalid int value: 'many'"),
    (["serve", "-q", "-v", "{raw}"], 2, "not allowed with argument"),
    (["serve"], 1, "no IMAGE to serve"),
    (["serve", "--max-connections", "0", "{raw}"], 1, "--max-connections must be at least 1"),
    (["serve", "--port", "70000", "{raw}"], 1, "--port 70000"),
    (["serve", "--export", "noimage"], 1, "1 export names for 0 images"),
    (["serve", "--export", "a=", "{raw}"], 1, "--export 'a=': expected NAME=IMAGE"),
    (["serve", "--export", "a={raw}", "--export", "a={raw}"], 1, "export 'a' is defined twice"),
    (["serve", "{tmp}/missing.qcow2"], 1, "missing.qcow2: No such file"),
    (["serve", "{tmp}"], 1, "{tmp}"),
    (["serve", "{corrupt}"], 1, "version"),
    (["serve", "--format", "qcow2", "{raw}"], 1, "qcow2"),
    (["serve", "--snapshot", "nosuch", "{qcow2}"], 1, "nosuch"),
    (["serve", "--create", "banana", "{tmp}/new.qcow2"], 1, "--create 'banana'"),
    (["serve", "--create", "0", "{tmp}/new.qcow2"], 1, "--create '0'"),
    (["serve", "--tls-cert", "{raw}", "{raw}"], 1, "--tls-cert and --tls-key go together"),
    (["serve", "--tls-cert", "{tmp}/c.pem", "--tls-key", "{tmp}/k.pem", "{raw}"], 1,
     "not found"),
    (["serve", "--tls-certs", "{tmp}/nodir", "{raw}"], 1, "directory not found"),
    (["serve", "--tls", "required", "{raw}"], 1, "--tls required needs"),
    (["serve", "--admin", "nonsense", "{raw}"], 1, "--admin"),
    (["serve", "--pid-file", "{tmp}/nodir/x.pid", "{raw}"], 1, "nodir/x.pid"),
    (["serve", "--config", "{tmp}/missing.toml"], 1, "missing.toml: No such file"),
    (["serve", "--config", "{badtoml}"], 1, "bad.toml:2: invalid TOML"),
    (["serve", "--config", "{typo}"], 1, "exports.lab.read_ony"),
    (["serve", "--config", "{noimage}"], 1, "exports.lab.image"),
    (["serve", "--config", "{typo}", "{raw}"], 1, "--config FILE replaces IMAGE"),
    (["serve", "--config", "{typo}", "--tls", "required", "--read-only"], 1,
     "--config FILE replaces --read-only, --tls: set them in the file"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("errors")
    raw = tmp / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    corrupt = tmp / "corrupt.qcow2"
    corrupt.write_bytes(b"QFI\xfb" + (99).to_bytes(4, "big") + bytes(504))
    qcow2 = make_image(tmp / "disk.qcow2", size="1M")
    (tmp / "bad.toml").write_text('[server]\nlisten = [127.0.0.1]\n')
    (tmp / "typo.toml").write_text('[exports.lab]\nimage = "disk.raw"\nread_ony = true\n')
    (tmp / "noimage.toml").write_text('[exports.lab]\nimage = "nowhere.qcow2"\n')
    return {"tmp": str(tmp), "raw": str(raw), "corrupt": str(corrupt), "qcow2": str(qcow2),
            "badtoml": str(tmp / "bad.toml"), "typo": str(tmp / "typo.toml"),
            "noimage": str(tmp / "noimage.toml")}


@pytest.mark.parametrize(("args", "status", "message"), CASES,
                         ids=[" ".join(c[0])[:60] for c in CASES])
def test_one_clear_line(files: dict[str, str], args: list[str], status: int,
                        message: str) -> None:
    argv = [a.format(**files) for a in args]
    r = subprocess.run([sys.executable, "-m", "nbdqcow", *argv], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == status, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("nbdqcow"), lines[0]
    assert ": error: " in lines[0], lines[0]
    assert message.format(**files) in lines[0], lines[0]
    assert r.stdout == ""

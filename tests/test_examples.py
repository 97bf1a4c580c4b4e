"""examples/: the lab exports.toml, the systemd units and the qemu-io attach script.

The config is loaded with the real loader (and once with real images made by
qemu-img and a real test CA), the units are checked key by key and by
``systemd-analyze verify``, and the script is run against a real qemu-nbd
export, its result checked on the image file with qemu-io.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tools

from nbdqcow.config import TcpAddress, TlsMode, UnixAddress, client_allowed, load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPT = EXAMPLES / "attach_qemu_io.sh"


# -- exports.toml -------------------------------------------------------------


def test_lab_config_loads() -> None:
    cfg = load_config(EXAMPLES / "exports.toml", check_files=False)
    assert cfg.listen == (
        TcpAddress("0.0.0.0", 10809), TcpAddress("::", 10809),
        UnixAddress("/run/nbdqcow/nbd.sock"),
    )
    assert cfg.admin == TcpAddress("127.0.0.1", 9109)
    assert cfg.tls.mode is TlsMode.OPTIONAL
    exports = cfg.export_map()
    assert sorted(exports) == ["golden", "pc1", "pc2", "pc3"]
    golden = exports["golden"]
    assert golden.read_only and golden.snapshot == "installed"
    assert all(not exports[m].read_only for m in ("pc1", "pc2", "pc3"))
    assert exports["pc3"].require_tls and not exports["pc3"].allow_unix


@pytest.mark.parametrize(
    ("export", "peer", "allowed"),
    [
        ("golden", ("10.20.0.11", 50000), True),
        ("golden", ("10.20.1.11", 50000), False),
        ("golden", ("fd20::99", 50000, 0, 0), True),
        ("pc1", ("10.20.0.11", 50000), True),
        ("pc1", ("::ffff:10.20.0.11", 50000, 0, 0), True),
        ("pc1", ("10.20.0.12", 50000), False),  # pc2 cannot take pc1's disk
        ("pc2", ("fd20::12", 50000, 0, 0), True),
        ("pc1", "", True),  # local Unix-socket clients (backups)
        ("pc3", "", False),
    ],
)
def test_lab_acls(export: str, peer: object, allowed: bool) -> None:
    cfg = load_config(EXAMPLES / "exports.toml", check_files=False)
    assert client_allowed(cfg.export_map()[export], peer) is allowed


def test_lab_config_with_real_files(tmp_path: Path) -> None:
    """The commands in the file's header comment, run for real, give a valid setup."""
    from tests.interop.certs import make_ca

    qemu_img = tools.require("qemu-img")
    srv = tmp_path / "srv"
    srv.mkdir()
    golden = srv / "golden.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(golden), "20G"], check=True)
    subprocess.run([qemu_img, "snapshot", "-c", "installed", str(golden)], check=True)
    for m in ("pc1", "pc2", "pc3"):
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "golden.qcow2",
                        "-F", "qcow2", str(srv / f"{m}.qcow2")], check=True)
    pki = make_ca(tmp_path / "pki")
    text = (EXAMPLES / "exports.toml").read_text()
    text = text.replace("/srv/nbd", str(srv)).replace("/etc/nbdqcow/pki", str(pki))
    (tmp_path / "exports.toml").write_text(text)
    cfg = load_config(tmp_path / "exports.toml")
    assert cfg.export_map()["pc2"].image == str(srv / "pc2.qcow2")
    assert cfg.tls.ca == str(pki / "ca-cert.pem")
    assert cfg.export_map()["pc1"].allow == (
        ipaddress.ip_network("10.20.0.11/32"), ipaddress.ip_network("fd20::11/128"),
    )


# -- systemd units ------------------------------------------------------------


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """systemd.syntax(7): sections of (key, value); keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in (EXAMPLES / name).read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{name}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{name}: not a key=value line: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def test_socket_unit() -> None:
    u = unit("nbdqcow.socket")
    assert set(u) == {"Unit", "Socket", "Install"}
    assert values(u["Socket"], "ListenStream") == ["10809"]
    assert values(u["Socket"], "Accept") == ["no"], "one server process for all clients"
    assert values(u["Socket"], "NoDelay") == ["true"]
    assert values(u["Install"], "WantedBy") == ["sockets.target"]


def test_service_unit() -> None:
    u = unit("nbdqcow.service")
    service = u["Service"]
    assert values(u["Unit"], "Requires") == ["nbdqcow.socket"]
    (exec_start,) = values(service, "ExecStart")
    argv = exec_start.split()
    assert argv[0].endswith("/nbdqcow") and argv[1] == "serve"
    assert argv[argv.index("--config") + 1] == "/etc/nbdqcow/exports.toml"
    assert values(service, "ExecReload") == ["/bin/kill -HUP $MAINPID"], "SIGHUP reloads"
    assert values(service, "KillSignal") == ["SIGTERM"]
    assert values(service, "User") == ["nbdqcow"], "not root"
    assert values(service, "Type") == ["exec"], "no forking: systemd must see the real pid"
    # The images directory is the only writable path under ProtectSystem=strict,
    # and it is where exports.toml puts the images.
    assert values(service, "ProtectSystem") == ["strict"]
    (rw,) = values(service, "ReadWritePaths")
    cfg = load_config(EXAMPLES / "exports.toml", check_files=False)
    assert all(e.image.startswith(rw + "/") for e in cfg.exports)
    assert values(u["Install"], "Also") == ["nbdqcow.socket"]


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    analyze = tools.require("systemd-analyze")
    # The console script pip installed next to this interpreter (CI does not
    # put its venv on PATH), else the one on PATH.
    beside = Path(sys.executable).parent / "nbdqcow"
    nbdqcow = str(beside) if beside.exists() else shutil.which("nbdqcow")
    assert nbdqcow, "the nbdqcow console script is not installed"
    for name in ("nbdqcow.socket", "nbdqcow.service"):
        text = (EXAMPLES / name).read_text()
        # verify checks that ExecStart's binary exists: point it at the installed one.
        (tmp_path / name).write_text(text.replace("/usr/local/bin/nbdqcow", nbdqcow))
    r = subprocess.run([analyze, "verify", "--man=no", "nbdqcow.socket", "nbdqcow.service"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_service_command_line_is_accepted_by_serve() -> None:
    from nbdqcow.cli import build_parser

    (exec_start,) = values(unit("nbdqcow.service")["Service"], "ExecStart")
    args = exec_start.split()[1:]
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.xfail(f"`nbdqcow {' '.join(args)}` is not accepted by this build's serve yet")
    assert parsed.command == "serve"


# -- attach_qemu_io.sh ----------------------------------------------------------


def test_script_syntax() -> None:
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert SCRIPT.stat().st_mode & 0o111, "the script is executable"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args", [[], ["a", "b", "c", "d", "e"], ["/tmp/disk.img"], ["-r"]]
)
def test_script_usage_errors(args: list[str]) -> None:
    r = run_script(*args)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("usage:")


@pytest.fixture
def export(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    tools.require("qemu-io")
    image = tmp_path / "disk.qcow2"
    subprocess.run([tools.require("qemu-img"), "create", "-q", "-f", "qcow2", str(image), "4M"],
                   check=True)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen([tools.require("qemu-nbd"), "--persistent", "-k", str(sock),
                             "-x", "disk", "-f", "qcow2", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:  # until it accepts (the file appears at bind(), before listen())
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.02)
        yield f"nbd+unix:///disk?socket={sock}", image
    finally:
        proc.terminate()
        proc.wait(10)


def image_holds(image: Path, pattern: str, offset: int, length: int) -> bool:
    """Check the image file itself with qemu-io (independent of the script)."""
    r = subprocess.run(["qemu-io", "-U", "-f", "qcow2", "-r", "-c",
                        f"read -P {pattern} {offset} {length}", str(image)],
                       capture_output=True, text=True)
    return r.returncode == 0 and "verification failed" not in r.stdout


def test_script_writes_and_checks_a_pattern(export: tuple[str, Path]) -> None:
    uri, image = export
    r = run_script(uri, "64K", "4K", "0x5a")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.endswith(f"OK: pattern 0x5a at 64K+4K on {uri}\n")
    assert image_holds(image, "0x5a", 65536, 4096)
    assert image_holds(image, "0", 0, 65536), "nothing written outside the range"

    r = run_script("-r", uri, "64K", "4K", "0x5a")
    assert r.returncode == 0, r.stdout + r.stderr

    r = run_script("-r", uri, "64K", "4K", "0x5b")
    assert r.returncode == 1 and "FAILED: pattern 0x5b" in r.stderr
    assert "Pattern verification failed" in r.stderr
    assert image_holds(image, "0x5a", 65536, 4096), "-r never writes"


def test_script_unreachable_export(tmp_path: Path) -> None:
    tools.require("qemu-io")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "dead.sock"))  # exists, nobody listening
    r = run_script(f"nbd+unix:///disk?socket={tmp_path}/dead.sock")
    assert r.returncode == 1 and "FAILED" in r.stderr


def test_python_is_not_needed_by_the_script() -> None:
    assert "python" not in SCRIPT.read_text(), "the script must work on a bare client machine"

"""CAN_MULTI_CONN is honest: a FLUSH on one connection makes another
connection's completed writes durable -- visible in the image file itself,
read by qemu-io while both connections are still open."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import tools
from tests.interop import harness
from tests.interop.harness import run

SCRIPT = str(Path(__file__).with_name("libnbd_client.py"))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_flush_on_one_connection_covers_another(tmp_path: Path, fmt: str) -> None:
    qemu_img = tools.require("qemu-img")
    qemu_io = tools.require("qemu-io")
    py = tools.require_libnbd_python()
    img = tmp_path / f"mc.{fmt}"
    run([qemu_img, "create", "-q", "-f", fmt, str(img), "8M"])
    s = harness.serve(tmp_path, img, transport="unix", fmt=fmt)
    client = subprocess.Popen([py, SCRIPT, "multi_conn", s.uri()], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        first = json.loads(client.stdout.readline() or "{}")
        assert first["visible_on_b"] is True, first
        if harness.IMPL == "nbdqcow":  # qemu-nbd 7.2 does not advertise it here
            assert first["multi_conn"] is True
        # -U: read without taking the image lock the server holds
        r = run([qemu_io, "-U", "-r", "-f", fmt, "-c", "read -P 0x5e 1M 1M",
                 "-c", "read -P 0x6f 3149824 64k", "-c", "read -P 0 0 1M", str(img)])
        assert "Pattern verification failed" not in r.stdout, r.stdout
        if fmt == "qcow2":
            r = run([qemu_img, "check", "-U", "-f", "qcow2", str(img)], check=False)
            assert r.returncode == 0, r.stdout + r.stderr
        client.stdin.write("go\n")
        client.stdin.flush()
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
        assert s.stop() == 0, s.stderr()

"""libnbd's Python bindings (through /usr/bin/python3, see libnbd_client.py):
every command and flag, concurrency, server-side errors, and TLS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import tools
from tests.interop import harness
from tests.interop.certs import make_ca
from tests.interop.harness import Served, run

SCRIPT = str(Path(__file__).with_name("libnbd_client.py"))


def scenario(name: str, *args: str) -> dict[str, Any]:
    py = tools.require_libnbd_python()
    r = run([py, SCRIPT, name, *args], timeout=120)
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def test_commands_flags_and_errors(served: Served, raw_image: Path) -> None:
    r = scenario("ops", served.uri())
    assert r["size"] == raw_image.stat().st_size
    assert r["structured"] is True and r["read_only"] is False
    assert all(r["can"][k] for k in ("flush", "fua", "trim", "zero", "fast_zero", "cache")), r
    assert r["fua_read"] and r["zero_read"] and r["zero_no_hole_read"], r
    # FAST_ZERO either zeroed the range or failed with ENOTSUP leaving it alone
    assert r["fast_zero"] in (None, "ENOTSUP") and r["fast_zero_read_ok"], r
    assert r["max_in_flight"] == 16 and r["concurrent_reads_ok"], r
    # proto.md: a request past the end is EINVAL (writes MAY be ENOSPC)
    assert r["read_past_end"] == "EINVAL", r
    assert r["write_past_end"] in ("EINVAL", "ENOSPC"), r
    assert r["after_errors_ok"], r
    if harness.IMPL == "nbdqcow":
        assert r["can"]["multi_conn"] is True


def test_many_large_requests_in_flight(served: Served) -> None:
    r = scenario("stress", served.uri())
    assert r == {"ok": True, "peak_in_flight": r["peak_in_flight"]}
    assert r["peak_in_flight"] >= 16


def test_read_only_export_errors(tmp_path: Path, raw_image: Path, transport: str) -> None:
    before = raw_image.read_bytes()
    s = harness.serve(tmp_path, raw_image, transport=transport, read_only=True)
    try:
        r = scenario("read_only", s.uri())
    finally:
        assert s.stop() == 0, s.stderr()
    assert r["read_only"] and r["read_ok"], r
    if harness.IMPL == "nbdqcow":
        assert r["write"] == "EPERM", r   # proto.md: write to read-only -> EPERM
    assert r["trim"] in ("EPERM", "EINVAL") and r["zero"] in ("EPERM", "EINVAL"), r
    assert raw_image.read_bytes() == before


@pytest.fixture(scope="module")
def ca_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The server's CA (with a client certificate it signed) and an unrelated
    CA whose client certificate the server must refuse."""
    good = make_ca(tmp_path_factory.mktemp("tls") / "good")
    evil = make_ca(tmp_path_factory.mktemp("tls") / "evil", ca_name="some other CA")
    return good, evil


@pytest.mark.parametrize("verify_peer", [False, True], ids=["anon-client", "verify-peer"])
def test_tls(tmp_path: Path, raw_image: Path, transport: str, verify_peer: bool,
             ca_dirs: tuple[Path, Path]) -> None:
    good, evil = ca_dirs
    s = harness.serve(tmp_path, raw_image, transport=transport, tls_dir=str(good),
                      verify_peer=verify_peer)
    try:
        ok = scenario("tls", s.uri(tls=True), str(good))
        assert ok == {"connected": True, "tls": True, "roundtrip": True}, ok
        # With verify-peer the server refuses a certificate another CA signed.
        # Over TCP the client also refuses our certificate when it trusts
        # another CA (libnbd 1.14 does not verify the server over a Unix
        # socket, having no host name to check: qemu-nbd behaves the same).
        bad = scenario("tls", s.uri(tls=True), str(evil))
        if verify_peer or transport == "tcp":
            assert bad["connected"] is False, bad
        # TLS is required: a plaintext client gets ERR_TLS_REQD, not data.
        plain = scenario("plain", s.uri())
        assert plain["connected"] is False, plain
        assert "TLS" in plain["error"], plain
    finally:
        assert s.stop() == 0, s.stderr()


@pytest.mark.skipif(harness.IMPL != "nbdqcow", reason="qemu-nbd has no optional TLS mode")
def test_optional_tls(tmp_path: Path, raw_image: Path, transport: str,
                      ca_dirs: tuple[Path, Path]) -> None:
    good, _ = ca_dirs
    s = harness.serve(tmp_path, raw_image, transport=transport, tls_dir=str(good),
                      tls_mode="optional")
    try:
        ok = scenario("tls", s.uri(tls=True), str(good))
        assert ok == {"connected": True, "tls": True, "roundtrip": True}, ok
        plain = scenario("plain", s.uri())
        assert plain == {"connected": True, "size": raw_image.stat().st_size}, plain
    finally:
        assert s.stop() == 0, s.stderr()
    assert "TLS" in s.stderr() and "established" in s.stderr()

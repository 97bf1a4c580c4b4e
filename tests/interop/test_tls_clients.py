"""STARTTLS with qemu's and nbd-client's TLS stacks (GnuTLS), besides libnbd's
(test_libnbd_python.py): the same server certificate, a CA made here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tools
from tests.interop import harness
from tests.interop.certs import make_ca
from tests.interop.harness import Served, run


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ca(tmp_path_factory.mktemp("tls") / "ca")


@pytest.fixture
def tls_served(tmp_path: Path, raw_image: Path, transport: str, ca: Path) -> Served:
    return harness.serve(tmp_path, raw_image, transport=transport, tls_dir=str(ca),
                         verify_peer=True)


def test_qemu_io_over_tls(tls_served: Served, ca: Path, raw_image: Path) -> None:
    s = tls_served
    where = (f"path={s.socket_path},tls-hostname=localhost" if s.transport == "unix"
             else f"host=localhost,port={s.port}")
    try:
        r = run([tools.require("qemu-io"),
                 "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={ca}",
                 "--image-opts", f"driver=nbd,{where},export=disk,tls-creds=tls0",
                 "-c", "read -P 0x11 0 64k", "-c", "write -P 0x66 5M 64k",
                 "-c", "read -P 0x66 5M 64k"])
        assert "Pattern verification failed" not in r.stdout, r.stdout
        # without TLS the server refuses to serve anything
        r = run([tools.require("qemu-io"), "-f", "raw", "-c", "read 0 4k", s.uri()],
                check=False)
        assert r.returncode != 0 and "TLS" in r.stderr, r.stderr
    finally:
        assert s.stop() == 0, s.stderr()
    assert raw_image.read_bytes()[5 << 20:(5 << 20) + 65536] == b"\x66" * 65536
    if harness.IMPL == "nbdqcow":
        assert "TLS" in s.stderr() and "established" in s.stderr()


def test_nbd_client_list_over_tls(tls_served: Served, ca: Path) -> None:
    s = tls_served
    try:
        r = run([tools.require("nbd-client"), "-l", "-enable-tls",
                 "-cacertfile", str(ca / "ca-cert.pem"),
                 "-certfile", str(ca / "client-cert.pem"),
                 "-keyfile", str(ca / "client-key.pem"),
                 "-tlshostname", "localhost", *s.nbd_client_target()])
        assert "disk" in r.stdout.split(), r.stdout
    finally:
        assert s.stop() == 0, s.stderr()

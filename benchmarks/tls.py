"""A throw-away X.509 PKI for ``--tls`` runs (issue 6: "TLS off (report TLS
separately)").

``openssl`` makes a CA and a server certificate into one directory with the
file names qemu (``tls-creds-x509``), nbdkit (``--tls-certificates``) and
nbdqcow (``--tls-certs``) all expect.  Clients find the CA through libnbd's
default directory, ``$HOME/.pki/libnbd``: fio's nbd engine does not allow the
``tls-certificates`` URI parameter (it never calls
``nbd_set_uri_allow_local_file``), so the clients run with ``HOME`` pointing
at a directory that holds only that link.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["client_env", "make_pki"]

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(args: list[str], cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {r.stderr.strip()[-200:]}")


def make_pki(root: Path) -> Path:
    """Create ``root/pki`` (CA + server certificate) and ``root/home``."""
    pki = root / "pki"
    pki.mkdir()
    ca = ["req", "-x509", *_EC, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2"]
    _openssl([*ca, "-subj", "/CN=nbdqcow-bench-ca"], pki)
    csr = ["req", *_EC, "-keyout", "server-key.pem", "-out", "server.csr"]
    _openssl([*csr, "-subj", "/CN=localhost"], pki)
    (pki / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
    )
    sign = ["x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem"]
    sign += ["-CAcreateserial", "-out", "server-cert.pem", "-days", "2"]
    _openssl([*sign, "-extfile", "ext.cnf"], pki)
    home = root / "home" / ".pki"
    home.mkdir(parents=True)
    (home / "libnbd").symlink_to(pki)
    return pki


def client_env(pki: Path) -> dict[str, str]:
    """Environment for libnbd clients that trust ``pki``'s CA."""
    return {**os.environ, "HOME": str(pki.parent / "home")}

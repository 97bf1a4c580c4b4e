"""TLS policy and credentials for ``NBD_OPT_STARTTLS`` (proto.md "TLS support").

The spec's three server modes are the protocol core's
:class:`~nbdqcow.nbd.TlsMode`: ``OFF`` is NOTLS (STARTTLS answered
``NBD_REP_ERR_POLICY``), ``OPTIONAL`` lets the client choose (nbdkit
``--tls=on``), ``REQUIRED`` is FORCEDTLS (every option but STARTTLS and ABORT
gets ``NBD_REP_ERR_TLS_REQD`` until TLS is up).  proto.md: "the
server and client MUST use TLS version 1.2 or later", so the context's
minimum version is pinned to 1.2.

Credentials follow the x509 directory layout nbdkit and qemu use
(``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``), so an operator
can point every server at the same directory.  With ``verify_peer`` the
client must present a certificate signed by ``ca-cert.pem``
(qemu's ``verify-peer=on``, nbdkit's ``--tls-verify-peer``).

The record layer itself lives in :mod:`nbdqcow.stream` (an ``ssl.SSLObject``
over memory BIOs), because the server drives raw sockets, not transports.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from nbdqcow.errors import NbdqcowError
from nbdqcow.nbd.settings import TlsMode

__all__ = ["TlsConfig", "TlsMode", "TlsSetupError"]


class TlsSetupError(NbdqcowError):
    """TLS credentials are missing or unusable."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Server-side x509 credentials and policy.

    Attributes:
        certfile: PEM server certificate (chain).
        keyfile: PEM private key of ``certfile``.
        cafile: PEM CA bundle used to verify client certificates.
        verify_peer: require a client certificate signed by ``cafile``.
        mode: :attr:`TlsMode.OPTIONAL` or :attr:`TlsMode.REQUIRED`.
    """

    certfile: str
    keyfile: str
    cafile: str | None = None
    verify_peer: bool = False
    mode: TlsMode = TlsMode.REQUIRED

    @classmethod
    def from_dir(
        cls, directory: str | os.PathLike[str], *, verify_peer: bool = False,
        mode: TlsMode = TlsMode.REQUIRED,
    ) -> TlsConfig:
        """Credentials from an nbdkit/qemu-style directory."""
        d = os.fspath(directory)
        ca = os.path.join(d, "ca-cert.pem")
        return cls(
            certfile=os.path.join(d, "server-cert.pem"),
            keyfile=os.path.join(d, "server-key.pem"),
            cafile=ca if os.path.exists(ca) else None,
            verify_peer=verify_peer,
            mode=mode,
        )

    def context(self) -> ssl.SSLContext:
        """Build the server ``SSLContext``.

        Raises:
            TlsSetupError: a file is missing or does not hold what it should.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # TLS 1.2 client-initiated renegotiation is a CPU-exhaustion vector
        # and nothing in NBD needs it.
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        try:
            ctx.load_cert_chain(self.certfile, self.keyfile)
        except FileNotFoundError as e:
            raise TlsSetupError(f"TLS certificate or key not found: {e.filename}") from None
        except ssl.SSLError as e:
            raise TlsSetupError(
                f"TLS certificate {self.certfile!r} / key {self.keyfile!r} unusable: {e.reason}"
            ) from None
        if self.verify_peer:
            if self.cafile is None:
                raise TlsSetupError("client certificate verification needs a CA file")
            try:
                ctx.load_verify_locations(cafile=self.cafile)
            except FileNotFoundError:
                raise TlsSetupError(f"TLS CA file not found: {self.cafile}") from None
            except ssl.SSLError as e:
                raise TlsSetupError(f"TLS CA file {self.cafile!r} unusable: {e.reason}") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

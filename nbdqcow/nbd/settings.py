"""Per-connection protocol policy: TLS mode and the bounds that keep one
client from exhausting the server (nbdkit's ``MAX_NR_OPTIONS`` and
``MAX_REQUEST_SIZE``; ``doc/proto.md`` "Block size constraints" for the
payload rules).

These are the *protocol core's* knobs.  The server's own limits
(connections, in-flight requests, handshake timeout) live in
:mod:`nbdqcow.config`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["MAX_STRING", "ProtocolLimits", "TlsMode"]

#: proto.md "Conventions": a string "MUST be no longer than 4096 bytes".
MAX_STRING = 4096


class TlsMode(enum.StrEnum):
    """How the server treats ``NBD_OPT_STARTTLS`` (proto.md "Server-side
    requirements").

    ``OFF`` is NOTLS: STARTTLS gets ``ERR_POLICY``.  ``OPTIONAL`` is
    SELECTIVETLS with the client's choice (the application may still refuse a
    TLS-only export with ``ERR_TLS_REQD`` before the upgrade).  ``REQUIRED``
    is FORCEDTLS: every option but STARTTLS and ABORT gets ``ERR_TLS_REQD``
    until TLS is up, and ``EXPORT_NAME`` ends the session.

    A ``StrEnum``, so ``TlsMode("optional")`` and the equal-valued
    :class:`nbdqcow.config.TlsMode` both convert.
    """

    OFF = "off"
    OPTIONAL = "optional"
    REQUIRED = "required"


@dataclass(frozen=True, slots=True)
class ProtocolLimits:
    """Bounds enforced by :class:`~nbdqcow.nbd.ServerConnection`.

    Exceeding ``max_options`` is treated as denial of service (proto.md
    allows a hard disconnect then), so the core raises
    :class:`~nbdqcow.nbd.RemoteProtocolError`.  An option longer than
    ``max_option_length`` is not buffered: its data is streamed away and
    the option answered with an error (as qemu-nbd does), except
    ``EXPORT_NAME``, which cannot be answered and ends the connection.

    Attributes:
        max_options: options accepted in one handshake (counting STARTTLS,
            INFO, LIST...).  nbdinfo --list sends one INFO per export, so keep
            this well above a handful.
        max_option_length: largest option payload buffered; longer ones
            are skipped and answered ``ERR_UNSUP`` (unknown option),
            ``ERR_INVALID`` (one that takes no data) or ``ERR_TOO_BIG``.
        max_write_drain: a WRITE whose payload exceeds the export's
            ``max_block`` is drained and answered ``EINVAL`` when the payload
            is at most this many bytes (proto.md: payloads up to 32 MiB
            "SHOULD NOT" be treated as an attack); a larger one is an attack
            and ends the connection.
        extended_headers: offer ``NBD_OPT_EXTENDED_HEADERS`` (off: the core
            answers it ``ERR_UNSUP``, as servers that predate it do).
        structured_replies: offer ``NBD_OPT_STRUCTURED_REPLY`` (off: the
            kernel-era behaviour, simple replies only; also disables meta
            contexts and extended headers, which need it).
    """

    max_options: int = 256
    max_option_length: int = 64 * 1024
    max_write_drain: int = 32 * 1024 * 1024
    extended_headers: bool = True
    structured_replies: bool = True

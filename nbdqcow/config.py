"""The server and exports configuration, and its TOML file (``exports.toml``).

A configuration is a tree of frozen dataclasses: :class:`ServerConfig` holds
the listeners, limits, TLS settings, admin address and log format, plus one
:class:`ExportConfig` per export.  ``nbdqcow serve`` builds one from its flags,
or :func:`load_config` reads one from a file with the stdlib ``tomllib``.

The file format (every key is optional unless marked)::

    [server]
    listen = ["127.0.0.1:10809", "[::1]:10809", "unix:/run/nbdqcow/nbd.sock"]
    admin = "127.0.0.1:9109"        # or "unix:/run/nbdqcow/admin.sock"; off if absent
    log_format = "text"             # text | json

    [server.limits]
    max_connections = 64            # clients at once, over all exports
    max_in_flight = 64              # requests in progress per connection
    handshake_timeout = 10.0        # seconds a client may take to pick an export
    poll_max_us = 32                # spin for a lone client's next request; 0: never

    [server.tls]
    mode = "off"                    # off | optional | required
    cert = "server-cert.pem"        # required unless mode = "off"
    key = "server-key.pem"
    ca = "ca-cert.pem"              # required when verify_client = true
    verify_client = false

    [exports.lab1]                  # the table name is the NBD export name
    image = "images/lab1.qcow2"     # required
    format = "qcow2"                # raw | qcow2; probed by magic when absent
    read_only = false
    description = "lab machine 1"
    snapshot = "installed"          # serve this internal snapshot (read-only)
    allow = ["10.0.0.0/24", "fd00::/64"]   # TCP clients allowed; all if absent
    allow_unix = true               # Unix-socket clients bypass `allow`
    require_tls = false             # refuse this export to plaintext clients
    max_connections = 4             # clients at once on this export

Relative paths (images, TLS files, Unix sockets) are relative to the directory
of the configuration file, so a lab directory can be moved as a whole.

This module holds the configuration tree, the listener addresses (proto.md,
"Protocol phases": the NBD port), client ACLs, the reload diff, and the entry
points that read and parse a file; the checks of the file's tables and keys
are :mod:`nbdqcow.configfile` (the reference above stays here:
``docs/operations.md`` points to it).

Client ACLs: ``allow`` lists the networks (IPv4 or IPv6 CIDR, or single
addresses) whose TCP clients may use the export; when ``allow`` is absent every
TCP client may.  A Unix-socket client has no network address; access to it is
governed by the socket file's permissions, so it is allowed unless the export
sets ``allow_unix = false``.  See :func:`client_allowed`.

Errors: the file is validated as a whole when it is loaded.  Every problem is a
:class:`ConfigError` whose message names the file, the line and the dotted key,
e.g. ``exports.toml:12: exports.lab1.read_only: expected a boolean, got "yes"``.
``tomllib`` reports no positions for keys, so the line is found by scanning
the file text (:mod:`nbdqcow.tomlcheck`).  Unknown keys are errors:
a misspelt ``read_ony = true`` must not silently serve the image writable.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path

from nbdqcow.errors import NbdqcowError
from nbdqcow.tomlcheck import KeyLocator, KeyPath, format_key

__all__ = [
    "DEFAULT_PORT",
    "ConfigDiff",
    "ConfigError",
    "ExportConfig",
    "Limits",
    "LogFormat",
    "ServerConfig",
    "TcpAddress",
    "TlsConfig",
    "TlsMode",
    "UnixAddress",
    "client_allowed",
    "diff_configs",
    "load_config",
    "parse_address",
    "parse_config",
]

#: The IANA-registered NBD port (proto.md, "Protocol phases").
DEFAULT_PORT = 10809

#: proto.md, "Option haggling": strings MUST NOT exceed 4096 bytes.
MAX_STRING_BYTES = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(NbdqcowError):
    """A configuration problem; the message names file, line and key when known."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        key: KeyPath | str | None = None,
    ) -> None:
        self.path = None if path is None else os.fspath(path)
        self.line = line
        self.key = format_key(key) if isinstance(key, tuple) else key
        self.reason = message
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
        parts = [p for p in (where, self.key) if p]
        super().__init__(": ".join([*parts, message]))


# ---------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """A TCP endpoint; ``host`` is a name or a literal IPv4/IPv6 address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A Unix-domain stream socket path."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


Address = TcpAddress | UnixAddress

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*))(?::(?P<port>[^:]*))?$")


def parse_address(
    text: str, default_port: int | None = DEFAULT_PORT, base: Path | None = None
) -> Address:
    """Parse ``HOST[:PORT]``, ``[V6]:PORT``, ``unix:PATH`` or an absolute path.

    Args:
        text: the address as an operator writes it.
        default_port: the port when ``text`` names none; None makes the port
            mandatory.
        base: directory that relative Unix socket paths are relative to.

    Raises:
        ValueError: with a message naming what is wrong.
    """
    if text.startswith("unix:") or text.startswith("/"):
        path = text.removeprefix("unix:")
        if not path:
            raise ValueError("empty Unix socket path")
        if base is not None and not os.path.isabs(path):
            path = str(base / path)
        return UnixAddress(path)
    m = _HOST_PORT.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not HOST:PORT, [IPV6]:PORT or unix:PATH")
    host = m["v6"] if m["v6"] is not None else m["host"]
    if not host:
        raise ValueError(f"{text!r} has no host")
    if m["v6"] is not None:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    if m["port"] is None:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (HOST:PORT)")
        return TcpAddress(host, default_port)
    if not m["port"].isdigit() or not 0 <= int(m["port"]) <= 65535:
        raise ValueError(f"port {m['port']!r} is not a number from 0 to 65535")
    return TcpAddress(host, int(m["port"]))


# ---------------------------------------------------------------------------
# The configuration tree


class TlsMode(StrEnum):
    """Whether clients may, or must, upgrade with NBD_OPT_STARTTLS."""

    OFF = "off"
    OPTIONAL = "optional"
    REQUIRED = "required"


class LogFormat(StrEnum):
    """How the server writes its log lines (to stderr / the journal)."""

    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits that keep one client from starving the others."""

    max_connections: int = 64
    max_in_flight: int = 64
    handshake_timeout: float = 10.0
    #: busy polling for a lone client's next request (nbdqcow.poll)
    poll_max_us: int = 32


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """x509 credentials for NBD_OPT_STARTTLS (PSK needs Python 3.13; not offered)."""

    mode: TlsMode = TlsMode.OFF
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    verify_client: bool = False


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """One export: an image and the policy for the clients that use it."""

    name: str
    image: str
    #: ``"raw"``, ``"qcow2"``, or None to probe the magic (never for backing files).
    format: str | None = None
    read_only: bool = False
    description: str = ""
    #: Name (or id) of an internal qcow2 snapshot to serve, read-only.
    snapshot: str | None = None
    #: TCP client networks allowed; None means every TCP client.
    allow: tuple[Network, ...] | None = None
    #: Unix-socket clients are allowed regardless of ``allow`` (socket permissions rule).
    allow_unix: bool = True
    #: Refuse the export (NBD_REP_ERR_TLS_REQD) to clients that did not STARTTLS.
    require_tls: bool = False
    #: Clients at once on this export; None means only the server-wide limit.
    max_connections: int | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``nbdqcow serve`` needs to know, however it was given."""

    listen: tuple[Address, ...] = (TcpAddress("127.0.0.1", DEFAULT_PORT),)
    limits: Limits = field(default_factory=Limits)
    tls: TlsConfig = field(default_factory=TlsConfig)
    #: Where the admin HTTP endpoint listens; None (the default) disables it.
    admin: Address | None = None
    log_format: LogFormat = LogFormat.TEXT
    exports: tuple[ExportConfig, ...] = ()
    #: The file this came from, if any (for reload and messages).
    source: str | None = None

    def export_map(self) -> dict[str, ExportConfig]:
        """The exports by name."""
        return {e.name: e for e in self.exports}


# ---------------------------------------------------------------------------
# ACLs


def _peer_ips(peer: object) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The IP(s) of an asyncio ``peername``; None for a non-IP (Unix) peer.

    A dual-stack ``::`` listener reports IPv4 clients as ``::ffff:a.b.c.d``;
    operators write their ACLs in IPv4 terms, so such a peer is matched both
    as that IPv4 address and as itself.
    """
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    try:
        # IPv6 peernames may carry a zone ("fe80::1%eth0") that ip_address rejects.
        ip = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return []  # not an address we understand: matches no network
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped, ip]
    return [ip]


def client_allowed(export: ExportConfig, peer_address: object) -> bool:
    """Whether a client may use ``export``.

    Args:
        export: the export asked for.
        peer_address: the transport's ``peername``: a ``(host, port, ...)``
            tuple for TCP, a string (often ``""``) or bytes for a Unix socket.

    Unix-socket clients are allowed unless ``export.allow_unix`` is false;
    TCP clients are allowed when ``export.allow`` is None or one of its
    networks contains the client's address (IPv4-mapped IPv6 addresses are
    also compared as IPv4).  Anything else is refused.
    """
    ips = _peer_ips(peer_address)
    if ips is None:
        if isinstance(peer_address, str | bytes) or peer_address is None:
            return export.allow_unix
        return False  # an address family we do not know: refuse
    if not ips:
        return False
    if export.allow is None:
        return True
    return any(ip.version == net.version and ip in net for ip in ips for net in export.allow)


# ---------------------------------------------------------------------------
# Reload


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What a reload changes.  Export names are sorted."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    #: ``[server]`` settings that differ; they need a restart to apply.
    server_changed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.server_changed)

    def describe(self) -> str:
        """One log line, e.g. ``added pc4; removed pc2; needs a restart: listen``."""
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("needs a restart:", self.server_changed),
            )
            if names
        ]
        return "; ".join(parts) or "no change"


def diff_configs(old: ServerConfig, new: ServerConfig) -> ConfigDiff:
    """Compare two configurations, for SIGHUP reload.

    New exports appear, removed ones stop accepting clients (current clients
    finish), changed ones apply to clients that connect afterwards.
    """
    a, b = old.export_map(), new.export_map()
    server = tuple(
        f.name
        for f in fields(ServerConfig)
        if f.name not in ("exports", "source") and getattr(old, f.name) != getattr(new, f.name)
    )
    return ConfigDiff(
        added=tuple(sorted(b.keys() - a.keys())),
        removed=tuple(sorted(a.keys() - b.keys())),
        changed=tuple(sorted(n for n in a.keys() & b.keys() if a[n] != b[n])),
        server_changed=server,
    )


# ---------------------------------------------------------------------------
# Loading and validation



def load_config(path: str | os.PathLike[str], *, check_files: bool = True) -> ServerConfig:
    """Read and validate a configuration file.

    Args:
        path: the TOML file.
        check_files: also check that images and TLS files exist (the default;
            turn it off to validate a file written for another machine).

    Raises:
        ConfigError: the first problem found, naming file, line and key.
        OSError: the file cannot be read.
    """
    p = Path(path)
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"not UTF-8 (byte {exc.start})", path=p, line=line) from None
    return parse_config(text, path=p, check_files=check_files)


def parse_config(
    text: str, *, path: str | os.PathLike[str], check_files: bool = True
) -> ServerConfig:
    """Validate configuration ``text`` read from ``path`` (see :func:`load_config`).

    Relative paths in it are relative to the directory of ``path``.
    """
    p = Path(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\s*\(at (?:line (\d+), column \d+|end of document)\)$", msg)
        line = None
        if m:
            line = int(m.group(1)) if m.group(1) else max(1, len(text.splitlines()))
        reason = msg[: m.start()] if m else msg
        raise ConfigError(f"invalid TOML: {reason}", path=p, line=line) from None
    locator = KeyLocator(text)

    def fail(key: KeyPath, message: str) -> ConfigError:
        return ConfigError(message, path=p, line=locator.line_of(key), key=key)

    # Imported here: nbdqcow.configfile builds this module's dataclasses.
    from nbdqcow.configfile import _Builder

    return _Builder(fail, p.parent.absolute(), check_files).config(doc, str(p))

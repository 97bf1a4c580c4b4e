"""The tables and keys of the exports file (``exports.toml``), and their checks.

:func:`nbdqcow.config.parse_config` parses the TOML text with the stdlib
``tomllib``; :class:`_Builder` here turns the document into a
:class:`~nbdqcow.config.ServerConfig`, checking every key and raising a
:class:`~nbdqcow.config.ConfigError` that names the line and the dotted key.
Export names follow proto.md, "Option haggling" (strings MUST NOT exceed
4096 bytes; no NUL).

The keys, their defaults and their meaning are the reference in the
docstring of :mod:`nbdqcow.config`.  Relative paths (images, TLS files, Unix
sockets) are made relative to the directory of the configuration file.

Split from :mod:`nbdqcow.config` (pure move), which imports :class:`_Builder`
where it is used: this module builds that module's dataclasses.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from nbdqcow.config import (
    DEFAULT_PORT,
    MAX_STRING_BYTES,
    Address,
    ExportConfig,
    Limits,
    LogFormat,
    Network,
    ServerConfig,
    TlsConfig,
    TlsMode,
    parse_address,
)
from nbdqcow.tomlcheck import Fail, KeyPath, Table, describe, format_key

__all__: list[str] = []


class _Builder:
    """Turns a parsed TOML document into a :class:`ServerConfig`."""

    def __init__(self, fail: Fail, base: Path, check_files: bool) -> None:
        self.fail = fail
        self.base = base
        self.check_files = check_files

    def config(self, doc: Mapping[str, object], source: str) -> ServerConfig:
        top = Table(doc, (), self.fail)
        server = top.get_table("server")
        listen = self.listen(server)
        admin_text = server.get_str("admin")
        admin = None
        if admin_text is not None:
            admin = self.address(("server", "admin"), admin_text, None)
        log_format = server.get_choice("log_format", LogFormat, LogFormat.TEXT)
        limits = self.limits(server.get_table("limits"))
        tls = self.tls(server.get_table("tls"))
        server.finish()
        exports_table = top.get_table("exports")
        if not exports_table.data:
            raise self.fail(("exports",), "no exports defined (add an [exports.NAME] table)")
        exports = tuple(
            self.export(exports_table.get_table(name), name, tls) for name in exports_table.data
        )
        exports_table.finish()
        top.finish()
        return ServerConfig(
            listen=listen,
            limits=limits,
            tls=tls,
            admin=admin,
            log_format=log_format,
            exports=exports,
            source=source,
        )

    def address(self, key: KeyPath, text: str, default_port: int | None) -> Address:
        try:
            return parse_address(text, default_port, self.base)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def listen(self, server: Table) -> tuple[Address, ...]:
        items = server.get_strings("listen")
        if items is None:
            return ServerConfig().listen
        if not items:
            raise self.fail(("server", "listen"), "empty: the server would accept no client")
        out: list[Address] = []
        for key, text in items:
            addr = self.address(key, text, DEFAULT_PORT)
            if addr in out:
                raise self.fail(key, f"{addr} is listed twice")
            out.append(addr)
        return tuple(out)

    def limits(self, t: Table) -> Limits:
        d = Limits()
        limits = Limits(
            max_connections=t.get_int("max_connections", d.max_connections, 1, 1 << 20) or 1,
            max_in_flight=t.get_int("max_in_flight", d.max_in_flight, 1, 1 << 16) or 1,
            handshake_timeout=t.get_seconds("handshake_timeout", d.handshake_timeout),
            poll_max_us=t.get_int("poll_max_us", d.poll_max_us, 0, 1000) or 0,
        )
        t.finish()
        return limits

    def file(self, key: KeyPath, text: str) -> str:
        path = text if os.path.isabs(text) else str(self.base / text)
        if self.check_files:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise self.fail(key, f"{path}: {exc.strerror}") from None
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise self.fail(key, f"{path}: not a regular file or block device")
        return path

    def tls(self, t: Table) -> TlsConfig:
        mode = t.get_choice("mode", TlsMode, TlsMode.OFF)
        paths: dict[str, str | None] = {}
        for name in ("cert", "key", "ca"):
            text = t.get_str(name)
            paths[name] = None if text is None else self.file(("server", "tls", name), text)
        verify = t.get_bool("verify_client", False)
        t.finish()
        here = ("server", "tls")
        if mode is TlsMode.OFF:
            for name in ("cert", "key", "ca", "verify_client"):
                if name in t.data:
                    raise self.fail((*here, name), 'has no effect while mode is "off"')
        else:
            for name in ("cert", "key"):
                if paths[name] is None:
                    needed = format_key((*here, name))
                    raise self.fail((*here, "mode"), f'"{mode.value}" needs {needed}')
        if verify and paths["ca"] is None:
            raise self.fail((*here, "verify_client"), f"needs {format_key((*here, 'ca'))}")
        return TlsConfig(mode, paths["cert"], paths["key"], paths["ca"], verify)

    def export(self, t: Table, name: str, tls: TlsConfig) -> ExportConfig:
        here = t.path
        if len(name.encode()) > MAX_STRING_BYTES or "\0" in name:
            raise self.fail(here, f"an export name is at most {MAX_STRING_BYTES} bytes, no NUL")
        image_text = t.get_str("image")
        if image_text is None:
            raise self.fail(here, "missing key: image")
        image = self.file((*here, "image"), image_text)
        fmt = t.get_str("format")
        if fmt is not None and fmt not in ("raw", "qcow2"):
            raise self.fail((*here, "format"), f'expected "raw" or "qcow2", got {describe(fmt)}')
        snapshot = t.get_str("snapshot")
        if snapshot == "":
            raise self.fail((*here, "snapshot"), "empty snapshot name")
        if snapshot is not None and fmt == "raw":
            raise self.fail((*here, "snapshot"), 'raw images have no snapshots (format = "raw")')
        read_only = t.get_bool("read_only", snapshot is not None)
        if snapshot is not None and not read_only:
            raise self.fail((*here, "read_only"), "a snapshot is served read-only")
        allow = self.networks(t)
        require_tls = t.get_bool("require_tls", False)
        if require_tls and tls.mode is TlsMode.OFF:
            raise self.fail(
                (*here, "require_tls"), 'server.tls.mode is "off": no client could use this export'
            )
        export = ExportConfig(
            name=name,
            image=image,
            format=fmt,
            read_only=read_only,
            description=t.get_str("description", "") or "",
            snapshot=snapshot,
            allow=allow,
            allow_unix=t.get_bool("allow_unix", True),
            require_tls=require_tls,
            max_connections=t.get_int("max_connections", None, 1, 1 << 20),
        )
        t.finish()
        return export

    def networks(self, t: Table) -> tuple[Network, ...] | None:
        items = t.get_strings("allow")
        if items is None:
            return None
        nets: list[Network] = []
        for key, text in items:
            try:
                nets.append(ipaddress.ip_network(text))
            except ValueError as exc:
                try:
                    loose = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    msg = f"{describe(text)} is not an IP network ({exc})"
                    raise self.fail(key, msg) from None
                # 10.0.0.5/24 is most likely a typo: say so rather than guess.
                raise self.fail(
                    key, f"{describe(text)} has host bits set (did you mean \"{loose}\"?)"
                ) from None
        return tuple(nets)

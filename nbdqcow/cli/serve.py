"""``nbdqcow serve``: export one or more images over NBD until signalled.

The command only turns arguments into an :class:`~nbdqcow.exports.ExportCatalog`
and a :class:`~nbdqcow.server.ServerOptions`; everything else is the library
(:func:`nbdqcow.server.serve`), so embedding the server elsewhere needs none
of this module (see ``examples/embed_server.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
from typing import Any

from nbdqcow.activation import listen_fds
from nbdqcow.admin import AdminServer
from nbdqcow.config import ServerConfig, UnixAddress, client_allowed, load_config
from nbdqcow.errors import NbdqcowError
from nbdqcow.exports import ExportCatalog
from nbdqcow.metrics import Metrics
from nbdqcow.nbd import TlsMode
from nbdqcow.server import DEFAULT_PORT, NbdServer, ServerOptions, open_image
from nbdqcow.tls import TlsConfig

__all__ = ["register"]

_DEFAULTS = ServerOptions()


class UsageError(NbdqcowError):
    """The command line is inconsistent."""


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="export images over NBD",
        description="Export disk images over NBD (fixed newstyle, structured replies, "
        "block status, TLS).  Serves until SIGTERM or SIGINT.  Under systemd socket "
        "activation (LISTEN_FDS) it serves on the passed sockets.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-k", metavar="PATH", help="listen on a Unix socket")
    where.add_argument(
        "--bind", "-b", metavar="ADDR", action="append",
        help="TCP address to listen on (repeatable; default 127.0.0.1; '::' for IPv6)",
    )
    p.add_argument("--port", "-p", type=int, default=None,
                   help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("-x", "--export-name", dest="names", metavar="NAME", action="append",
                   default=[], help="export name of the n-th IMAGE (default: its file name); "
                   "the first image is also served to clients asking for the empty name")
    p.add_argument("-D", "--description", dest="descriptions", metavar="TEXT",
                   action="append", default=[], help="description of the n-th IMAGE")
    p.add_argument("--read-only", "-r", action="store_true", help="refuse writes")
    p.add_argument("--snapshot", "-l", metavar="NAME",
                   help="serve this internal qcow2 snapshot (id or name), read-only")
    p.add_argument("--format", "-f", choices=["raw", "qcow2"], default=None,
                   help="image format (default: probe)")
    p.add_argument("--tls", choices=[m.value for m in TlsMode], default=None,
                   help="STARTTLS policy (default: require when --tls-certs is given)")
    p.add_argument("--tls-certs", metavar="DIR",
                   help="x509 directory: ca-cert.pem, server-cert.pem, server-key.pem")
    p.add_argument("--tls-verify-peer", action="store_true",
                   help="require a client certificate signed by DIR/ca-cert.pem")
    p.add_argument("--handshake-timeout", type=float, default=_DEFAULTS.handshake_timeout,
                   metavar="SECONDS", help="drop clients that have not finished the "
                   "handshake after this long (default %(default)s)")
    p.add_argument("--max-in-flight", type=int, default=_DEFAULTS.max_in_flight,
                   metavar="N", help="requests served at once per connection "
                   "(default %(default)s)")
    p.add_argument("--verbose", "-v", action="store_true", help="log debug details")
    p.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="log lines as text (default) or one JSON object per line")
    p.add_argument("--config", "-c", metavar="FILE",
                   help="take listeners, limits, TLS, the admin endpoint and the exports "
                   "from an exports.toml file (then no IMAGE is given)")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> ServerOptions:
    tls: TlsConfig | None = None
    mode = TlsMode(args.tls) if args.tls else None
    if args.tls_certs:
        tls = TlsConfig.from_dir(args.tls_certs, verify_peer=args.tls_verify_peer,
                                 mode=mode or TlsMode.REQUIRED)
        if tls.mode is not TlsMode.OFF:
            tls.context()  # fail now, with a clear message, not at the first client
        else:
            tls = None
    elif mode not in (None, TlsMode.OFF):
        raise UsageError(f"--tls {mode.value} needs --tls-certs DIR")
    elif args.tls_verify_peer:
        raise UsageError("--tls-verify-peer needs --tls-certs DIR")
    if args.handshake_timeout <= 0:
        raise UsageError(f"--handshake-timeout must be positive, not {args.handshake_timeout}")
    if args.max_in_flight < 1:
        raise UsageError(f"--max-in-flight must be at least 1, not {args.max_in_flight}")
    return ServerOptions(
        handshake_timeout=args.handshake_timeout, max_in_flight=args.max_in_flight, tls=tls,
    )


async def _serve_config(cfg: ServerConfig) -> int:
    """Serve what an exports.toml describes (see :mod:`nbdqcow.config`)."""
    t = cfg.tls
    tls = None
    if t.mode.value != "off" and t.cert and t.key:
        tls = TlsConfig(certfile=t.cert, keyfile=t.key, cafile=t.ca,
                        verify_peer=t.verify_client, mode=TlsMode(t.mode.value))
    metrics = Metrics()
    options = ServerOptions(
        handshake_timeout=cfg.limits.handshake_timeout, max_in_flight=cfg.limits.max_in_flight,
        max_connections=cfg.limits.max_connections, tls=tls, metrics=metrics)
    async with ExportCatalog() as catalog:
        for e in cfg.exports:
            backend = await open_image(e.image, fmt=e.format, read_only=e.read_only,
                                       snapshot=e.snapshot)
            catalog.add(e.name, backend, description=e.description, require_tls=e.require_tls,
                        allow=functools.partial(client_allowed, e),
                        max_connections=e.max_connections, image=e.image, format=e.format)
        server = NbdServer(catalog, options)
        server.install_signal_handlers()
        for sock in listen_fds():
            server.add_listener(sock)
        for a in cfg.listen:
            if isinstance(a, UnixAddress):
                await server.listen_unix(a.path)
            else:
                await server.listen_tcp(a.host, a.port)
        async with AdminServer(server, metrics) as admin:
            if cfg.admin is not None:
                await admin.start(cfg.admin)
            await server.serve_forever()
    return 0


async def _serve(args: argparse.Namespace, config: ServerOptions) -> int:
    if not args.images:
        raise UsageError("no IMAGE to serve (or use --config FILE)")
    if len(args.names) > len(args.images):
        raise UsageError(f"{len(args.names)} export names for {len(args.images)} images")
    if len(args.descriptions) > len(args.images):
        raise UsageError(f"{len(args.descriptions)} descriptions for {len(args.images)} images")
    if args.port is not None and args.socket:
        raise UsageError("--port applies to TCP, not to --socket")
    async with ExportCatalog() as catalog:
        for i, image in enumerate(args.images):
            name = args.names[i] if i < len(args.names) else os.path.basename(image)
            desc = args.descriptions[i] if i < len(args.descriptions) else ""
            backend = await open_image(image, fmt=args.format, read_only=args.read_only,
                                       snapshot=args.snapshot)
            try:
                catalog.add(name, backend, description=desc, image=os.path.abspath(image),
                            format=args.format)
            except ValueError as e:
                await backend.aclose()
                raise UsageError(str(e)) from None
        server = NbdServer(catalog, config)
        # before listening: once the address is logged, SIGTERM must be clean
        server.install_signal_handlers()
        # systemd socket activation: the manager's sockets replace the default
        # listener (explicit --socket/--bind/--port are still honoured too).
        activated = listen_fds()
        for sock in activated:
            server.add_listener(sock)
        if args.socket:
            await server.listen_unix(args.socket)
        elif args.bind or args.port is not None or not activated:
            port = DEFAULT_PORT if args.port is None else args.port
            for host in args.bind or ["127.0.0.1"]:
                await server.listen_tcp(host, port)
        await server.serve_forever()
    return 0


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for journald/Loki-style collectors."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        })


def _setup_logging(verbose: bool, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s nbdqcow[%(process)d]: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def run(args: argparse.Namespace) -> int:
    if args.config:
        if args.images or args.socket or args.bind or args.port is not None or args.names:
            raise UsageError("--config FILE replaces IMAGE, --socket, --bind, --port and -x")
        cfg = load_config(args.config)
        _setup_logging(args.verbose, args.log_format or cfg.log_format.value)
        return asyncio.run(_serve_config(cfg))
    _setup_logging(args.verbose, args.log_format or "text")
    config = _config(args)
    return asyncio.run(_serve(args, config))

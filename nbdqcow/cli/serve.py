"""``nbdqcow serve``: export one or more images over NBD until signalled.

The command turns its flags (or an ``exports.toml``, :mod:`nbdqcow.config`)
into one :class:`~nbdqcow.config.ServerConfig`, then runs the library
(:class:`~nbdqcow.server.NbdServer` over an
:class:`~nbdqcow.exports.ExportCatalog`), so embedding the server elsewhere
needs none of this module (see ``examples/embed_server.py``).

Signals: SIGTERM/SIGINT shut down cleanly (in-flight requests finish, images
are flushed); SIGHUP reloads ``--config``.  Operator recipes:
``docs/operations.md``.

This module holds the flags, their translation into a configuration and the
running server; the exports (open, publish, reload) are
:mod:`nbdqcow.cli._publish`, the log output :mod:`nbdqcow.cli._logsetup`
(its formatters are re-exported here), :class:`UsageError`
:mod:`nbdqcow.cli._usage`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
from collections.abc import Coroutine, Iterator
from typing import Any

from nbdqcow.activation import listen_fds
from nbdqcow.admin import AdminServer
from nbdqcow.cli._logsetup import JsonFormatter, TextFormatter, _setup_logging
from nbdqcow.cli._publish import _open_all, _publish, _Reloader
from nbdqcow.cli._usage import UsageError
from nbdqcow.config import (
    ExportConfig,
    Limits,
    LogFormat,
    ServerConfig,
    TcpAddress,
    UnixAddress,
    load_config,
    parse_address,
)
from nbdqcow.errors import NbdqcowError
from nbdqcow.exports import ExportCatalog
from nbdqcow.metrics import Metrics
from nbdqcow.nbd import TlsMode
from nbdqcow.qcow2.create import create as create_qcow2
from nbdqcow.qcow2.create import parse_size
from nbdqcow.server import DEFAULT_PORT, NbdServer, ServerOptions
from nbdqcow.tls import TlsConfig

__all__ = ["JsonFormatter", "TextFormatter", "UsageError", "register"]

log = logging.getLogger("nbdqcow.serve")

_DEFAULTS = ServerOptions()


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="export images over NBD",
        description="Export disk images over NBD (fixed newstyle, structured replies, "
        "block status, TLS).  Serves until SIGTERM or SIGINT; SIGHUP reloads --config.  "
        "Under systemd socket activation (LISTEN_FDS) it serves on the passed sockets.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-k", metavar="PATH", help="listen on a Unix socket")
    where.add_argument(
        "--bind", "-b", metavar="ADDR", action="append",
        help="TCP address to listen on (repeatable; default 127.0.0.1; '::' for IPv6)",
    )
    p.add_argument("--port", "-p", type=int, default=None,
                   help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("-x", "--export-name", "--export", "-e", dest="names",
                   metavar="NAME|NAME=IMAGE", action="append", default=[],
                   help="NAME: the export name of the n-th IMAGE (default: its file name); "
                   "NAME=IMAGE: serve one more image as NAME (repeatable).  The first "
                   "export is also served to clients asking for the empty name")
    p.add_argument("-D", "--description", dest="descriptions", metavar="TEXT",
                   action="append", default=[], help="description of the n-th export")
    p.add_argument("--read-only", "-r", action="store_true", help="refuse writes")
    p.add_argument("--snapshot", "-l", metavar="NAME",
                   help="serve this internal qcow2 snapshot (id or name), read-only")
    p.add_argument("--format", "-f", choices=["raw", "qcow2"], default=None,
                   help="image format (default: probe the magic; backing files are "
                   "never probed)")
    p.add_argument("--create", metavar="SIZE",
                   help="create missing images of SIZE (e.g. 1G; qcow2 unless --format "
                   "raw) and print the commands that reach them")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help=f"clients at once (default {_DEFAULTS.max_connections})")
    p.add_argument("--tls", choices=[m.value for m in TlsMode], default=None,
                   help="STARTTLS policy (default: required when certificates are given)")
    p.add_argument("--tls-certs", metavar="DIR",
                   help="x509 directory: ca-cert.pem, server-cert.pem, server-key.pem")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM server certificate (chain)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="FILE", help="PEM CA for client certificates")
    p.add_argument("--tls-verify-peer", action="store_true",
                   help="require a client certificate signed by the CA")
    p.add_argument("--handshake-timeout", type=float, default=_DEFAULTS.handshake_timeout,
                   metavar="SECONDS", help="drop clients that have not finished the "
                   "handshake after this long (default %(default)s)")
    p.add_argument("--max-in-flight", type=int, default=_DEFAULTS.max_in_flight,
                   metavar="N", help="requests served at once per connection "
                   "(default %(default)s)")
    p.add_argument("--poll-max-us", type=int, default=_DEFAULTS.poll_max_us, metavar="US",
                   help="spin up to this long for the next request of a client that is "
                   "alone on the server, instead of sleeping (lower latency at queue "
                   "depth 1, like qemu's poll-max-ns); 0 disables (default %(default)s)")
    p.add_argument("--admin", metavar="ADDR",
                   help="admin HTTP endpoint (JSON, POST to drop a client, /metrics): "
                   "HOST:PORT or unix:PATH; off by default")
    p.add_argument("--event-loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="event loop implementation (uvloop: pip install 'nbdqcow[uvloop]'; "
                   "measured: less CPU per request and handshake, same throughput)")
    p.add_argument("--pid-file", metavar="PATH",
                   help="write the process id here once listening; removed at exit")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("--verbose", "-v", action="store_true", help="log debug details")
    loud.add_argument("--quiet", "-q", action="store_true", help="log warnings and errors only")
    p.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="log lines as text (default) or one JSON object per line")
    p.add_argument("--config", "-c", metavar="FILE",
                   help="take listeners, limits, TLS, the admin endpoint and the exports "
                   "from an exports.toml file (then no IMAGE is given); SIGHUP reloads it")
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files to serve (qcow2 or raw), named by -x or their file name")
    p.set_defaults(func=run)


# -- flags -> configuration ----------------------------------------------------


def _cli_tls(args: argparse.Namespace) -> TlsConfig | None:
    mode = TlsMode(args.tls) if args.tls else None
    files = args.tls_cert or args.tls_key or args.tls_ca
    if args.tls_certs and files:
        raise UsageError("--tls-certs DIR and --tls-cert/--tls-key/--tls-ca exclude each other")
    tls: TlsConfig | None = None
    if args.tls_certs:
        if not os.path.isdir(args.tls_certs):
            raise UsageError(f"--tls-certs {args.tls_certs}: directory not found")
        tls = TlsConfig.from_dir(args.tls_certs, verify_peer=args.tls_verify_peer,
                                 mode=mode or TlsMode.REQUIRED)
    elif files:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        tls = TlsConfig(certfile=args.tls_cert, keyfile=args.tls_key, cafile=args.tls_ca,
                        verify_peer=args.tls_verify_peer, mode=mode or TlsMode.REQUIRED)
    elif mode not in (None, TlsMode.OFF):
        raise UsageError(f"--tls {mode.value} needs --tls-certs DIR or --tls-cert/--tls-key")
    elif args.tls_verify_peer:
        raise UsageError("--tls-verify-peer needs --tls-certs DIR or --tls-ca FILE")
    if tls is None or tls.mode is TlsMode.OFF:
        return None
    tls.context()  # fail now, with a clear message, not at the first client
    return tls


def _file_tls(cfg: ServerConfig) -> TlsConfig | None:
    t = cfg.tls
    if t.mode.value == "off" or not (t.cert and t.key):
        return None
    tls = TlsConfig(certfile=t.cert, keyfile=t.key, cafile=t.ca,
                    verify_peer=t.verify_client, mode=TlsMode(t.mode.value))
    tls.context()
    return tls


def _cli_exports(args: argparse.Namespace) -> list[ExportConfig]:
    # -x/--export NAME names the n-th positional IMAGE (qemu-nbd's -x);
    # --export NAME=IMAGE brings its own image.
    names = [n for n in args.names if "=" not in n]
    pairs = [n for n in args.names if "=" in n]
    if len(names) > len(args.images):
        raise UsageError(f"{len(names)} export names for {len(args.images)} images")
    named: list[tuple[str, str]] = []
    for i, image in enumerate(args.images):
        named.append((names[i] if i < len(names) else os.path.basename(image), image))
    for pair in pairs:
        name, _, image = pair.partition("=")
        if not image:
            raise UsageError(f"--export {pair!r}: expected NAME=IMAGE")
        named.append((name, image))
    if not named:
        raise UsageError("no IMAGE to serve (give IMAGE, --export NAME=IMAGE or --config FILE)")
    if len(args.descriptions) > len(named):
        raise UsageError(f"{len(args.descriptions)} descriptions for {len(named)} images")
    seen: set[str] = set()
    out = []
    for i, (name, image) in enumerate(named):
        if name in seen:
            raise UsageError(f"export {name!r} is defined twice")
        seen.add(name)
        desc = args.descriptions[i] if i < len(args.descriptions) else ""
        out.append(ExportConfig(name=name, image=os.path.abspath(image), format=args.format,
                                read_only=args.read_only, description=desc,
                                snapshot=args.snapshot))
    return out


def _cli_config(args: argparse.Namespace) -> ServerConfig:
    if args.port is not None and args.socket:
        raise UsageError("--port applies to TCP, not to --socket")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: not a port number (0-65535)")
    if args.handshake_timeout <= 0:
        raise UsageError(f"--handshake-timeout must be positive, not {args.handshake_timeout}")
    if args.max_in_flight < 1:
        raise UsageError(f"--max-in-flight must be at least 1, not {args.max_in_flight}")
    if not 0 <= args.poll_max_us <= 1000:
        raise UsageError(f"--poll-max-us must be 0 to 1000, not {args.poll_max_us}")
    if args.max_connections is not None and args.max_connections < 1:
        raise UsageError(f"--max-connections must be at least 1, not {args.max_connections}")
    listen: tuple[TcpAddress | UnixAddress, ...]
    if args.socket:
        listen = (UnixAddress(args.socket),)
    else:
        port = DEFAULT_PORT if args.port is None else args.port
        listen = tuple(TcpAddress(h, port) for h in args.bind or ["127.0.0.1"])
    admin = None
    if args.admin:
        try:
            admin = parse_address(args.admin, default_port=None)
        except ValueError as e:
            raise UsageError(f"--admin: {e}") from None
    return ServerConfig(
        listen=listen,
        limits=Limits(max_connections=args.max_connections or _DEFAULTS.max_connections,
                      max_in_flight=args.max_in_flight,
                      handshake_timeout=args.handshake_timeout,
                      poll_max_us=args.poll_max_us),
        admin=admin,
        log_format=LogFormat(args.log_format or "text"),
        exports=tuple(_cli_exports(args)),
    )


def _create_missing(exports: tuple[ExportConfig, ...], size_text: str, fmt: str | None) -> None:
    try:
        size = parse_size(size_text)
    except (ValueError, NbdqcowError) as exc:
        raise UsageError(f"--create {size_text!r}: {exc}") from None
    if size <= 0:
        raise UsageError(f"--create {size_text!r}: the size must be positive")
    for e in exports:
        if os.path.exists(e.image):
            continue
        if fmt == "raw":
            with open(e.image, "xb") as f:
                f.truncate(size)  # sparse: nothing written yet
        else:
            create_qcow2(e.image, size)
        log.info("created %s (%s, %d bytes)", e.image, fmt or "qcow2", size)


# -- running -------------------------------------------------------------------


def _client_commands(addresses: list[str], name: str) -> Iterator[str]:
    """The commands that reach export ``name`` at the first address."""
    where = addresses[0]
    q = shlex.quote
    if where.startswith("unix:"):
        path = where.removeprefix("unix:")
        uri = f"nbd+unix:///{name}?socket={path}"
        yield f"qemu-io -f raw -c 'read -v 0 512' {q(uri)}"
        yield f"nbdinfo {q(uri)}"
        yield f"nbd-client -u {q(path)} /dev/nbd0 -N {q(name)}"
    else:
        hostport = where.removeprefix("tcp:")
        host, _, port = hostport.rpartition(":")
        # a wildcard address is where the server listens, not where to connect
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
        hostport = f"{host}:{port}"
        uri = f"nbd://{hostport}/{name}"
        yield f"qemu-io -f raw -c 'read -v 0 512' {q(uri)}"
        yield f"nbdinfo {q(uri)}"
        yield f"nbd-client {host.strip('[]')} {port} /dev/nbd0 -N {q(name)}"


async def _serve(cfg: ServerConfig, tls: TlsConfig | None, *, config_path: str | None = None,
                 pid_file: str | None = None, print_commands: bool = False) -> int:
    metrics = Metrics() if cfg.admin is not None else None
    options = ServerOptions(
        handshake_timeout=cfg.limits.handshake_timeout, max_in_flight=cfg.limits.max_in_flight,
        max_connections=cfg.limits.max_connections, poll_max_us=cfg.limits.poll_max_us,
        tls=tls, metrics=metrics)
    async with ExportCatalog() as catalog:
        opened = await _open_all(cfg.exports, lambda e: None)
        try:
            for e, backend in opened:
                _publish(catalog, e, backend)
        except BaseException:
            for _, b in opened[len(list(catalog)):]:
                await b.aclose()
            raise
        server = NbdServer(catalog, options)
        # before listening: once the address is logged, SIGTERM must be clean
        server.install_signal_handlers()
        loop = asyncio.get_running_loop()
        if config_path is not None:
            reloader = _Reloader(config_path, cfg, catalog, opened)
            if metrics is not None:
                # a removed export's series go once its last client has left
                catalog.on_retired_idle = metrics.forget_export
            loop.add_signal_handler(signal.SIGHUP, reloader.on_sighup)
        else:
            loop.add_signal_handler(
                signal.SIGHUP, log.info, "SIGHUP: nothing to reload without --config")
        # systemd socket activation: the manager's sockets replace the
        # configured listeners (which systemd itself holds bound).
        activated = listen_fds()
        for sock in activated:
            server.add_listener(sock)
        if activated:
            log.info("socket-activated: serving on the %d passed socket(s) only",
                     len(activated))
        else:
            for a in cfg.listen:
                if isinstance(a, UnixAddress):
                    await server.listen_unix(a.path)
                else:
                    await server.listen_tcp(a.host, a.port)
        async with AdminServer(server, metrics or Metrics()) as admin:
            if cfg.admin is not None:
                await admin.start(cfg.admin)
            if pid_file is not None:
                with open(pid_file, "w") as f:
                    f.write(f"{os.getpid()}\n")
            try:
                if print_commands:
                    first = cfg.exports[0].name
                    print("Serving. Reach it with:", *_client_commands(server.addresses, first),
                          sep="\n  ", flush=True)
                await server.serve_forever()
            finally:
                if pid_file is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(pid_file)
    return 0



def _check_pid_file(path: str | None) -> None:
    # Fail before listening, not after (a half-started server helps no one);
    # the pid itself is written once the listeners are up.
    if path is not None:
        existed = os.path.exists(path)
        with open(path, "a"):
            pass
        if not existed:  # a failed start must not leave an empty pid file behind
            os.unlink(path)


# Flags that the file's [server]/[exports] settings replace; given together
# with --config they would be silently ignored, so they are refused.
_CONFIG_REPLACES = (
    ("images", "IMAGE"), ("socket", "--socket"), ("bind", "--bind"), ("port", "--port"),
    ("names", "-x/--export"), ("descriptions", "-D"), ("read_only", "--read-only"),
    ("snapshot", "--snapshot"), ("format", "--format"), ("create", "--create"),
    ("max_connections", "--max-connections"), ("tls", "--tls"), ("tls_certs", "--tls-certs"),
    ("tls_cert", "--tls-cert"), ("tls_key", "--tls-key"), ("tls_ca", "--tls-ca"),
    ("tls_verify_peer", "--tls-verify-peer"), ("admin", "--admin"),
    ("handshake_timeout", "--handshake-timeout"), ("max_in_flight", "--max-in-flight"),
    ("poll_max_us", "--poll-max-us"),
)


def _flags_given_with_config(args: argparse.Namespace) -> list[str]:
    defaults = {"handshake_timeout": _DEFAULTS.handshake_timeout,
                "max_in_flight": _DEFAULTS.max_in_flight,
                "poll_max_us": _DEFAULTS.poll_max_us}
    return [flag for attr, flag in _CONFIG_REPLACES
            if getattr(args, attr) not in (None, False, [], defaults.get(attr))]


def run(args: argparse.Namespace) -> int:
    _check_pid_file(args.pid_file)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if args.config:
        clash = _flags_given_with_config(args)
        if clash:
            raise UsageError(f"--config FILE replaces {', '.join(clash)}: set them in the file")
        cfg = load_config(args.config)
        _setup_logging(level, args.log_format or cfg.log_format.value)
        tls = _file_tls(cfg)
        return _run_loop(args.event_loop,
                         _serve(cfg, tls, config_path=os.path.abspath(args.config),
                                pid_file=args.pid_file))
    _setup_logging(level, args.log_format or "text")
    cfg = _cli_config(args)
    tls = _cli_tls(args)
    if args.create:
        if args.snapshot:
            raise UsageError("--create makes a new image; it has no snapshot to serve")
        _create_missing(cfg.exports, args.create, args.format)
    return _run_loop(args.event_loop,
                     _serve(cfg, tls, pid_file=args.pid_file, print_commands=bool(args.create)))


def _run_loop(kind: str, main: Coroutine[Any, Any, int]) -> int:
    """Run the server on the chosen event loop.

    uvloop is optional (issue 6: "optional at most, measured both ways").
    Measured on the 2-core CI machine, raw image, fio 4 KiB requests, server
    CPU per request from ``/proc`` (asyncio -> uvloop): random read QD1
    47.5-48.1 -> 39.1-40.6 us, QD32 9.6-9.9 -> 9.7 us, random write QD32
    22.1 -> 20.0-20.6 us; handshakes about 6% less CPU; throughput within
    noise.  The server uses nothing loop-specific (raw sockets with
    ``add_reader``, ``run_in_executor``, signal handlers), so both run the
    same code.
    """
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            raise UsageError("--event-loop uvloop needs the uvloop package "
                             "(pip install 'nbdqcow[uvloop]')") from None
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


"""systemd socket activation: the listening sockets passed in by the service manager.

Mirrors sd_listen_fds(3) and sd_listen_fds_with_names(3): systemd (or any
manager following the same protocol, e.g. ``systemd-socket-activate``) opens
the sockets of a ``.socket`` unit, then starts the service with them as file
descriptors 3, 4, ... and with the environment:

``LISTEN_PID``
    the process the sockets are meant for; anyone else (a child that inherited
    the environment) must ignore them.
``LISTEN_FDS``
    how many descriptors, starting at ``SD_LISTEN_FDS_START`` (3).
``LISTEN_FDNAMES``
    optional, colon-separated names (``FileDescriptorName=`` in the unit).

As sd_listen_fds(3) does with ``unset_environment``, the variables are removed
after they are read so that processes we start do not take the sockets for
theirs.  The descriptors are made close-on-exec for the same reason.

The returned sockets are ready for ``asyncio`` (``loop.create_server(sock=...)``
or ``asyncio.start_server(sock=...)``, which also makes them non-blocking).
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import MutableMapping

from nbdqcow.errors import NbdqcowError

__all__ = ["SD_LISTEN_FDS_START", "ActivationError", "listen_fds", "listen_fds_with_names"]

#: The first passed descriptor (sd-daemon.h).
SD_LISTEN_FDS_START = 3

_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(NbdqcowError):
    """The socket-activation environment is malformed or names unusable descriptors."""


def listen_fds(
    *, unset_environment: bool = True, environ: MutableMapping[str, str] | None = None
) -> list[socket.socket]:
    """The sockets passed by the service manager; empty when not socket-activated."""
    return [sock for _, sock in listen_fds_with_names(
        unset_environment=unset_environment, environ=environ
    )]


def listen_fds_with_names(
    *, unset_environment: bool = True, environ: MutableMapping[str, str] | None = None
) -> list[tuple[str, socket.socket]]:
    """The passed sockets with their ``LISTEN_FDNAMES`` names (``"unknown"`` if unnamed).

    Args:
        unset_environment: remove the ``LISTEN_*`` variables afterwards, whatever
            the outcome (sd_listen_fds(3) semantics).
        environ: the environment to read (default ``os.environ``).

    Returns:
        An empty list when ``LISTEN_PID`` is unset or names another process.

    Raises:
        ActivationError: a variable is malformed, or a descriptor is not an
            open listening stream socket.
    """
    env = os.environ if environ is None else environ
    try:
        return _read(env)
    finally:
        if unset_environment:
            for name in _VARS:
                env.pop(name, None)


def _number(env: MutableMapping[str, str], name: str) -> int:
    text = env[name]
    if not text.isdigit():
        raise ActivationError(f"{name}={text!r} is not a non-negative integer")
    return int(text)


def _read(env: MutableMapping[str, str]) -> list[tuple[str, socket.socket]]:
    if "LISTEN_PID" not in env:
        return []
    if _number(env, "LISTEN_PID") != os.getpid():
        return []  # inherited by a child: the sockets belong to our parent
    if "LISTEN_FDS" not in env:
        raise ActivationError("LISTEN_PID is set but LISTEN_FDS is not")
    count = _number(env, "LISTEN_FDS")
    names = ["unknown"] * count
    if "LISTEN_FDNAMES" in env:
        names = env["LISTEN_FDNAMES"].split(":")
        if len(names) != count:
            raise ActivationError(
                f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} descriptors"
            )
    out: list[tuple[str, socket.socket]] = []
    try:
        for i in range(count):
            out.append((names[i], _adopt(SD_LISTEN_FDS_START + i)))
    except BaseException:
        # Do not close what we could not adopt: the descriptor is not ours to close.
        for _, sock in out:
            sock.detach()
        raise
    return out


def _adopt(fd: int) -> socket.socket:
    """Wrap passed descriptor ``fd`` after checking it is a listening stream socket."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        # Not for our children: a qemu-img we run must not hold the listener open.
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    except OSError as exc:
        raise ActivationError(f"passed descriptor {fd} is not open ({exc.strerror})") from None
    try:
        # With fileno= the family, type and protocol are read from the descriptor.
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"passed descriptor {fd} is not a socket ({exc.strerror})") from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ActivationError(f"passed descriptor {fd} is not a stream socket (use "
                                  "ListenStream= in the .socket unit)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"passed descriptor {fd} is a socket that is not listening "
                                  "(Accept=yes is not supported; use Accept=no)")
    except BaseException:
        sock.detach()
        raise
    return sock

"""nbdqcow.activation: sockets passed by a service manager, as systemd passes them.

The real thing is exercised: a child Python process is started the way
systemd starts a socket-activated service -- the listening sockets dup'ed to
descriptors 3, 4, ... between fork and exec, ``LISTEN_PID`` equal to the
child's own pid (``sh -c 'LISTEN_PID=$$ exec ...'``, as
``systemd-socket-activate`` does), ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` set.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nbdqcow.activation import ActivationError, listen_fds, listen_fds_with_names

CHILD = textwrap.dedent(
    """
    import fcntl, json, os, sys
    from nbdqcow.activation import ActivationError, listen_fds_with_names
    try:
        socks = listen_fds_with_names()
    except ActivationError as exc:
        print(json.dumps({"error": str(exc),
                          "env": [k for k in os.environ if k.startswith("LISTEN_")]}))
        sys.exit(1)
    print(json.dumps({
        "socks": [[name, s.fileno(), int(s.family), int(s.type),
                   bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)]
                  for name, s in socks],
        "env": [k for k in os.environ if k.startswith("LISTEN_")],
    }), flush=True)
    for name, s in socks:      # prove these are the very sockets the parent listens on
        conn, _ = s.accept()
        conn.sendall(f"hello from {name}".encode())
        conn.close()
    """
)


def activate(
    fds: list[int], names: str | None = None, listen_pid: str = "$$", count: int | None = None
) -> subprocess.Popen[str]:
    """Start CHILD with ``fds`` as descriptors 3, 4, ... and the LISTEN_* variables."""
    env = dict(os.environ)
    env["LISTEN_FDS"] = str(len(fds) if count is None else count)
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    env.pop("LISTEN_PID", None)

    def place_fds() -> None:
        # Runs in the child between fork and exec, like systemd's service setup.
        # Move everything out of the way first: a source may itself be 3 or 4.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)
            os.close(fd)

    script = f'LISTEN_PID={listen_pid}; export LISTEN_PID; exec "$@"'
    return subprocess.Popen(
        ["/bin/sh", "-c", script, "sh", sys.executable, "-c", CHILD],
        env=env,
        preexec_fn=place_fds,
        pass_fds=tuple(range(3, 3 + len(fds))),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def report(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.communicate(timeout=10)
    result: dict[str, object] = json.loads(line)
    return result


def test_tcp_and_unix_sockets_are_adopted(tmp_path: Path) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_path = str(tmp_path / "nbd.sock")
    unix.bind(unix_path)
    unix.listen()
    with tcp, unix:
        proc = activate([tcp.fileno(), unix.fileno()], names="nbd:nbd-unix")
        try:
            info = report(proc)
            assert info["socks"] == [
                ["nbd", 3, int(socket.AF_INET), int(socket.SOCK_STREAM), True],
                ["nbd-unix", 4, int(socket.AF_UNIX), int(socket.SOCK_STREAM), True],
            ]
            assert info["env"] == [], "LISTEN_* must be unset after reading"
            with socket.create_connection(tcp.getsockname(), timeout=10) as c:
                assert c.recv(100) == b"hello from nbd"
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(10)
                c.connect(unix_path)
                assert c.recv(100) == b"hello from nbd-unix"
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()
            proc.communicate()


def test_unnamed_sockets_are_unknown() -> None:
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as tcp6:
        proc = activate([tcp6.fileno()])
        try:
            info = report(proc)
            assert info["socks"] == [
                ["unknown", 3, int(socket.AF_INET6), int(socket.SOCK_STREAM), True]
            ]
            with socket.create_connection(tcp6.getsockname()[:2], timeout=10) as c:
                assert c.recv(100) == b"hello from unknown"
        finally:
            proc.kill()
            proc.communicate()


def test_sockets_for_another_process_are_ignored() -> None:
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        proc = activate([tcp.fileno()], listen_pid="1")
        info = report(proc)
        assert info == {"socks": [], "env": []}
        assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("file", "passed descriptor 3 is not a socket"),
        ("connected", "passed descriptor 3 is a socket that is not listening"),
        ("datagram", "passed descriptor 3 is not a stream socket"),
    ],
)
def test_unusable_descriptors_are_refused(tmp_path: Path, kind: str, message: str) -> None:
    keep: list[socket.socket] = []
    if kind == "file":
        f = open(tmp_path / "plain", "w")  # noqa: SIM115 -- closed below
        fd = f.fileno()
    elif kind == "connected":
        a, b = socket.socketpair()
        keep += [a, b]
        fd = a.fileno()
    else:
        d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        keep.append(d)
        fd = d.fileno()
    try:
        proc = activate([fd])
        info = report(proc)
        assert proc.wait(timeout=10) == 1
        assert isinstance(info["error"], str) and info["error"].startswith(message)
        assert info["env"] == [], "variables are unset even when reading fails"
    finally:
        for s in keep:
            s.close()
        if kind == "file":
            f.close()


def test_count_beyond_passed_descriptors() -> None:
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        proc = activate([tcp.fileno()], count=3)
        info = report(proc)
        assert proc.wait(timeout=10) == 1
        # fd 4 is not open in the child (pass_fds kept only 3)
        assert info["error"] == "passed descriptor 4 is not open (Bad file descriptor)"


class TestEnvironment:
    """Parsing rules, on an explicit environment mapping (no descriptors involved)."""

    def test_not_activated(self) -> None:
        env: dict[str, str] = {"PATH": "/bin"}
        assert listen_fds(environ=env) == []
        assert env == {"PATH": "/bin"}

    def test_other_pid_is_ignored_and_unset(self) -> None:
        env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
        assert listen_fds(environ=env) == []
        assert env == {}

    def test_keep_environment(self) -> None:
        env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
        assert listen_fds(environ=env, unset_environment=False) == []
        assert env == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}

    def test_zero_descriptors(self) -> None:
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
        assert listen_fds_with_names(environ=env) == []

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"LISTEN_PID": "me"}, "LISTEN_PID='me' is not a non-negative integer"),
            ({"LISTEN_PID": "{pid}"}, "LISTEN_PID is set but LISTEN_FDS is not"),
            ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1"},
             "LISTEN_FDS='-1' is not a non-negative integer"),
            ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"},
             "LISTEN_FDNAMES has 1 names for LISTEN_FDS=2 descriptors"),
        ],
    )
    def test_malformed(self, env: dict[str, str], message: str) -> None:
        env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
        with pytest.raises(ActivationError) as info:
            listen_fds(environ=env)
        assert str(info.value) == message
        assert env == {}, "unset even on error, as sd_listen_fds(3) does"

"""AdaptivePoll (nbdqcow/poll.py) on real socket pairs: what a wait
returns, and how the window follows what polling achieves."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from nbdqcow.poll import AdaptivePoll

MS = 1_000_000


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_data_already_there_is_found_and_not_consumed(
        pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    poll = AdaptivePoll(max_ns=40 * MS)
    client.sendall(b"request")
    assert poll.wait(server, bytearray(1))
    assert server.recv(64) == b"request"  # MSG_PEEK took nothing
    assert poll.window_ns == 40 * MS  # a hit keeps the window at its maximum


def test_misses_shrink_the_window_to_off(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    poll = AdaptivePoll(max_ns=8 * MS, min_ns=MS)
    windows = []
    while poll.window_ns:
        assert not poll.wait(server, bytearray(1))
        windows.append(poll.window_ns)
    assert windows == [4 * MS, 2 * MS, 1 * MS, 0]
    # Off: a wait gives up at once, without a probe.
    t = time.perf_counter_ns()
    assert not poll.wait(server, bytearray(1))
    assert time.perf_counter_ns() - t < 8 * MS


def test_a_miss_waits_for_the_whole_window(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    poll = AdaptivePoll(max_ns=20 * MS)
    t = time.perf_counter_ns()
    assert not poll.wait(server, bytearray(1))
    assert time.perf_counter_ns() - t >= 20 * MS


def test_data_arriving_during_the_spin_is_caught(
        pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    poll = AdaptivePoll(max_ns=5000 * MS)  # far longer than the sender's delay
    sender = threading.Timer(0.02, client.sendall, (b"x",))
    sender.start()
    try:
        assert poll.wait(server, bytearray(1))
    finally:
        sender.join()
    assert server.recv(1) == b"x"


def test_eof_ends_the_wait(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.close()
    assert AdaptivePoll(max_ns=5000 * MS).wait(server, bytearray(1))
    assert server.recv(1) == b""


def test_a_wakeup_soon_after_a_miss_grows_the_window(
        pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    poll = AdaptivePoll(max_ns=200 * MS, min_ns=50 * MS)
    for _ in range(3):  # 100, 50, off
        poll.wait(server, bytearray(1))
    assert poll.window_ns == 0
    assert not poll.wait(server, bytearray(1))  # a miss while off...
    poll.woke()  # ...and data right after: polling would have paid
    assert poll.window_ns > 0


def test_a_late_wakeup_leaves_polling_off(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    poll = AdaptivePoll(max_ns=4 * MS, min_ns=2 * MS)
    for _ in range(2):  # 2, off
        poll.wait(server, bytearray(1))
    assert poll.window_ns == 0
    assert not poll.wait(server, bytearray(1))
    time.sleep(0.02)  # five times the maximum window: an idle client
    poll.woke()
    assert poll.window_ns == 0

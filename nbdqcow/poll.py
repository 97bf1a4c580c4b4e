"""Adaptive busy polling: wait for a connection's next request by spinning
for a few microseconds before going back to the event loop.

A client at queue depth 1 sends its next request a few microseconds after
our reply reaches it.  Returning to the event loop in between costs the
loop's own Python (``_run_once``), an ``epoll_wait`` that puts the process
to sleep, and the wake-up when the request lands, which on a virtual
machine is the largest part.  Spinning on a non-blocking ``recv(...,
MSG_PEEK)`` for a bounded window catches the request without sleeping.
qemu does the same for its I/O threads (``poll-max-ns``, 32 us by default,
growing and shrinking the window with what polling achieves), and this
class follows that policy:

* a poll that finds data doubles the window, up to the maximum;
* a poll that finds nothing halves it (it cost the whole window for
  nothing), down to nothing;
* a request that arrives through the event loop soon after a poll gave up,
  or while polling was off, means polling would have paid: the window grows
  again (qemu grows it when the wait after polling was short).

The caller polls only when nothing else needs the event loop: one client in
transmission (with several, a spin on one would delay the others, which is
why ``seq-read-4c`` never polls), no reply waiting for the socket, no
request of its own running in a task; and for at most about a millisecond
per readable callback (``pump._POLL_BUDGET_NS``), so that a client fast
enough to be caught every time cannot keep accepts, timers and signal
handlers from running (review: without the bound one ``_pump`` call ran
for 347 ms under fio at queue depth 1).

Measured with the CI machine's fio nbd engine (4 KiB random reads of a
cached raw file, QD1, Unix socket, five alternating pairs, load 3.5 from
other jobs): 12.4k IOPS without polling, 15.8k with a 30 us window (medians),
server CPU per request 60 -> 49 us: the spin is cheaper than the sleep and
wake-up it replaces.
"""

from __future__ import annotations

import socket
from time import perf_counter_ns

__all__ = ["DEFAULT_POLL_NS", "MIN_POLL_NS", "AdaptivePoll"]

#: qemu's default ``poll-max-ns`` for I/O threads.
DEFAULT_POLL_NS = 32_000

#: Below this the window is off (a spin this short rarely catches anything,
#: and each probe is a syscall); it grows back from here.
MIN_POLL_NS = 2_000


class AdaptivePoll:
    """The polling window of one connection (see the module docstring)."""

    __slots__ = ("_max", "_min", "_missed", "_window")

    def __init__(self, max_ns: int = DEFAULT_POLL_NS, min_ns: int = MIN_POLL_NS) -> None:
        self._max = max_ns
        self._min = min_ns
        self._window = max_ns
        #: when the last wait that caught nothing began, or 0
        self._missed = 0

    @property
    def window_ns(self) -> int:
        """The current window (0 while polling is off)."""
        return self._window

    def woke(self) -> None:
        """The event loop delivered data.  If it came within the maximum
        window of the last wait that caught nothing, a window that long
        would have caught it: grow to half again the gap (at least double),
        so the next gap like it is caught."""
        missed = self._missed
        if missed:
            self._missed = 0
            gap = perf_counter_ns() - missed
            if gap <= self._max:
                self._window = min(self._max, max(self._min, self._window * 2, gap * 3 // 2))

    def wait(self, sock: socket.socket, probe: bytearray) -> bool:
        """Spin until ``sock`` has data (or EOF, or an error) to receive:
        True; or the window passes: False.  ``probe`` is a scratch buffer of
        at least one byte (``MSG_PEEK``: nothing is consumed)."""
        start = perf_counter_ns()
        window = self._window
        if window < self._min:
            self._missed = start
            return False
        deadline = start + window
        recv_into = sock.recv_into
        while True:
            try:
                recv_into(probe, 1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                if perf_counter_ns() < deadline:
                    continue
                self._window = window // 2 if window // 2 >= self._min else 0
                self._missed = start
                return False
            except OSError:
                pass  # ECONNRESET and the like: the receive reports it
            # Data, or EOF (0 bytes): either way the caller receives now.
            self._window = min(self._max, window * 2)
            return True

"""BufferPool: reusable payload buffers for one NBD connection.

Read payloads are read into these buffers and sent from them as
``memoryview`` slices; WRITE payloads are received straight into them by the
protocol core's ``allocate`` callback and handed to ``pwritev``
(:mod:`nbdqcow.session`).  A connection that only negotiates allocates
nothing: buffers appear with the first request of a size and are then reused.
"""

from __future__ import annotations

__all__ = ["BufferPool"]


class BufferPool:
    """Reusable payload buffers for one connection.

    Sizes are rounded up to a power of two (at least 4 KiB); at most
    ``keep`` buffers per size are kept, and none above ``keep_max``, so a
    connection doing 64 KiB I/O settles on a handful of 64 KiB buffers while
    a burst of 32 MiB writes pins nothing once it is over.
    """

    def __init__(self, keep: int = 4, keep_max: int = 1 << 20) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._keep = keep
        self._keep_max = keep_max

    @staticmethod
    def _class(n: int) -> int:
        return max(4096, 1 << (max(n, 1) - 1).bit_length())

    def get(self, n: int) -> memoryview:
        size = self._class(n)
        free = self._free.get(size)
        buf = free.pop() if free else bytearray(size)
        return memoryview(buf)[:n]

    def put(self, view: memoryview) -> None:
        base = view.obj
        if not isinstance(base, bytearray):
            return
        size = len(base)
        if size > self._keep_max:
            return  # big buffers are rare; let them go
        # Released: a task that still used the view after recycling would
        # fail loudly instead of reading another request's data.
        view.release()
        free = self._free.setdefault(size, [])
        if len(free) < self._keep:
            free.append(base)

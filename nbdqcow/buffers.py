"""BufferPool: reusable payload buffers for one NBD connection.

Read payloads are read into these buffers and sent from them as
``memoryview`` slices; WRITE payloads are received straight into them by the
protocol core's ``allocate`` callback and handed to ``pwritev``
(:mod:`nbdqcow.session`).  A connection that only negotiates allocates
nothing: buffers appear with the first request of a size and are then reused.
"""

from __future__ import annotations

__all__ = ["BufferPool", "Release"]

#: What an answered request holds until its reply has been sent
#: (``Session._release``): one payload buffer, whose size is also its
#: budget cost (an inline READ); a bare budget cost (an inline WRITE: 0, a
#: sendfile READ: its length); or buffers and a cost (the async path).
#: Plain objects, not a tuple per request (issue 6: the QD32 read path).
Release = memoryview | int | tuple[list[memoryview], int]


class BufferPool:
    """Reusable payload buffers for one connection.

    Sizes are rounded up to a power of two (at least 4 KiB); at most
    ``keep`` buffers per size are kept, none above ``keep_max``, and at most
    ``keep_bytes`` in all, so a connection doing 256 KiB I/O with 16 requests
    in flight settles on 16 buffers of 256 KiB (allocating a zeroed 256 KiB
    ``bytearray`` per request cost a third of the server's CPU time in a
    sequential read under cProfile), while a burst of 32 MiB writes pins
    nothing once it is over.
    """

    def __init__(self, keep: int = 64, keep_max: int = 1 << 20,
                 keep_bytes: int = 8 << 20) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._keep = keep
        self._keep_max = keep_max
        self._keep_bytes = keep_bytes
        self._kept = 0
        #: The free list of 4 KiB buffers (``_free[4096]`` once created),
        #: named for the fast paths of :meth:`get` and :meth:`release`:
        #: random 4 KiB I/O takes one per request.  None when ``keep_max``
        #: keeps no 4 KiB buffer.
        self._free4k: list[bytearray] | None = None
        if keep_max >= 4096:
            self._free4k = self._free[4096] = []

    @staticmethod
    def _class(n: int) -> int:
        return 4096 if n <= 4096 else 1 << (n - 1).bit_length()

    def get(self, n: int) -> memoryview:
        if n == 4096:
            # Issue 6: the buffer of a 4 KiB request without the size class
            # and the dict lookup (with release()'s 4 KiB path: get and
            # release 6.6k -> 5.5k instructions per 4 KiB read, callgrind,
            # the pump's read path in process).
            free4k = self._free4k
            if free4k:
                self._kept -= 4096
                return memoryview(free4k.pop())
            return memoryview(bytearray(4096))
        size = 4096 if n <= 4096 else 1 << (n - 1).bit_length()
        free = self._free.get(size)
        if free:
            self._kept -= size
            view = memoryview(free.pop())
        else:
            view = memoryview(bytearray(size))
        # A whole buffer needs no second view (a 4 KiB READ's case).
        return view if n == size else view[:n]

    def put(self, view: memoryview) -> None:
        base = view.obj
        if type(base) is not bytearray:
            return
        size = len(base)
        if size > self._keep_max or self._kept + size > self._keep_bytes:
            return  # big buffers are rare; let them go
        # Released: a task that still used the view after recycling would
        # fail loudly instead of reading another request's data.
        view.release()
        free = self._free.get(size)
        if free is None:
            free = self._free[size] = []
        if len(free) < self._keep:
            free.append(base)
            self._kept += size

    def release(self, releases: list[Release]) -> int:
        """Take back the buffers of answered requests whose replies have
        been sent (:data:`Release` entries); return their budget cost.

        One call per sent batch, :meth:`put` inlined for the usual entry,
        a 4 KiB READ's buffer (issue 6: QD32 reads put 20-30 per batch)."""
        freed = 0
        free_lists = self._free
        keep, keep_max, keep_bytes = self._keep, self._keep_max, self._keep_bytes
        kept = self._kept
        free4k = self._free4k
        for r in releases:
            t = type(r)
            if t is memoryview:  # an inline READ's buffer: its size is its cost
                view: memoryview = r  # type: ignore[assignment]  # the exact type test
                freed += view.nbytes
                base = view.obj
                if type(base) is not bytearray:
                    continue
                size = len(base)
                if size == 4096 and free4k is not None:
                    # The usual entry: the 4 KiB list, no dict lookup
                    # (keep_max >= 4096 when the list exists).
                    if kept + 4096 <= keep_bytes:
                        view.release()
                        if len(free4k) < keep:
                            free4k.append(base)
                            kept += 4096
                    continue
                if size > keep_max or kept + size > keep_bytes:
                    continue
                view.release()  # as in put()
                free = free_lists.get(size)
                if free is None:
                    free = free_lists[size] = []
                if len(free) < keep:
                    free.append(base)
                    kept += size
            elif t is int:
                freed += r  # type: ignore[operator]
            else:
                self._kept = kept
                held: list[memoryview]
                held, cost = r  # type: ignore[misc,assignment]
                for v in held:
                    self.put(v)
                kept = self._kept
                freed += cost
        self._kept = kept
        return freed

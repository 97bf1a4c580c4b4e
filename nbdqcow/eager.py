"""Run a coroutine inline until it first suspends, then as a task.

Python 3.12 has ``asyncio.eager_task_factory``; this is the small part of it
the NBD data path needs on 3.11 (issue 6).  A READ whose data is in the page
cache, or a WRITE into it, never suspends: running it as a task costs a task
object, a trip through the event loop's ready queue and a context switch per
request -- more than the I/O itself.  :func:`start` runs the coroutine
synchronously; only if it really waits (a page-cache miss handed to a thread,
a qcow2 allocation waiting for metadata) does it become a task, resumed
exactly where it stopped.

How the hand-over works: a coroutine that suspends yields the future it
waits on (with ``_asyncio_future_blocking`` set) or ``None`` (a bare
``sleep(0)``).  :class:`_Resume` re-yields that value to the new task, so the
task waits on the same future, and then keeps stepping the original
coroutine with ``send``/``throw`` -- cancellation included, since
``Task.cancel`` cancels the future being waited on, or throws into
``_Resume``, which passes the exception on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["resume", "start"]


class _Resume:
    """Awaitable that continues an already started coroutine."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, None, None], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, None, None]:
        coro, value = self._coro, self._yielded
        while True:
            try:
                yield value
            except BaseException as e:  # passed on verbatim (cancellation too)
                try:
                    value = coro.throw(e)
                except StopIteration:
                    return
            else:
                try:
                    value = coro.send(None)
                except StopIteration:
                    return


async def resume(coro: Coroutine[Any, None, None], yielded: Any) -> None:
    """Continue ``coro``, started by hand, which yielded ``yielded``."""
    await _Resume(coro, yielded)


def start(coro: Coroutine[Any, None, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` now; ``None`` if it finished without suspending, else the
    task that carries on with it.  An exception it raises inline propagates
    to the caller (the NBD data path's coroutines catch their own)."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(resume(coro, yielded))

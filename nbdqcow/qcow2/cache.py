"""TableCache: a bounded LRU cache of metadata tables (qemu
``block/qcow2-cache.c``).

One instance caches L2 tables (and, for the write engine, refcount blocks).
A table is one cluster of big-endian 64-bit entries, held decoded as an
``array('Q')`` of native integers: a lookup on a cached table is one dict
probe plus an index, with no per-request allocation (the read path's hot
loop).  16-bit and smaller refcount entries are not 64-bit; a cache for
those is created with ``itemsize`` 2/4 (or 1 for sub-byte orders, which the
refcount module decodes itself from the raw bytes).

API (the qemu names, so the write engine can follow qemu's ordering rules):

* :meth:`get` -- load (or find) the table at a host offset and *pin* it;
  :meth:`put` unpins.  Pinned entries are never evicted.  :meth:`table` is
  the ``async with`` form.  :meth:`peek` is the allocation-free fast path
  for a cached table (no pin: use the result before the next ``await``).
* :meth:`load_now` -- the synchronous miss of the inline read (issue 6):
  a table read from the page cache with no ``await``, or ``None``.
* :meth:`get_empty` -- a zero-filled table for a freshly allocated cluster,
  not read from disk (qemu ``qcow2_cache_get_empty``).
* :meth:`mark_dirty` -- the table must be written back before eviction or at
  :meth:`flush`.
* :meth:`set_dependency` -- before writing any dirty table of this cache,
  flush ``other`` first (L2 cache depends on the refcount cache: refcounts
  before references, QCOW2.md section 7 rule 1).
* :meth:`set_depends_on_flush` -- fdatasync the image before writing any
  dirty table (COW data before L2, rule 3).
* :meth:`write_back` / :meth:`flush` -- write dirty tables (then fdatasync).
* :meth:`discard` -- forget a table whose cluster was freed.

Concurrency: the image's metadata ``asyncio.Lock`` serialises writers; the
cache itself only guarantees that two concurrent misses on one table do one
read (the second waits for the first's future).
"""

from __future__ import annotations

import asyncio
import os
import sys
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from nbdqcow.errors import CorruptImage
from nbdqcow.io import HostFile

__all__ = ["CachedTable", "TableCache"]

_TYPECODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SWAP = sys.byteorder == "little"


@dataclass(slots=True, eq=False)
class CachedTable:
    """One cached table.  ``entries`` holds native-order integers."""

    offset: int
    entries: array  # type: ignore[type-arg]
    dirty: bool = False
    pins: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The on-disk (big-endian) bytes of the table."""
        if _SWAP and self.entries.itemsize > 1:
            copy = array(self.entries.typecode, self.entries)
            copy.byteswap()
            return copy.tobytes()
        return self.entries.tobytes()


class TableCache:
    """LRU cache of ``capacity`` tables of ``table_size`` bytes each.

    Args:
        file: the image file the tables live in.
        table_size: bytes per table (the cluster size).
        capacity: maximum number of cached tables (at least 2).
        itemsize: bytes per entry: 8 for L1/L2, 1/2/4/8 for refcounts.
        name: for error messages ("L2 table", "refcount block").
    """

    def __init__(
        self,
        file: HostFile,
        table_size: int,
        capacity: int,
        *,
        itemsize: int = 8,
        name: str = "L2 table",
    ) -> None:
        self.file = file
        self.table_size = table_size
        self.capacity = max(2, capacity)
        self.typecode = _TYPECODES[itemsize]
        self.name = name
        self._tables: OrderedDict[int, CachedTable] = OrderedDict()
        #: The same dict, for the inline read's lookup
        #: (``ReadPath.try_preadv`` does :meth:`peek`'s steps without its
        #: call); never rebound.
        self.tables = self._tables
        self._loading: dict[int, asyncio.Future[CachedTable]] = {}
        self._dependency: TableCache | None = None
        self._depends_on_flush = False
        #: One write-back at a time.  The barrier flags are cleared before
        #: the barrier's own awaits finish; a second write-back running
        #: meanwhile (a lock-free reader evicting while FLUSH writes back)
        #: would see them clear and write tables before the first one's
        #: refcounts, data and fdatasync were durable (QCOW2.md section 7).
        self._writing = asyncio.Lock()
        #: statistics, for tests and ``info``.
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._tables)

    # -- lookup ----------------------------------------------------------------
    def peek(self, offset: int) -> array | None:  # type: ignore[type-arg]
        """The entries of a cached table, or ``None``; refreshes its LRU
        position.  Allocation-free; the result is valid until the next
        ``await`` (eviction happens only inside coroutines)."""
        t = self._tables.get(offset)
        if t is None:
            return None
        self._tables.move_to_end(offset)
        self.hits += 1
        return t.entries

    def peek_table(self, offset: int) -> CachedTable | None:
        """:meth:`peek`, returning the table itself (the write engine's
        fast path writes entries and dirties it; no pin: use it before the
        next ``await``)."""
        t = self._tables.get(offset)
        if t is None:
            return None
        self._tables.move_to_end(offset)
        self.hits += 1
        return t

    def lookup(self, offset: int) -> CachedTable | None:
        """The cached table at ``offset`` or ``None`` (no LRU update, no pin)."""
        return self._tables.get(offset)

    async def get(self, offset: int) -> CachedTable:
        """Return the table at host ``offset`` (reading it on a miss), pinned."""
        while True:
            t = self._tables.get(offset)
            if t is not None:
                self._tables.move_to_end(offset)
                self.hits += 1
                t.pins += 1
                return t
            pending = self._loading.get(offset)
            if pending is None:
                break
            t = await asyncio.shield(pending)
            # The loader cached it unpinned and woke us; before we ran, a
            # ``_make_room`` (or ``load_now``) may have evicted it, clean.
            # Pinning that object would hand the caller a table outside
            # the cache: a writer's changes to it were never written back
            # (found by a stress test of concurrent reads and writes on a
            # two-table cache: first writes into fresh clusters read back
            # as zeroes after a clean close, their clusters leaked).  So
            # take it only while it is the cached one, else look again.
            if self._tables.get(offset) is t:
                self._tables.move_to_end(offset)
                t.pins += 1
                return t
        self.misses += 1
        fut: asyncio.Future[CachedTable] = asyncio.get_running_loop().create_future()
        self._loading[offset] = fut
        try:
            t = await self._load(offset)
            # Still registered as loading while room is made (which may write
            # a dirty victim): a concurrent get() must wait for this table,
            # not load a second copy of it.
            await self._make_room()
        except BaseException as e:
            del self._loading[offset]
            fut.set_exception(e)
            # Nobody may be waiting: retrieve it so asyncio does not warn.
            fut.exception()
            raise
        del self._loading[offset]
        self._tables[offset] = t
        t.pins += 1
        fut.set_result(t)
        return t

    def load_now(self, offset: int) -> CachedTable | None:
        """The table at host ``offset`` read and cached without an ``await``
        (unpinned, most recently used: use it before the next ``await``), or
        ``None`` when that is not cheap and safe; the caller then declines
        and :meth:`get` does the load (and reports its errors).

        Issue 6 ("randread-huge": 4 KiB random reads at queue depth 32 over
        a 1 TiB image whose 128 MiB of L2 tables overflow the 32 MiB
        cache): every miss sent the request down the async path -- a task,
        :meth:`get`, :meth:`_load`, :meth:`_make_room` -- 55 us of server
        CPU per read against 8.8 us for a cached one (18k IOPS, qemu-nbd
        43k).  Most misses need none of that: the table is in the page
        cache and the LRU victim is clean.

        ``None`` (nothing changed) when: a :meth:`get` is loading this
        table (a second copy would be a second table to keep in step); the
        cache is full and its least recently used unpinned table is dirty
        (its write-back awaits) or every table is pinned; the read would
        block (``HostFile.inline_read_flags``: ``RWF_NOWAIT``, or a plain
        read on tmpfs; ``BlockingIOError`` or any other ``OSError``); the
        read is short (past the end of the file, or only partly cached:
        :meth:`_load` raises :class:`CorruptImage` for the first).  Never
        writes, never evicts a pinned or dirty table; counts a miss.
        """
        t = self._tables.get(offset)
        if t is not None:
            self._tables.move_to_end(offset)
            self.hits += 1
            return t
        flags = self.file.inline_read_flags
        if flags is None or offset in self._loading:
            return None
        # The victims :meth:`_make_room` would take, chosen before the read
        # and evicted only once it succeeded (a decline changes nothing).
        excess = len(self._tables) + 1 - self.capacity
        victims: list[CachedTable] = []
        if excess > 0:
            for v in self._tables.values():
                if v.pins:
                    continue
                if v.dirty:
                    return None
                victims.append(v)
                if len(victims) == excess:
                    break
            else:
                return None  # too few unpinned tables
        buf = bytearray(self.table_size)
        try:
            n = os.preadv(self.file.fd, [buf], offset, flags)
        except OSError:
            return None
        if n != self.table_size:
            return None
        entries = array(self.typecode)
        entries.frombytes(buf)
        if _SWAP and entries.itemsize > 1:
            entries.byteswap()
        for v in victims:
            del self._tables[v.offset]
        self.misses += 1
        t = CachedTable(offset, entries)
        self._tables[offset] = t
        return t

    def put(self, table: CachedTable) -> None:
        """Unpin a table obtained from :meth:`get` or :meth:`get_empty`."""
        assert table.pins > 0
        table.pins -= 1

    @asynccontextmanager
    async def table(self, offset: int) -> AsyncIterator[CachedTable]:
        t = await self.get(offset)
        try:
            yield t
        finally:
            self.put(t)

    async def get_empty(self, offset: int) -> CachedTable:
        """A zero-filled, pinned table for a newly allocated cluster at
        ``offset`` (not read from disk; the caller fills and dirties it)."""
        old = self._tables.pop(offset, None)
        assert old is None or old.pins == 0, "get_empty on a table in use"
        await self._make_room()
        n = self.table_size // array(self.typecode).itemsize
        t = CachedTable(offset, array(self.typecode, bytes(n * array(self.typecode).itemsize)))
        t.pins = 1
        self._tables[offset] = t
        return t

    async def _load(self, offset: int) -> CachedTable:
        buf = bytearray(self.table_size)
        n = await self.file.preadv(offset, [memoryview(buf)])
        if n != self.table_size:
            raise CorruptImage(
                f"{self.name} at host offset {offset:#x} lies beyond the end of the image file"
            )
        entries = array(self.typecode)
        entries.frombytes(buf)
        if _SWAP and entries.itemsize > 1:
            entries.byteswap()
        return CachedTable(offset, entries)

    async def _make_room(self) -> None:
        while len(self._tables) >= self.capacity:
            victim = next((t for t in self._tables.values() if t.pins == 0), None)
            if victim is None:
                return  # everything pinned: grow past capacity temporarily
            if victim.dirty:
                await self._write_entries([victim])
            # The write awaited: the victim may have been re-pinned or
            # dirtied, or evicted by someone else and its offset loaded
            # again as another object (which may be pinned or dirty: popping
            # by offset alone dropped that one, and a write to it was lost).
            if victim.pins == 0 and not victim.dirty \
                    and self._tables.get(victim.offset) is victim:
                del self._tables[victim.offset]

    # -- dirtiness and ordering (write engine) ------------------------------------
    def mark_dirty(self, table: CachedTable) -> None:
        table.dirty = True

    def set_dependency(self, other: TableCache) -> None:
        """Flush ``other`` before writing any dirty table of this cache."""
        if other is self:
            raise ValueError("a cache cannot depend on itself")
        if other._dependency is self:
            # qemu resolves a dependency cycle by flushing; we do the same
            # lazily: the next write of ``other`` flushes us first, which
            # would recurse, so drop the reverse edge (it is satisfied by the
            # time ``other`` writes after flushing this cache).
            other._dependency = None
        self._dependency = other

    def set_depends_on_flush(self) -> None:
        self._depends_on_flush = True

    def mark_dirty_ordered(self, table: CachedTable, dependency: TableCache) -> None:
        """:meth:`mark_dirty`, :meth:`set_dependency` (``dependency``) and
        :meth:`set_depends_on_flush` in one call: what every change to an L2
        table needs (QCOW2.md section 7 rules 1 and 3).  Once the
        dependency is in place, setting it again changes nothing, so only
        the first change after a write-back pays for :meth:`set_dependency`
        (the write engine's fast path calls this once per allocating
        write)."""
        table.dirty = True
        if self._dependency is not dependency:
            self.set_dependency(dependency)
        self._depends_on_flush = True

    @property
    def dirty_count(self) -> int:
        return sum(1 for t in self._tables.values() if t.dirty)

    async def _write_entries(self, tables: list[CachedTable]) -> None:
        async with self._writing:
            await self._write_entries_locked(tables)

    async def _write_entries_locked(self, tables: list[CachedTable]) -> None:
        # Writers that do not hold the metadata lock (the engine's
        # synchronous fast path) may allocate and dirty tables while we
        # wait for the barrier; they set the dependency and the barrier
        # again, so loop until both are satisfied with no await left
        # between the last barrier and the table writes below.
        while self._dependency is not None or self._depends_on_flush:
            if self._dependency is not None:
                dep, self._dependency = self._dependency, None
                try:
                    await dep.flush()
                except BaseException:
                    # Still owed: the next write-back must flush it first
                    # (dropping it let a later eviction write tables ahead
                    # of their refcounts).
                    if self._dependency is None:
                        self._dependency = dep
                    raise
            if self._depends_on_flush:
                self._depends_on_flush = False
                try:
                    await self.file.fdatasync()
                except BaseException:
                    self._depends_on_flush = True
                    raise
        for t in tables:
            if t.dirty:
                # Clear first: a modification during the await re-dirties it.
                t.dirty = False
                try:
                    await self.file.pwritev(t.offset, [t.to_bytes()])
                except BaseException:
                    t.dirty = True
                    raise

    async def write_back(self) -> None:
        """Write every dirty table (dependency first), without fdatasync."""
        dirty = [t for t in self._tables.values() if t.dirty]
        if dirty or self._dependency is not None:
            await self._write_entries(dirty)

    async def flush(self) -> None:
        """Write back every dirty table, then fdatasync the image."""
        await self.write_back()
        await self.file.fdatasync()

    def discard(self, offset: int) -> None:
        """Forget the table at ``offset`` (its cluster was freed), dirty or not."""
        t = self._tables.get(offset)
        if t is not None and t.pins == 0:
            del self._tables[offset]
        elif t is not None:
            t.dirty = False

    def clear(self) -> None:
        """Drop every clean, unpinned table."""
        for off in [o for o, t in self._tables.items() if t.pins == 0 and not t.dirty]:
            del self._tables[off]

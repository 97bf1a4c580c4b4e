"""The lock-free fast path of the qcow2 write engine (:class:`InlineWrites`),
and with it ``Qcow2Image.try_pwritev`` (issue 6): in-place writes into
COPIED standard clusters and allocating writes into unallocated clusters
of a cached L2 table, synchronous, without ``Qcow2Image.lock``.

Implements qcow2.txt "Cluster mapping" (standard L2 entries: COPIED,
host offset) and "Host cluster management" (a new cluster's refcount set
to 1), under the ordering rules of QCOW2.md section 7: refcount before
reference and data before L2 (rules 1 and 3, through the L2 cache's
dependency and barrier), nothing released here (rule 4), and rule 10 for
running beside a suspended locked writer (see "Concurrency" in
:mod:`~nbdqcow.qcow2.write`).

A *fresh* allocation skips writing the zero COW head and tail (qemu's
``handle_alloc_space`` avoids them with a zero-range instead): a 4 KiB
allocating write writes 4 KiB, not a whole cluster.  Fresh means past the
end of the file at open and never allocated or freed since
(:attr:`~nbdqcow.qcow2.refcount.Refcounts.fresh_from`, a high-water mark
kept by the refcount code), so such clusters read as zeroes with no
``fstat`` to ask; and the file is not ``ftruncate``-d over the rest of
the cluster on every write but once, before the next ``fdatasync`` barrier
that precedes an L2 table write (:meth:`Metadata.extend_file`): until then
reads past the end of the file are zero-filled by the read paths, and no
L2 entry on disk can point past the end.  An allocating 4 KiB write is now
one ``pwritev`` (it was ``fstat`` + ``pwritev`` + ``ftruncate``), and the
refcount of a run at the allocation mark is set with one slice assignment
into the cached block (:meth:`Refcounts.alloc_cached`).  A reused
(non-fresh) cluster still gets zero head and tail in the same ``pwritev``.

Synchronous fast path for the server (issue 6): ``Qcow2Image.try_pwritev``
(the :class:`~nbdqcow.backends.base.InlineIO` protocol) is
:meth:`InlineWrites.try_pwritev`, the first step of
:meth:`WriteEngine.pwritev`, which runs before the first ``await`` --
called without a coroutine.  So whatever it does is what the async call
would have done, in the same order; it declines FUA, and (to the locked
path, which may block) whatever would touch the disk other than the data
write: an uncached L2 table or refcount block, a new refcount block or
reftable (``Refcounts.alloc_nowait``), parked clusters ready for release
(whose refcount blocks may need reading), and entries the locked path must
report as corrupt.

The engine's own cost, measured in-process on tmpfs (issue 6): 20 000
random 4 KiB ``try_pwritev`` calls on warm tables (16 GiB sparse image /
1 GiB filled), best of 20 chunks of 1000, with ``os.pwritev`` replaced by
a stub so that only Python runs (``tests/qcow2/bench_inline.py`` with
``STUB=1`` is the same measurement beside raw; at the end of this work it
gave 2.44 us allocating and 1.37 us in place, raw 0.21 us).  Before
(b13a57e) -> after, two to three runs each:

* allocating write 3.70-3.84 -> 2.42-2.46 us: the common run is
  allocated with one ``Refcounts.alloc_cached`` call (no ``alloc_nowait``
  tuple; one 16-bit count set with two byte tests instead of
  ``bytearray.count``, 705 -> 455 ns per call), the table is found with
  one ``peek_table`` (was ``peek`` + ``lookup``) and dirtied with one
  ``TableCache.mark_dirty_ordered`` (was ``Metadata.dirty``'s three
  calls);
* in place 1.89-1.94 -> 1.69-1.80 us: whether a cluster is fit (count 1,
  not metadata: ``get_cached`` 0.13 us + ``is_metadata`` 0.23 us, the
  validation qemu's overlap check does too) is remembered until its count
  changes (``Refcounts.plain``).

Then (issue 6, second round): ``try_pwritev`` and its body (was
``_write_now``) are one function, ``TableCache.peek_table``'s steps are
inline (as ``ReadPath.try_preadv`` does), a one-buffer request is sized
without a loop, and the cluster indexes are computed once (the L1 index
from the first cluster, not from the byte offsets: 16 GiB offsets are
two-digit Python ints, ~30-40 ns per operation).  ``STUB=1`` bench,
three runs each alternated: allocating 2.41-2.45 -> 2.18-2.28 us,
in place 1.39-1.42 -> 1.26-1.28 us.  Instructions per call (callgrind,
``os.pwritev`` stubbed, 4000 calls minus 0 on a 16 GiB sparse image;
in place: a second pass over 4000 offsets of a filled 256 MiB image minus
the first): allocating 20 740 -> 18 809, in place 12 849 -> 11 576.

With the real ``pwritev`` (same script shape, 16 chunks of 1024, best
chunk): allocating 7.66-7.85 -> 6.17-6.99 us per call, in place
4.40-4.43 -> 4.16-4.27 us.  Through the server (``benchmarks.run --quick
--reps 3 --alloc-io 128M --seconds 2 --formats qcow2,raw --workdir
/dev/shm``, old and new engine alternated twice, load 3-4 on the 2-core
machine) the change is inside the noise: nbdqcow qcow2 minus raw
4.9-5.8 -> 4.3-5.5 us/IO allocating, 1.8-3.5 -> 2.0-3.6 in place; most
of the server's qcow2-over-raw gap lies outside the engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from nbdqcow.backends.base import Buffer
from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2.engine import EngineBase
from nbdqcow.qcow2.iovecs import Split, write_all, zero_views
from nbdqcow.qcow2.layout import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COPIED

__all__ = ["InlineWrites"]

#: Every bit of an L2 entry but the host offset: only COPIED may be set in
#: a cluster the fast path writes in place.
_NOT_PLAIN_COPIED = 0xFFFF_FFFF_FFFF_FFFF & ~L2E_OFFSET_MASK
#: Most clusters remembered in ``Refcounts.plain`` (~1.5 MiB of set; 1 GiB
#: of 64 KiB clusters); past it the set starts again.
_PLAIN_MAX = 1 << 14


class InlineWrites(EngineBase):
    """The synchronous fast path of the write engine."""

    def try_pwritev(self, offset: int, bufs: Sequence[Buffer], fua: bool) -> bool:
        """The lock-free fast path, and the
        :class:`~nbdqcow.backends.base.InlineIO` write of a writable
        ``Qcow2Image`` (``writable.attach`` binds it on the image); False
        when the request needs the locked path (nothing has changed then).

        It is exactly what the async :meth:`WriteEngine.pwritev` does before
        its first ``await`` (that method calls it), so a True here leaves
        the image exactly as the async call would have; corruption found on
        the way is handled the same way too (``_fail``, then raise).  FUA
        is declined (it needs a sync).

        Runs to completion without an ``await`` (file writes are
        synchronous page-cache writes, and it declines anything that would
        read or sync the file: uncached L2 tables or refcount blocks, new
        refcount blocks, parked clusters to release), so no other task can
        observe or change the metadata half-way: that is what makes it
        safe without :attr:`Qcow2Image.lock`, even while a locked writer is
        suspended (see "Concurrency" in :mod:`~nbdqcow.qcow2.write`).  Taken when
        the request is one of the two common cases, inside one cached L2
        table owned by the active L1 (COPIED):

        * every cluster is a COPIED plain standard cluster (no other flag,
          aligned, refcount 1, not metadata) and their host clusters follow
          each other: one ``pwritev`` in place, no metadata;
        * every cluster is unallocated (entry 0), nothing below shows
          through (no backing data there) and no locked writer is
          allocating it (:attr:`_busy`, rule 10): one contiguous host run
          is allocated and written, the entries are linked and the table
          dirtied with the usual refcount and barrier dependencies (rules 1
          and 3).  A *fresh* run (:attr:`Refcounts.fresh_from`: reads as
          zeroes already) gets the guest data only -- no zero COW fill, no
          ``fstat`` -- and the file is extended over it at the next barrier
          (:meth:`Metadata.extend_file`); a reused run gets head + data +
          tail zeroes in one ``pwritev``.

        Entries that are invalid (reserved bits, unaligned) are left to the
        locked path, which reports them; so are all other cases.  It never
        unlinks or frees anything: every release still goes through
        :attr:`Metadata.pending_free` under the lock, so a flush's "unlink
        durable, then decrement" (rule 4) cannot be overtaken.  Extended L2
        images always take the locked path.
        """
        # The checks of WriteEngine.pwritev before its locked path --
        # corrupt, closed, a sticky fdatasync failure (a writable image has
        # no external data file: img.data is img.file, so this is
        # _sync_lost inline) -- and FUA, which needs a sync.
        if fua or self.broken is not None or self._closed or self.ext:
            return False
        img = self.img
        file = img.file
        if file.sync_error is not None:
            return False
        if len(bufs) == 1:
            # The server's request: one buffer, no loop.
            b = bufs[0]
            total = b.nbytes if type(b) is memoryview else len(b)
        else:
            total = 0
            for b in bufs:
                total += b.nbytes if type(b) is memoryview else len(b)
        if total == 0:
            return True
        # issue 6: one function (the body was a second method, _write_now),
        # TableCache.peek_table's steps inline (as ReadPath.try_preadv
        # does), the cluster indexes computed once: see the module
        # docstring for the before/after.
        cbits = self._cbits
        end = offset + total
        first = offset >> cbits
        last = (end - 1) >> cbits
        l2_bits = self._l2_bits
        l1i = first >> l2_bits
        if last >> l2_bits != l1i:
            return False
        l1e = img.l1[l1i]
        if not l1e & OFLAG_COPIED:
            return False
        l2off = l1e & L1E_OFFSET_MASK
        cache = img.l2_cache
        tables = cache.tables
        table = tables.get(l2off)
        if table is None:
            return False
        tables.move_to_end(l2off)
        cache.hits += 1
        try:
            entries = table.entries
            cstart = first << cbits
            i0 = first & self._l2_mask
            n = last - first + 1
            e0 = entries[i0]
            meta = self.meta
            if e0 == 0:
                backing = img.backing
                if backing is not None and cstart < backing.size:
                    return False
                busy = self._busy
                if busy and cstart in busy:
                    return False
                cs = self.cs
                if n > 1:
                    for k in range(1, n):
                        if entries[i0 + k] != 0 or (busy and cstart + k * cs in busy):
                            return False
                if meta.parked and not img.reads_in_epoch(meta.parked[0][0]):
                    return False  # releasing them may read refcount blocks: locked path
                rc = meta.rc
                # Refcounts.alloc_nowait without the tuple in the common case
                # (the run at the allocation mark, in a cached block).
                fresh_from = rc.fresh_from
                c = rc.alloc_cached(n)
                if c >= 0:
                    target = c << cbits
                    fresh = c >= fresh_from
                else:
                    got = rc.alloc_nowait(n)
                    if got is None:
                        return False
                    target, fresh = got
                head = offset - cstart
                tail = cstart + n * cs - end
                try:
                    if fresh:
                        # Reads as zeroes already (a hole or past the end of the
                        # file): write the guest data only (write_all, inline).
                        at = target + head
                        done = os.pwritev(file.fd, bufs, at)
                        if done != total:
                            file.pwritev_sync(at + done, Split(bufs).skip(done).rest())
                        if tail and meta.want_eof < target + n * cs:
                            meta.want_eof = target + n * cs
                    else:
                        file.pwritev_sync(target, [*zero_views(head), *bufs, *zero_views(tail)])
                except BaseException:
                    # Nothing links the clusters yet: give them back, or the
                    # failed write (EIO, ENOSPC) would leak them.
                    rc.update_range(target, n * cs, -1)
                    raise
                if n == 1:
                    entries[i0] = target | OFLAG_COPIED
                else:
                    for k in range(n):
                        entries[i0 + k] = (target + k * cs) | OFLAG_COPIED
                cache.mark_dirty_ordered(table, meta.rc_flusher)
                return True
            host = e0 & L2E_OFFSET_MASK
            rc = meta.rc
            if n == 1:
                # The common request, without the loop below.
                if e0 & _NOT_PLAIN_COPIED != OFLAG_COPIED or host & self._cmask:
                    return False
                plain = rc.plain
                if host not in plain:
                    # Count 1 and not metadata: asked once per cluster, then
                    # remembered until its count changes (Refcounts.plain).
                    if rc.get_cached(host >> cbits) != 1 or meta.is_metadata(host):
                        return False
                    if len(plain) >= _PLAIN_MAX:
                        plain.clear()
                    plain.add(host)
                at = host + offset - cstart
                done = os.pwritev(file.fd, bufs, at)
                if done != total:
                    file.pwritev_sync(at + done, Split(bufs).skip(done).rest())
                return True
            cs = self.cs
            cmask = self._cmask
            plain = rc.plain
            for k in range(n):
                e = entries[i0 + k]
                h = host + k * cs
                if (
                    e & _NOT_PLAIN_COPIED != OFLAG_COPIED
                    or e & L2E_OFFSET_MASK != h
                    or h & cmask
                    or not h
                ):
                    return False
                if h in plain:
                    continue
                if rc.get_cached(h >> cbits) != 1 or meta.is_metadata(h):
                    # Not in memory: the locked path loads it.  Wrong: the
                    # locked path's overlap check reports it (corrupt).
                    return False
                # Fit on its own (a cache entry, not part of this request's
                # outcome: a later cluster may still decline).
                if len(plain) >= _PLAIN_MAX:
                    plain.clear()
                plain.add(h)
            write_all(file, host + offset - cstart, bufs, total)
            return True
        except CorruptImage as exc:
            # (The fast path declines what the locked path must report;
            # kept as the async path's handling, zero-cost until raised.)
            self._fail(exc)
            raise

"""A read in flight must not see a freed cluster reused (alloc.py rule 5).

A read maps guest offsets to host clusters, then awaits the data -- on a
page-cache miss :meth:`HostFile.preadv` goes to a thread, and any number of
requests run meanwhile.  If a trim unlinks the cluster, a flush releases it
and an allocating write reuses it before the read's ``preadv`` runs, the read
would return the new guest offset's data.

The race is made deterministic by pausing the read at the I/O boundary: the
image's data :class:`HostFile` gets a ``preadv`` that, for the watched host
cluster, signals "mapped" and waits for the test before doing the real read.
Everything else is real: a qemu-made image file, the real engine, real
syscalls; ``qemu-img check`` and ``qemu-img convert`` judge the result.
Without the read epochs both tests read the second write's bytes.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import tools
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nbdqcow.qcow2 import open_image
from nbdqcow.qcow2.image import Qcow2Image

KiB = 1024
CS = 64 * KiB
SIZE = 4 * 1024 * KiB


def _qemu_img(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([tools.require("qemu-img"), *args], capture_output=True)


class _Pause:
    """Holds the first data read that touches ``[host, host + CS)``."""

    def __init__(self, img: Qcow2Image, host: int) -> None:
        self.reached = asyncio.Event()
        self.go = asyncio.Event()
        self.armed = True
        self._real: Callable[[int, Sequence[memoryview]], Awaitable[int]] = img.data.preadv
        self._host = host
        img.data.preadv = self._preadv  # type: ignore[method-assign]

    async def _preadv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        n = sum(len(b) for b in bufs)
        if self.armed and offset < self._host + CS and self._host < offset + n:
            self.armed = False
            self.reached.set()
            await self.go.wait()
        return await self._real(offset, bufs)


async def _host_of(img: Qcow2Image, guest: int) -> int:
    (run,) = await img.map.runs(guest, CS)
    return run.host


@pytest.mark.parametrize(
    ("read_off", "read_len"),
    [
        (4 * KiB, 4 * KiB),  # inside one cluster: the read fast path
        (CS - 4 * KiB, 8 * KiB),  # across two clusters: the mapped run path
    ],
    ids=["fast-path", "run-path"],
)
async def test_freed_cluster_not_reused_under_a_read(
    tmp_path: Path, read_off: int, read_len: int
) -> None:
    path = tmp_path / "race.qcow2"
    r = _qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(path), str(SIZE))
    assert r.returncode == 0, r.stderr
    model = bytearray(SIZE)
    img = open_image(path, read_only=False)
    try:
        # Guest clusters 0 and 1 hold "A" and "a"; the L2 table is cached,
        # so the single-cluster read takes the fast path.
        for guest, byte in ((0, b"A"), (CS, b"a")):
            await img.pwritev(guest, [byte * CS])
            model[guest : guest + CS] = byte * CS
        await img.flush()
        victim = await _host_of(img, 0)
        expected = bytes(model[read_off : read_off + read_len])

        pause = _Pause(img, victim)
        buf = bytearray(read_len)
        reader = asyncio.create_task(img.preadv(read_off, [memoryview(buf)]))
        await asyncio.wait_for(pause.reached.wait(), 5)

        # While the read is mapped but not done: unlink guest cluster 0,
        # make that durable (the point where its refcount used to drop),
        # then allocate -- the lowest free cluster is the victim's.
        await img.trim(0, CS)
        await img.flush()
        model[0:CS] = bytes(CS)
        other = 8 * CS
        await img.pwritev(other, [b"B" * CS])
        model[other : other + CS] = b"B" * CS

        pause.go.set()
        await asyncio.wait_for(reader, 5)
        # The read started before the trim: it returns the old data.
        assert bytes(buf) == expected
        assert await _host_of(img, other) != victim, "a cluster under a read was reused"

        # Once the read is done, the cluster is free for the next allocation.
        again = 16 * CS
        await img.pwritev(again, [b"C" * CS])
        model[again : again + CS] = b"C" * CS
        assert await _host_of(img, again) == victim

        out = bytearray(SIZE)
        await img.preadv(0, [memoryview(out)])
        assert out == model
    finally:
        await img.aclose()

    # No leak, no corruption, and qemu reads what the model says.
    r = _qemu_img("check", "-f", "qcow2", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    raw = tmp_path / "race.raw"
    r = _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    assert r.returncode == 0, r.stderr
    assert raw.read_bytes() == model


async def test_frees_parked_across_flushes_are_released(tmp_path: Path) -> None:
    """A read held across a flush keeps its cluster parked; the next flush
    after the read ends releases it durably (no leak even without a later
    allocation), and a read-free flush releases at once."""
    path = tmp_path / "park.qcow2"
    r = _qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(path), str(SIZE))
    assert r.returncode == 0, r.stderr
    img = open_image(path, read_only=False)
    try:
        await img.pwritev(0, [b"A" * CS])
        await img.pwritev(2 * CS, [b"D" * CS])
        await img.flush()
        victim = await _host_of(img, 0)
        pause = _Pause(img, victim)
        buf = bytearray(4 * KiB)
        reader = asyncio.create_task(img.preadv(0, [memoryview(buf)]))
        await asyncio.wait_for(pause.reached.wait(), 5)
        await img.trim(0, CS)
        await img.flush()
        assert img.engine is not None
        rc = img.engine.meta.rc
        assert rc.get_offset(victim) == 1  # parked, not yet released
        pause.go.set()
        await asyncio.wait_for(reader, 5)
        assert bytes(buf) == b"A" * len(buf)
        await img.flush()
        assert rc.get_offset(victim) == 0
        # No read in flight: a trim + flush releases immediately.
        other = await _host_of(img, 2 * CS)
        await img.trim(2 * CS, CS)
        await img.flush()
        assert rc.get_offset(other) == 0
    finally:
        await img.aclose()
    r = _qemu_img("check", "-f", "qcow2", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


# -- randomized interleavings ---------------------------------------------------------
NCL = 4  # guest clusters used by the state machine below


class _Gate:
    """Holds every data read of a registered reader task until released."""

    def __init__(self, img: Qcow2Image) -> None:
        self.gates: dict[asyncio.Task[None], asyncio.Event] = {}
        self._real: Callable[[int, Sequence[memoryview]], Awaitable[int]] = img.data.preadv
        img.data.preadv = self._preadv  # type: ignore[method-assign]

    async def _preadv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        task = asyncio.current_task()
        gate = self.gates.get(task) if task is not None else None
        if gate is not None:
            await gate.wait()
        return await self._real(offset, bufs)


async def _interleave(path: Path, ops: list[tuple[str, int, int]]) -> None:
    img = open_image(path, read_only=False)
    gate = _Gate(img)
    model = bytearray(NCL * CS)
    # reader -> (guest offset, buffer, every state of its range since it began)
    readers: dict[asyncio.Task[None], tuple[int, bytearray, list[bytes]]] = {}
    version = 0

    async def check(task: asyncio.Task[None]) -> None:
        gate.gates[task].set()
        await asyncio.wait_for(task, 5)
        off, buf, states = readers.pop(task)
        # Per cluster, the read returns that cluster as it was at some
        # moment of the read's life -- never another cluster's bytes.
        for lo in range(0, len(buf), CS):
            part = bytes(buf[lo : lo + CS])
            assert any(s[lo : lo + CS] == part for s in states), f"read at {off:#x}+{lo:#x}"

    try:
        for op, a, b in ops:
            c0, n = min(a, b), abs(a - b) + 1
            lo, hi = c0 * CS, (c0 + n) * CS
            if op == "read":
                buf = bytearray(hi - lo)
                task = asyncio.ensure_future(img.preadv(lo, [memoryview(buf)]))
                gate.gates[task] = asyncio.Event()
                readers[task] = (lo, buf, [bytes(model[lo:hi])])
                await asyncio.sleep(0)  # let it map and reach the gate
                continue
            if op == "release":
                if readers:
                    await check(list(readers)[a % len(readers)])
                continue
            if op == "write":
                version += 1
                data = bytes([(c0 * 37 + version) % 255 + 1]) * (hi - lo)
                await img.pwritev(lo, [data])
                model[lo:hi] = data
            elif op == "trim":
                await img.trim(lo, hi - lo)
                model[lo:hi] = bytes(hi - lo)
                if a % 2:
                    await img.flush()  # often: the free is then due at once
            else:
                await img.flush()
            for r_off, r_buf, states in readers.values():
                states.append(bytes(model[r_off : r_off + len(r_buf)]))
        for task in list(readers):
            await check(task)
        out = bytearray(len(model))
        await img.preadv(0, [memoryview(out)])
        assert out == model
    finally:
        for ev in gate.gates.values():
            ev.set()
        await img.aclose()


_op = st.tuples(
    st.sampled_from(["read", "release", "write", "write", "trim", "trim", "flush"]),
    st.integers(0, NCL - 1),
    st.integers(0, NCL - 1),
)


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(_op, min_size=1, max_size=30))
@example(  # the shape of the bug: read held, its cluster trimmed, freed, reused
    ops=[("write", 0, 1), ("read", 0, 0), ("trim", 1, 0), ("write", 2, 2), ("release", 0, 0)]
)
def test_paused_reads_never_see_other_clusters(ops: list[tuple[str, int, int]]) -> None:
    """Reads held at random points while writes, trims and flushes go on:
    each read returns, per cluster, some state its range had while it ran.

    Against the engine without read epochs, uniformly random sequences of
    this shape fail about 1 in 20 (16 of 300 in one run); Hypothesis favours
    short sequences and does not find it reliably in 100 examples, so the
    explicit example pins the failing shape."""
    with tempfile.TemporaryDirectory() as t:
        path = Path(t) / "i.qcow2"
        r = _qemu_img(
            "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(path), str(NCL * CS)
        )
        assert r.returncode == 0, r.stderr
        asyncio.run(_interleave(path, ops))
        r = _qemu_img("check", "-f", "qcow2", str(path))
        assert r.returncode == 0, r.stdout + r.stderr

"""Hypothesis state machine: the writable qcow2 engine against a
``bytearray`` model, with reopen in between; every run ends with our check
and ``qemu-img check`` (no leaks, no corruption after a clean close)."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from pathlib import Path

import tools
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdqcow.qcow2 import Qcow2Image, open_image
from nbdqcow.qcow2.check import check_image
from nbdqcow.qcow2.snapshot_write import apply_snapshot, create_snapshot, delete_snapshot

SIZE = 256 * 1024 + 1536  # not a multiple of the cluster size
CLUSTER = 4096


def _run(*args: str) -> None:
    subprocess.run([tools.require(args[0]), *args[1:]], check=True, capture_output=True)


class Model(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "m.qcow2"
        self.img: Qcow2Image | None = None
        self.model = bytearray(SIZE)
        self.backing = False
        #: snapshot name -> the model when it was taken
        self.snaps: dict[str, bytes] = {}

    @initialize(opts=st.sampled_from(["", "extended_l2=on,cluster_size=16k", "refcount_bits=1",
                                      "compat=0.10"]), backing=st.booleans())  # fmt: skip
    def create(self, opts: str, backing: bool) -> None:
        extra: list[str] = []
        if backing:
            base = Path(self.dir.name) / "base.qcow2"
            _run("qemu-img", "create", "-f", "qcow2", str(base), str(SIZE))
            _run("qemu-io", "-c", f"write -P 99 0 {SIZE // 2}", str(base))
            self.model[: SIZE // 2] = b"\x63" * (SIZE // 2)
            extra = ["-b", base.name, "-F", "qcow2"]
            self.backing = True
        self.v2 = "compat=0.10" in opts
        self.rc1 = "refcount_bits=1" in opts
        self.cluster = 16384 if "16k" in opts else CLUSTER
        if "cluster_size" not in opts:
            opts = ",".join(filter(None, [f"cluster_size={CLUSTER}", opts]))
        o = ["-o", opts]
        _run("qemu-img", "create", "-f", "qcow2", *o, *extra, str(self.path), str(SIZE))
        self.img = open_image(self.path, read_only=False)

    def _do(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    @property
    def image(self) -> Qcow2Image:
        assert self.img is not None
        return self.img

    offsets = st.integers(0, SIZE - 1)

    @rule(off=offsets, n=st.integers(1, 3 * CLUSTER + 10), byte=st.integers(0, 255))
    def write(self, off: int, n: int, byte: int) -> None:
        n = min(n, SIZE - off)
        data = bytes([byte]) * n
        # Split in two buffers: vectored writes must land in order.
        self._do(self.image.pwritev(off, [data[: n // 2], memoryview(data)[n // 2 :]]))
        self.model[off : off + n] = data

    @rule(off=offsets, n=st.integers(1, 3 * CLUSTER), may_trim=st.booleans())
    def zero(self, off: int, n: int, may_trim: bool) -> None:
        n = min(n, SIZE - off)
        self._do(self.image.zero(off, n, may_trim=may_trim))
        self.model[off : off + n] = bytes(n)

    @rule(off=offsets, n=st.integers(1, 3 * CLUSTER))
    def trim(self, off: int, n: int) -> None:
        n = min(n, SIZE - off)
        if self.v2 and self.backing:
            self._do(self.image.trim(off, n))  # a no-op there, like qemu
            return
        cs = self.cluster
        a, b = -(-off // cs) * cs, (off + n) // cs * cs
        if off + n == SIZE:
            b = SIZE
        self._do(self.image.trim(off, n))
        if a < b:
            # Released clusters read as zeroes on v3 (zero flag) and on v2
            # without a backing file (unallocated).
            self.model[a:b] = bytes(b - a)

    @rule()
    def flush(self) -> None:
        self._do(self.image.flush())

    @precondition(lambda self: self.img is not None)
    @rule()
    def reopen(self) -> None:
        self._do(self.image.aclose())
        self.img = open_image(self.path, read_only=False)

    @precondition(lambda self: self.img is not None and not self.rc1 and len(self.snaps) < 3)
    @rule()
    def snapshot(self) -> None:
        """Take an internal snapshot (offline, our tool) and keep writing:
        later writes must copy out of the shared clusters."""
        self._do(self.image.aclose())
        name = f"s{len(self.snaps)}"
        create_snapshot(str(self.path), name)
        self.snaps[name] = bytes(self.model)
        self.img = open_image(self.path, read_only=False)

    @rule(off=offsets, n=st.integers(1, 2 * CLUSTER))
    def read(self, off: int, n: int) -> None:
        n = min(n, SIZE - off)
        buf = bytearray(n)
        self._do(self.image.preadv(off, [memoryview(buf)]))
        assert buf == self.model[off : off + n]

    @invariant()
    def whole_image(self) -> None:
        if self.img is None:
            return
        buf = bytearray(SIZE)
        self._do(self.image.preadv(0, [memoryview(buf)]))
        assert buf == self.model

    def teardown(self) -> None:
        try:
            if self.img is not None:
                self._do(self.img.aclose())
                res = check_image(str(self.path))
                assert res.exit_code == 0, res.messages
                r = subprocess.run([tools.require("qemu-img"), "check", str(self.path)],
                                   capture_output=True, text=True)  # fmt: skip
                assert r.returncode == 0, r.stdout + r.stderr
                raw = Path(self.dir.name) / "out.raw"
                _run("qemu-img", "convert", "-O", "raw", str(self.path), str(raw))
                assert raw.read_bytes() == self.model
                # Every snapshot still reads as it was taken (through qemu),
                # and reverting to the oldest one with our tool works.
                for name, want in self.snaps.items():
                    _run("qemu-img", "convert", "-l", f"snapshot.name={name}", "-O", "raw",
                         str(self.path), str(raw))  # fmt: skip
                    assert raw.read_bytes() == want, name
                if self.snaps:
                    first = next(iter(self.snaps))
                    apply_snapshot(str(self.path), first)
                    for name in self.snaps:
                        delete_snapshot(str(self.path), name)
                    _run("qemu-img", "check", str(self.path))
                    _run("qemu-img", "convert", "-O", "raw", str(self.path), str(raw))
                    assert raw.read_bytes() == self.snaps[first]
        finally:
            self.loop.close()
            self.dir.cleanup()


Model.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
TestModel = Model.TestCase

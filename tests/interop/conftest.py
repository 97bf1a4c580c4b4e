"""Fixtures for interop tests: a served image over each transport."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import tools
from tests.interop.harness import Served, serve

pytestmark = pytest.mark.interop

SIZE = 8 * 1024 * 1024


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    """An 8 MiB sparse raw image with a little data: 0x11 in [0, 64k),
    0x22 in [1M, 1M+128k), the rest a hole."""
    qemu_io = tools.require("qemu-io")
    tools.require("qemu-img")
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    from tests.interop.harness import run

    run([qemu_io, "-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 128k",
         str(img)])
    return img


@pytest.fixture
def served(tmp_path: Path, raw_image: Path, transport: str) -> Iterator[Served]:
    s = serve(tmp_path, raw_image, transport=transport)
    yield s
    rc = s.stop()
    assert rc == 0, s.stderr()

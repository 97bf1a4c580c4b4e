"""Hypothesis: whatever bytes a client sends, in the handshake or after it,
the server neither crashes nor logs a traceback, keeps serving others, and
never changes the image (no valid WRITE is ever formed by chance here: the
request magic is kept out of the generated streams)."""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import Running, pattern
from tests.server.nbdclient import REQUEST_MAGIC, NbdClient

MAGIC = struct.pack(">I", REQUEST_MAGIC)

chunks = st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6).filter(
    lambda cs: MAGIC not in b"".join(cs))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=chunks, after_handshake=st.booleans())
async def test_random_bytes(running: Running, image: Path, data: list[bytes],
                            after_handshake: bool,
                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nbdqcow"):
        if after_handshake:
            c = await NbdClient.connect(running.path)
        else:
            c = await NbdClient.open(running.path)
            await c.greeting()
        for chunk in data:
            c.send_raw(chunk)
            await asyncio.sleep(0)
        await c.close()
        good = await NbdClient.connect(running.path)
        assert await good.pread(4096, 512) == pattern()[4096:4608]
        await good.disconnect()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert image.read_bytes() == pattern()

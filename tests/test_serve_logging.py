"""The CLI's log formatters (issue 6 made the text one a single f-string):
the lines are those of the ``logging.Formatter`` format they replace."""

from __future__ import annotations

import json
import logging
import os
import sys

from nbdqcow.cli.serve import JsonFormatter, TextFormatter


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    r = logging.LogRecord("nbdqcow.server", logging.INFO, "(unknown file)", 0, msg, args,
                          exc_info)
    r.process = None  # as _setup_logging collects it: not at all
    return r


def test_text_lines_are_the_formatters() -> None:
    reference = logging.Formatter("%(asctime)s nbdqcow[%(process)d]: %(message)s",
                                  datefmt="%H:%M:%S")
    for msg, args in (("plain", ()), ("connection %d %s: %s", (7, "unix", "closed")),
                      ("50%% done", ())):
        got = TextFormatter().format(_record(msg, *args))
        ref = _record(msg, *args)
        ref.process = os.getpid()
        assert got == reference.format(ref)


def test_text_keeps_tracebacks() -> None:
    line = TextFormatter().format(_record("failed", exc=True))
    assert line.split("\n")[0].endswith(f"nbdqcow[{os.getpid()}]: failed")
    assert "ValueError: boom" in line


def test_json_has_the_pid() -> None:
    out = json.loads(JsonFormatter().format(_record("hello %s", "you")))
    assert out["pid"] == os.getpid() and out["message"] == "hello you"

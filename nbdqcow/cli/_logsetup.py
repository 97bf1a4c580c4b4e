"""The log output of ``nbdqcow serve``: one line per record on stderr, as
text (``HH:MM:SS nbdqcow[PID]: message``) or one JSON object per line
(``--log-format`` / ``[server] log_format``, :class:`~nbdqcow.config.LogFormat`).

The lines are those of the ``logging.Formatter`` formats these replace; what
changed is their cost (issue 6: the one or two lines per connection were a
visible share of a handshake's server time): a cached timestamp, one f-string
per text line, no per-record ``getpid()``, caller lookup or second flush (the
logging HOWTO, "Optimization").  :func:`_setup_logging` installs them.

Split from :mod:`nbdqcow.cli.serve`, which re-exports :class:`TextFormatter`
and :class:`JsonFormatter`; the leading underscore keeps the subcommand
discovery of :mod:`nbdqcow.cli` from taking this module for a subcommand.
"""

from __future__ import annotations

import json
import logging
import os

__all__ = ["JsonFormatter", "TextFormatter"]


class _StampCache(logging.Formatter):
    """Formats the timestamp once per second instead of once per line.

    Both formats have a resolution of one second, so the cached string is
    exactly what ``localtime`` + ``strftime`` would give; those cost about a
    third of a log line (issue 6: two lines per connection were a visible
    share of a handshake's server time).
    """

    _second = -1
    _stamp = ""
    _stamp_format: str | None = None

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second or datefmt != self._stamp_format:
            self._stamp = super().formatTime(record, datefmt)
            self._second, self._stamp_format = second, datefmt
        return self._stamp


#: This process's id for the log lines (records do not collect it: see
#: _setup_logging); refreshed in a forked child.
_PID = os.getpid()


def _refresh_pid() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


class TextFormatter(_StampCache):
    """``HH:MM:SS nbdqcow[PID]: message``.

    A record without exception or stack is formatted with one f-string:
    ``logging.Formatter.format`` builds the same line through the record's
    ``__dict__`` and several calls (issue 6: the one line per connection
    is part of every handshake's cost)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s nbdqcow[%(process)d]: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        if record.process is None:
            record.process = _PID
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = message = record.getMessage()
        return f"{self.formatTime(record, '%H:%M:%S')} nbdqcow[{record.process}]: {message}"


class JsonFormatter(_StampCache):
    """One JSON object per log line, for journald/Loki-style collectors."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": _PID if record.process is None else record.process,
            "message": record.getMessage(),
        })


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that leaves flushing to a line-buffered stream
    (``sys.stderr`` always is since Python 3.9): each line is written, and so
    flushed, once, without the second lock round and ``flush()`` call of
    :meth:`logging.StreamHandler.flush` per record."""

    def __init__(self) -> None:
        super().__init__()
        self._line_buffered = bool(getattr(self.stream, "line_buffering", False))

    def flush(self) -> None:
        if not self._line_buffered:
            super().flush()


def _setup_logging(level: int, fmt: str) -> None:
    handler = _LineHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    # What neither format shows is not collected (the logging HOWTO's
    # "Optimization" section): the caller's file and line (a walk up the
    # stack per record), the thread and the multiprocessing process name.
    # The process id is the formatters' (_PID): a getpid() per record is a
    # system call.  Measured on the shared 2-core machine, one connection
    # line to /dev/null: 12.6-17.5 us -> 8.4-8.6 us with the cached
    # timestamp; then, in instructions (callgrind, 2000 lines to a file),
    # 53.7 k -> 47.1 k with the f-string format, no getpid and no second
    # flush per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False

"""Validating a TOML document with messages that name the line and the key.

TOML v1.0.0, "Keys" and "Table".  Two parts: :class:`Table`, typed access to
one table of a ``tomllib`` document that refuses unknown keys; and
:class:`KeyLocator`, which finds the line of a key.

``tomllib`` returns plain dicts without positions, yet a configuration error
must name the line an operator has to fix.  :class:`KeyLocator` scans the text
once: table headers (``[a."b c"]``, ``[[a]]``) and ``key = value`` lines, and
keeps track of multi-line strings and of arrays or inline tables that span
lines so that their contents are not mistaken for keys.

It is only used to *report* errors on a document ``tomllib`` has already
accepted: a construct it misreads costs precision (the line of an enclosing
key or table is given), never meaning.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import TypeVar

__all__ = ["Fail", "KeyLocator", "KeyPath", "Table", "describe", "format_key"]

KeyPath = tuple[str | int, ...]
#: Builds the exception for a problem at a key; the caller raises it.
Fail = Callable[[KeyPath, str], Exception]
T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_key(path: Sequence[str | int]) -> str:
    """``("exports", "my lab", "allow", 1)`` -> ``exports."my lab".allow[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if _BARE_KEY.fullmatch(part):
            text = part
        else:
            text = '"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out += f".{text}" if out else text
    return out


def describe(value: object) -> str:
    """A TOML-flavoured rendering of a wrong value, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


class Table:
    """Typed access to one TOML table that reports unknown keys at the end."""

    def __init__(
        self,
        data: Mapping[str, object],
        path: KeyPath,
        fail: Fail,
        max_string_bytes: int = 4096,
    ) -> None:
        self.data = data
        self.path = path
        self.fail = fail
        self.seen: set[str] = set()
        #: Longest string value accepted, in UTF-8 bytes.
        self.max_string_bytes = max_string_bytes

    def _get(self, key: str, kind: type[T] | tuple[type, ...], what: str) -> T | None:
        self.seen.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        # bool is an int in Python but not in TOML: `port = true` is an error.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.fail((*self.path, key), f"expected {what}, got {describe(value)}")
        return value  # type: ignore[return-value]

    def get_str(self, key: str, default: str | None = None) -> str | None:
        value = self._get(key, str, "a string")
        if value is not None and len(value.encode()) > self.max_string_bytes:
            raise self.fail((*self.path, key), f"longer than {self.max_string_bytes} bytes")
        return default if value is None else value

    def get_bool(self, key: str, default: bool) -> bool:
        value = self._get(key, bool, "a boolean")
        return default if value is None else value

    def get_int(self, key: str, default: int | None, minimum: int, maximum: int) -> int | None:
        value = self._get(key, int, "an integer")
        if value is None:
            return default
        if not minimum <= value <= maximum:
            raise self.fail((*self.path, key), f"{value} is not from {minimum} to {maximum}")
        return value

    def get_seconds(self, key: str, default: float) -> float:
        value = self._get(key, (int, float), "a number of seconds")
        if value is None:
            return default
        if not 0 < value <= 86400:
            raise self.fail((*self.path, key), f"{value} is not from 0 (excluded) to 86400")
        return float(value)

    def get_choice(self, key: str, enum: type[E], default: E) -> E:
        allowed = [m.value for m in enum]
        what = " or ".join(f'"{a}"' for a in allowed)
        value = self._get(key, str, what)
        if value is None:
            return default
        if value not in allowed:
            raise self.fail((*self.path, key), f"expected {what}, got {describe(value)}")
        return enum(value)

    def get_strings(self, key: str) -> list[tuple[KeyPath, str]] | None:
        """An array of strings (a lone string counts as one), with item paths."""
        value = self._get(key, (list, str), "an array of strings")
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.fail((*self.path, key, i), f"expected a string, got {describe(item)}")
            out.append(((*self.path, key, i), item))
        return out

    def get_table(self, key: str) -> Table:
        value = self._get(key, dict, "a table")
        return Table(value or {}, (*self.path, key), self.fail, self.max_string_bytes)

    def finish(self) -> None:
        """Refuse keys nobody asked for: a typo must not be silently ignored."""
        for key in self.data:
            if key in self.seen:
                continue
            hint = difflib.get_close_matches(key, sorted(self.seen), n=1)
            if hint:
                known = f'did you mean "{hint[0]}"?'
            else:
                known = "known: " + ", ".join(sorted(self.seen))
            raise self.fail((*self.path, key), f"unknown key ({known})")


class KeyLocator:
    """Maps key paths of a TOML document to the (1-based) line defining them."""

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        self._scan(text)

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The line defining ``path``, else that of its nearest ancestor, else None."""
        for n in range(len(path), 0, -1):
            line = self._lines.get(tuple(path[:n]))
            if line is not None:
                return line
        return None

    def _scan(self, text: str) -> None:
        table: KeyPath = ()
        array_counts: dict[KeyPath, int] = {}
        value: _ValueScanner | None = None  # a value still open from an earlier line
        value_key: KeyPath = ()
        for lineno, raw in enumerate(text.splitlines(), start=1):
            if value is not None:
                if value.feed(raw, lineno):
                    self._elements(value_key, value)
                    value = None
                continue
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                is_array = line.startswith("[[")
                keys, _ = _parse_key(line, 2 if is_array else 1)
                if keys is None:
                    continue
                table = tuple(keys)
                if is_array:
                    # Each [[a]] header opens the next element of array a.
                    index = array_counts.get(table, 0)
                    array_counts[table] = index + 1
                    table = (*table, index)
                self._lines.setdefault(table, lineno)
                continue
            keys, end = _parse_key(line, 0)
            if keys is None or end >= len(line) or line[end] != "=":
                continue
            full = (*table, *keys)
            # A dotted key a.b.c = 1 also defines the tables a and a.b here.
            for n in range(len(table) + 1, len(full) + 1):
                self._lines.setdefault(full[:n], lineno)
            scanner = _ValueScanner()
            if scanner.feed(line[end + 1 :], lineno):
                self._elements(full, scanner)
            else:
                value, value_key = scanner, full

    def _elements(self, key: KeyPath, scanner: _ValueScanner) -> None:
        for index, line in enumerate(scanner.element_lines):
            self._lines.setdefault((*key, index), line)


def _skip_blanks(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in " \t":
        pos += 1
    return pos


def _parse_key(line: str, pos: int) -> tuple[list[str] | None, int]:
    """Parse a (dotted) key at ``pos``; return its parts and the index after it.

    A closing ``]`` of a table header is consumed too.  Returns ``(None, pos)``
    when ``line`` has no key there.
    """
    parts: list[str] = []
    while True:
        pos = _skip_blanks(line, pos)
        if pos >= len(line):
            return None, pos
        quote = line[pos]
        if quote in "\"'":
            end = pos + 1
            buf: list[str] = []
            while end < len(line) and line[end] != quote:
                if quote == '"' and line[end] == "\\" and end + 1 < len(line):
                    # Keys with escapes are rare; keep the escaped character as is.
                    buf.append(line[end + 1])
                    end += 2
                    continue
                buf.append(line[end])
                end += 1
            if end >= len(line):
                return None, end
            parts.append("".join(buf))
            pos = end + 1
        else:
            m = _BARE_KEY.match(line, pos)
            if m is None:
                return None, pos
            parts.append(m.group())
            pos = m.end()
        pos = _skip_blanks(line, pos)
        if pos < len(line) and line[pos] == ".":
            pos += 1
            continue
        if pos < len(line) and line[pos] == "]":
            pos += 1
        return parts, pos


class _ValueScanner:
    """Follows a value over lines until it is complete.

    It tracks strings (basic and literal, single- and multi-line), comments
    and the nesting depth of arrays and inline tables.  For an array value it
    also notes the line on which each top-level element starts, so that an
    error in ``allow[2]`` of a multi-line array points at that element.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.open_quote: str | None = None  # the delimiter of an open multi-line string
        self.is_array: bool | None = None  # unknown until the first significant character
        self.expect_element = False
        #: Line number of each top-level array element, in order.
        self.element_lines: list[int] = []

    def _significant(self, c: str, lineno: int) -> None:
        if self.is_array is None:
            self.is_array = c == "["
        elif self.is_array and self.depth == 1 and self.expect_element and c not in ",]":
            self.element_lines.append(lineno)
            self.expect_element = False

    def feed(self, line: str, lineno: int) -> bool:
        """Consume one line; True when the value ends on it."""
        i = 0
        if self.open_quote is not None:
            end = _find_close(line, 0, self.open_quote)
            if end is None:
                return False
            self.open_quote = None
            i = end
        while i < len(line):
            c = line[i]
            if c == "#":
                break
            if c.isspace():
                i += 1
                continue
            self._significant(c, lineno)
            if c in "\"'":
                quote = c * 3 if line.startswith(c * 3, i) else c
                end = _find_close(line, i + len(quote), quote)
                if end is None:
                    if len(quote) == 3:
                        self.open_quote = quote
                        return False
                    break  # unterminated one-line string: tomllib would have refused it
                i = end
                continue
            if c in "[{":
                self.depth += 1
                if self.depth == 1 and self.is_array:
                    self.expect_element = True
            elif c in "]}":
                self.depth -= 1
            elif c == "," and self.depth == 1:
                self.expect_element = True
            i += 1
        return self.depth <= 0


def _find_close(line: str, i: int, quote: str) -> int | None:
    """The index just after the closing ``quote`` at or after ``i``, or None."""
    escapes = quote[0] == '"'
    while i < len(line):
        if escapes and line[i] == "\\":
            i += 2
            continue
        if line.startswith(quote, i):
            end = i + len(quote)
            # TOML allows one or two quotes right before a closing """ / '''.
            while len(quote) == 3 and end - i < 5 and line.startswith(quote[0], end):
                end += 1
            return end
        i += 1
    return None

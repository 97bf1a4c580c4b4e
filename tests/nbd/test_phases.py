"""Phase x input: what each kind of input does in each phase, as a table,
plus a Hypothesis walk over random inputs and API calls checking that every
phase change is one listed in ``TRANSITIONS`` and every exception is a
``ProtocolError`` (h2's ``test_state_machines.py`` idea)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.backends.base import Capabilities
from nbdqcow.nbd import (
    Command,
    Errno,
    ExportInfo,
    ExportRequested,
    HandshakeEvent,
    LocalProtocolError,
    Option,
    OptionReply,
    Phase,
    RemoteProtocolError,
    ServerConnection,
)
from nbdqcow.nbd.connection import TRANSITIONS
from nbdqcow.nbd.wire import pack_extended_request, pack_option, pack_request
from tests.nbdclient import NbdClient

INFO = ExportInfo("", 1 << 20, Capabilities(read_only=False))
FLAGS = struct.pack(">I", 3)


def in_phase(phase: Phase, extended: bool = False) -> ServerConnection:
    """A connection brought to ``phase`` through the protocol itself."""
    conn = ServerConnection(tls="optional")
    if phase is Phase.CLIENT_FLAGS:
        return conn
    conn.receive_data(FLAGS)
    assert conn.next_event() is None
    if phase is Phase.OPTIONS:
        return conn
    if phase is Phase.TLS_HANDSHAKE:
        conn.receive_data(pack_option(Option.STARTTLS))
        conn.next_event()
        return conn
    if phase is Phase.CLOSED:
        conn.receive_data(pack_option(Option.ABORT))
        conn.next_event()
        return conn
    if phase is Phase.ERROR:
        conn.receive_data(b"garbage!" * 4)
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        return conn
    if extended:
        conn.receive_data(pack_option(Option.EXTENDED_HEADERS))
        conn.next_event()
    conn.receive_data(pack_option(Option.GO, NbdClient.info_payload("", [])))
    ev = conn.next_event()
    assert isinstance(ev, ExportRequested)
    conn.accept_export(ev, INFO)
    conn.next_event()  # HandshakeComplete
    assert conn.phase is Phase.TRANSMISSION
    return conn


INPUTS: dict[str, bytes] = {
    "eof": b"",
    "flags": FLAGS,
    "garbage": b"\xab" * 40,
    "option": pack_option(Option.LIST),
    "request": pack_request(0, Command.READ, 1, 0, 512),
    "ext-request": pack_extended_request(0, Command.READ, 1, 0, 512),
    "disc": pack_request(0, Command.DISC, 1, 0, 0),
}

R, L = RemoteProtocolError, LocalProtocolError
# phase -> input -> (phase after, event class name | exception class | None)
TABLE: dict[Phase, dict[str, tuple[Phase, object]]] = {
    Phase.CLIENT_FLAGS: {
        "eof": (Phase.CLOSED, "EndOfStream"),
        "flags": (Phase.OPTIONS, None),
        "garbage": (Phase.ERROR, R),
        "option": (Phase.ERROR, R),  # "IHAV" as client flags: unknown bits
        "request": (Phase.ERROR, R),
    },
    Phase.OPTIONS: {
        "eof": (Phase.CLOSED, "EndOfStream"),
        "flags": (Phase.OPTIONS, None),  # 4 bytes of a 16-byte header
        "garbage": (Phase.ERROR, R),
        "option": (Phase.OPTIONS, "ExportListRequested"),
        "request": (Phase.ERROR, R),
        "ext-request": (Phase.ERROR, R),
    },
    Phase.TLS_HANDSHAKE: {name: (Phase.TLS_HANDSHAKE, L) for name in INPUTS},
    Phase.TRANSMISSION: {
        "eof": (Phase.CLOSED, "EndOfStream"),
        "flags": (Phase.TRANSMISSION, None),
        "garbage": (Phase.ERROR, R),
        "option": (Phase.TRANSMISSION, None),  # 16 bytes of a 28-byte header
        "request": (Phase.TRANSMISSION, "Read"),
        "ext-request": (Phase.ERROR, R),
        "disc": (Phase.CLOSED, "Disconnect"),
    },
    Phase.CLOSED: {name: (Phase.CLOSED, None) for name in INPUTS},
    Phase.ERROR: {name: (Phase.ERROR, L) for name in INPUTS},
}

CASES = [(p, i, *TABLE[p][i]) for p in TABLE for i in TABLE[p]]


@pytest.mark.parametrize(
    ("phase", "name", "after", "outcome"), CASES, ids=[f"{c[0].name}-{c[1]}" for c in CASES]
)
def test_phase_input_table(phase: Phase, name: str, after: Phase, outcome: object) -> None:
    conn = in_phase(phase)
    assert conn.phase is phase
    if isinstance(outcome, type) and issubclass(outcome, Exception):
        with pytest.raises(outcome):
            conn.receive_data(INPUTS[name])
            conn.next_event()
    else:
        conn.receive_data(INPUTS[name])
        ev = conn.next_event()
        assert (type(ev).__name__ if ev is not None else None) == outcome
    assert conn.phase is after


def test_extended_transmission_wants_extended_requests() -> None:
    conn = in_phase(Phase.TRANSMISSION, extended=True)
    conn.receive_data(INPUTS["ext-request"])
    assert type(conn.next_event()).__name__ == "Read"
    conn.receive_data(INPUTS["request"] + bytes(4))
    with pytest.raises(RemoteProtocolError, match="magic"):
        conn.next_event()


def test_transition_table_is_closed() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert TRANSITIONS[Phase.ERROR] == frozenset() == TRANSITIONS[Phase.CLOSED]
    assert all(Phase.ERROR not in t for t in TRANSITIONS.values())  # implicit


# --- random walks --------------------------------------------------------------

Action = Callable[[ServerConnection], object]


def answer(conn: ServerConnection) -> object:
    ev = conn.pending
    if ev is None:
        return None
    if isinstance(ev, HandshakeEvent) and not isinstance(ev, ExportRequested):
        return conn.reject(ev, OptionReply.ERR_POLICY, "no")
    return conn.accept_export(ev, INFO)  # type: ignore[arg-type]


ACTIONS: dict[str, Action] = {
    **{f"feed-{k}": (lambda c, v=v: c.receive_data(v)) for k, v in INPUTS.items() if v},
    "feed-go": lambda c: c.receive_data(pack_option(Option.GO, NbdClient.info_payload("", []))),
    "feed-sr": lambda c: c.receive_data(pack_option(Option.STRUCTURED_REPLY)),
    "feed-starttls": lambda c: c.receive_data(pack_option(Option.STARTTLS)),
    "feed-write": lambda c: c.receive_data(pack_request(0, Command.WRITE, 9, 0, 4) + b"abcd"),
    "eof": lambda c: c.receive_data(b""),
    "next": lambda c: c.next_event(),
    "answer": answer,
    "tls-up": lambda c: c.tls_established(),
    "shutdown": lambda c: c.shutdown(),
    "reply-ok": lambda c: c.reply_ok(9),
    "reply-error": lambda c: c.reply_error(1, Errno.EIO),
    "send": lambda c: c.data_to_send(),
}


class Recording(ServerConnection):
    """Records every phase change (one call may pass several phases: the
    client flags and a STARTTLS in one receive, say)."""

    def __init__(self) -> None:
        self.changes: list[tuple[Phase, Phase]] = []
        super().__init__(tls="optional")

    def _set_phase(self, phase: Phase) -> None:
        self.changes.append((self._phase, phase))
        super()._set_phase(phase)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(sorted(ACTIONS)), max_size=40))
def test_random_walk(actions: list[str]) -> None:
    conn = Recording()
    for name in actions:
        try:
            ACTIONS[name](conn)
        except LocalProtocolError as e:
            # API misuse by this walk is fine; the core failing itself is not.
            assert "internal error" not in str(e), (name, e)
        except RemoteProtocolError:
            pass  # anything else escapes and fails the test
        for before, after in conn.changes:
            assert after is before or after in TRANSITIONS[before], (name, before, after)
        if conn.phase is Phase.ERROR:
            with pytest.raises(LocalProtocolError):
                conn.next_event()

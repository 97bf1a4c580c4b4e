"""Exceptions of the sans-I/O NBD core.

Two kinds, as in h11: the peer broke the protocol
(:class:`RemoteProtocolError`: the adapter hard-disconnects, logging one line),
or the application misused the core's API (:class:`LocalProtocolError`: a bug
in the caller, or in the core itself).  The core raises nothing else for any
input; the fuzz harness in ``fuzz/`` checks exactly that.
"""

from __future__ import annotations

from nbdqcow.errors import NbdqcowError

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(NbdqcowError):
    """Base of every error the NBD core raises.

    Once raised, the connection is in :attr:`~nbdqcow.nbd.Phase.ERROR`:
    every further call that parses or answers the handshake raises
    :class:`LocalProtocolError`, while ``reply_*`` calls for requests still in
    flight are silently dropped (the connection is being closed anyway, and
    the tasks that finish late should not crash).
    """


class RemoteProtocolError(ProtocolError):
    """The client violated a mandatory condition of ``doc/proto.md`` (bad
    magic, unknown client flags, an absurd length, a truncated message) or
    exceeded a :class:`~nbdqcow.nbd.ProtocolLimits` bound.  The only correct reaction
    is a hard disconnect; ``str(exc)`` says why, naming the field and value."""


class LocalProtocolError(ProtocolError):
    """The application used the core wrongly (replied twice to a cookie,
    answered an event that was not pending, fed data while a TLS handshake was
    due...), or the core hit an internal error.  This is a bug, not input."""

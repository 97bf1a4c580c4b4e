"""NBD wire constants (``doc/proto.md``, "Values"; extended headers from the
``extension-ext-header`` branch).

Spec names become enum members without their prefix, so ``NBD_OPT_GO`` is
:attr:`Option.GO`, ``NBD_REP_ERR_UNSUP`` is :attr:`OptionReply.ERR_UNSUP`,
``NBD_CMD_FLAG_FUA`` is :attr:`CommandFlag.FUA`.  The wire layer keeps raw
ints (an unknown option or command is data to answer, not a ``ValueError``);
these enums are for building and naming values.
"""

from __future__ import annotations

import enum
import errno as _errno

__all__ = [
    "CLIENT_MAGIC",
    "EXTENDED_REPLY_MAGIC",
    "EXTENDED_REQUEST_MAGIC",
    "IHAVEOPT",
    "NBDMAGIC",
    "OPTION_REPLY_MAGIC",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "ClientFlag",
    "Command",
    "CommandFlag",
    "Errno",
    "HandshakeFlag",
    "InfoType",
    "Option",
    "OptionReply",
    "ReplyFlag",
    "ReplyType",
    "StateFlag",
    "TransmissionFlag",
    "to_nbd_errno",
]

# --- magic numbers ("Handshake", "Request message", "Simple reply message",
# "Structured reply chunk message"; extended headers branch) -------------------
#: ``INIT_PASSWD``, ASCII ``NBDMAGIC``.
NBDMAGIC = 0x4E42444D41474943
#: ASCII ``IHAVEOPT``: second greeting word, and the start of every option.
IHAVEOPT = 0x49484156454F5054
#: Alias used for the option header the client sends.
CLIENT_MAGIC = IHAVEOPT
#: Magic of every fixed-newstyle option reply.
OPTION_REPLY_MAGIC = 0x3E889045565A9
#: ``NBD_REQUEST_MAGIC`` (compact 28-byte requests).
REQUEST_MAGIC = 0x25609513
#: ``NBD_EXTENDED_REQUEST_MAGIC`` (32-byte requests, extended headers).
EXTENDED_REQUEST_MAGIC = 0x21E41C71
#: ``NBD_SIMPLE_REPLY_MAGIC``.
SIMPLE_REPLY_MAGIC = 0x67446698
#: ``NBD_STRUCTURED_REPLY_MAGIC``.
STRUCTURED_REPLY_MAGIC = 0x668E33EF
#: ``NBD_EXTENDED_REPLY_MAGIC``.
EXTENDED_REPLY_MAGIC = 0x6E8A278C


class HandshakeFlag(enum.IntFlag):
    """16-bit handshake flags the server sends in the greeting."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """32-bit client flags; the server MUST drop the connection on any other bit."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """16-bit transmission (export) flags, ``NBD_FLAG_*``."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Option(enum.IntEnum):
    """Option types, ``NBD_OPT_*``."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn; answered ERR_UNSUP like any unknown option
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class OptionReply(enum.IntEnum):
    """Option reply types, ``NBD_REP_*``; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9
    ERR_EXT_HEADER_REQD = _ERR + 10

    @property
    def is_error(self) -> bool:
        return bool(self.value & _ERR)


class InfoType(enum.IntEnum):
    """Information types of ``NBD_REP_INFO`` (``NBD_INFO_*``)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Request types, ``NBD_CMD_*``."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    """16-bit command flags, ``NBD_CMD_FLAG_*``."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    """Structured/extended reply chunk flags."""

    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types, ``NBD_REPLY_TYPE_*``; errors have bit 15."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class StateFlag(enum.IntFlag):
    """``base:allocation`` status bits (``NBD_STATE_*``)."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class Errno(enum.IntEnum):
    """The error values NBD puts on the wire (``NBD_E*``); they are defined by
    the protocol, not by the host, although they match Linux."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# Host errnos that have an NBD spelling; everything else is EIO (proto.md
# "Error values": "a server SHOULD map ... EDQUOT and EFBIG to ENOSPC").
_HOST_TO_NBD: dict[int, Errno] = {
    _errno.EPERM: Errno.EPERM,
    _errno.EACCES: Errno.EPERM,
    _errno.EROFS: Errno.EPERM,
    _errno.EIO: Errno.EIO,
    _errno.ENOMEM: Errno.ENOMEM,
    _errno.EINVAL: Errno.EINVAL,
    _errno.ENOSPC: Errno.ENOSPC,
    _errno.EDQUOT: Errno.ENOSPC,
    _errno.EFBIG: Errno.ENOSPC,
    _errno.EOVERFLOW: Errno.EOVERFLOW,
    _errno.ENOTSUP: Errno.ENOTSUP,
    _errno.EOPNOTSUPP: Errno.ENOTSUP,
    _errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def to_nbd_errno(host_errno: int | None) -> Errno:
    """Map a host ``errno`` (e.g. ``OSError.errno``) to the NBD error value.

    ``None`` or an errno without an NBD counterpart becomes :attr:`Errno.EIO`.
    """
    if host_errno is None:
        return Errno.EIO
    return _HOST_TO_NBD.get(host_errno, Errno.EIO)

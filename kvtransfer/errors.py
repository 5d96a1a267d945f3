"""The exception hierarchy: every error kvtransfer raises is a KVTransferError.

Each subclass also derives from the builtin a caller would naturally catch (a timeout is a
``TimeoutError``, a bad argument a ``ValueError``, a refused token a ``PermissionError``).
"""

import builtins


class KVTransferError(Exception):
    """Base of every kvtransfer error."""


class TransportError(KVTransferError, ConnectionError):
    """A peer is gone or unreachable, or a transfer failed in flight."""


class TimeoutError(KVTransferError, builtins.TimeoutError):  # noqa: A001 - the contract's name
    """A wait or a transfer deadline ran out."""


class InvalidRequestError(KVTransferError, ValueError):
    """Bad arguments: segments out of bounds, unknown region, layout mismatch."""


class AuthenticationError(KVTransferError, PermissionError):
    """The peers' auth tokens differ, or only one side has one."""


class ProtocolError(KVTransferError):
    """Malformed or hostile bytes, a bad key, or an incompatible protocol version."""


_BY_CODE = {
    1: InvalidRequestError,
    2: TransportError,
    3: TimeoutError,
    4: AuthenticationError,
    5: ProtocolError,
}


def error_for_code(code: int, message: str) -> KVTransferError:
    """The exception instance for a core error code (as reported by Transfer and Endpoint)."""
    return _BY_CODE.get(code, KVTransferError)(message)

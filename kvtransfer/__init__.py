"""kvtransfer: move paged LLM KV-cache blocks from prefill to decode hosts.

See README.md for a quick start; the public API is described in DESIGN.md.
"""

from .endpoint import Endpoint, Notification, Peer, Region, Status, Transfer
from .errors import (
    AuthenticationError,
    InvalidRequestError,
    KVTransferError,
    ProtocolError,
    TimeoutError,
    TransportError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Endpoint",
    "InvalidRequestError",
    "KVTransferError",
    "Notification",
    "Peer",
    "ProtocolError",
    "Region",
    "Status",
    "TimeoutError",
    "Transfer",
    "TransportError",
]

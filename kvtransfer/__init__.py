"""kvtransfer: move paged LLM KV-cache blocks from prefill to decode hosts.

See README.md for a quick start; the public API is described in DESIGN.md.
"""

from .cache import CacheDescriptor, KVCache
from .endpoint import Endpoint, Notification, Peer, Region, Status, Transfer
from .errors import (
    AuthenticationError,
    InvalidRequestError,
    KVTransferError,
    ProtocolError,
    TimeoutError,
    TransportError,
)
from .layout import KVLayout

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "CacheDescriptor",
    "Endpoint",
    "InvalidRequestError",
    "KVCache",
    "KVLayout",
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

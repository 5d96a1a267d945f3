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
from .receiver import KVReceiver, RequestFailed
from .sender import KVSender, KVStream
from .serialize import deserialize_blocks, read_header, serialize_blocks

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "CacheDescriptor",
    "Endpoint",
    "InvalidRequestError",
    "KVCache",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "KVStream",
    "KVTransferError",
    "Notification",
    "Peer",
    "ProtocolError",
    "Region",
    "RequestFailed",
    "Status",
    "TimeoutError",
    "Transfer",
    "TransportError",
    "deserialize_blocks",
    "read_header",
    "serialize_blocks",
]

"""Tickets: what one side of a KV transfer hands the other about a request, as versioned bytes
made by the C++ wire codec (docs/wire-format.md) — never pickle."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core
from .cache import CacheDescriptor


@dataclass(frozen=True)
class Ticket:
    kind: str               # "expect": decode's destination; "offer": prefill's source
    request_id: str
    endpoint_info: bytes    # ep.info() of the side that made it
    tp_rank: int
    tp_size: int
    descriptor: CacheDescriptor
    regions: tuple[int, ...]  # region id of each buffer of the descriptor
    blocks: np.ndarray        # int64 block ids in token order
    timeout_ms: int = 0

    def to_bytes(self) -> bytes:
        return _core.encode_ticket(
            self.kind, self.request_id.encode(), self.endpoint_info, self.tp_rank, self.tp_size,
            self.descriptor.layout.fingerprint().encode(), self.descriptor.to_bytes(),
            list(self.regions), np.asarray(self.blocks, dtype=np.int64), self.timeout_ms)

    @classmethod
    def from_bytes(cls, data: bytes) -> Ticket:
        """Decodes and checks a ticket: ProtocolError for malformed bytes."""
        d = _core.decode_ticket(bytes(data))
        return cls(d["kind"], d["request_id"].decode(errors="replace"), d["endpoint_info"],
                   d["tp_rank"], d["tp_size"], CacheDescriptor.from_bytes(d["descriptor"]),
                   tuple(d["regions"]), d["blocks"], d["timeout_ms"])

"""The prefill side: KVSender pushes a request's blocks, whole or layer by layer as prefill
advances, into the blocks a KVReceiver's ticket names; or offers them for the decode side to
pull (KVReceiver.fetch)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from . import _core
from .cache import KVCache
from .endpoint import Endpoint, Peer, Transfer
from .errors import InvalidRequestError
from .notes import NoteRouter
from .planner import plan_transfer
from .ticket import Ticket
from .tp import slices_between, total_heads


class PeerCache:
    """One Peer per remote endpoint address, reconnecting when a peer died."""

    def __init__(self, ep: Endpoint):
        self._ep = ep
        self._peers: dict[bytes, Peer] = {}
        self._lock = threading.Lock()

    def get(self, info: bytes) -> Peer:
        with self._lock:
            peer = self._peers.get(info)
            if peer is None or not peer.alive:
                peer = self._peers[info] = self._ep.connect(info)
            return peer


def _layer_range(layers: Any, num_layers: int) -> tuple[int, int]:
    if isinstance(layers, int):
        layers = range(layers, layers + 1)
    if isinstance(layers, range) and layers.step == 1:
        b, e = layers.start, layers.stop
    else:
        try:
            b, e = (int(v) for v in layers)
        except (TypeError, ValueError) as err:
            raise InvalidRequestError(f"layers must be an int, a step-1 range or (begin, end), "
                                      f"got {layers!r}") from err
    if not 0 <= b <= e <= num_layers:
        raise InvalidRequestError(f"layers [{b}, {e}) outside the model's {num_layers} layers")
    return b, e


def check_same_layout(ours: KVCache, theirs: Ticket, role: str) -> None:
    """InvalidRequestError naming both layouts when a ticket's cache cannot take ours."""
    try:
        ours.layout.check_compatible(theirs.descriptor.layout)
    except InvalidRequestError as e:
        raise InvalidRequestError(
            f"request {theirs.request_id!r}: the {role}'s layout {theirs.descriptor.layout!r} "
            f"does not match this side's {ours.layout!r}: {e}") from None


class KVStream:
    """One request being pushed. ``send_layers(range)`` as prefill finishes layers; ``close()``
    sends what is left; ``wait()`` blocks until the decode side acknowledged every byte."""

    def __init__(self, sender: KVSender, request_id: str, src_blocks: Any, ticket: bytes,
                 num_tokens: int | None = None):
        self._tx = sender
        self.request_id = request_id
        self._num_tokens = num_tokens
        self._t = Ticket.from_bytes(ticket)
        if self._t.kind != "expect":
            raise InvalidRequestError("KVSender.send/stream needs the ticket of KVReceiver.expect")
        check_same_layout(sender.cache, self._t, "receiver")
        self._src_blocks = np.asarray(src_blocks, dtype=np.int64).reshape(-1)
        layout = sender.cache.layout
        self._slices, self._n_sources = slices_between(
            total_heads(layout, sender.tp_size, sender.total_kv_heads), sender.tp_size,
            sender.tp_rank, self._t.tp_size, self._t.tp_rank)
        self._peer = sender.peers.get(self._t.endpoint_info) if self._slices else None
        self._sent = np.zeros(layout.num_layers, dtype=bool)
        self._transfers: list[Transfer] = []
        self._closed = False

    def send_layers(self, layers: Any) -> None:
        """Pushes layers ``[begin, end)`` of the request (an int, range or (begin, end))."""
        if self._closed:
            raise InvalidRequestError(f"stream of request {self.request_id!r} is closed")
        b, e = _layer_range(layers, len(self._sent))
        if self._sent[b:e].any():
            raise InvalidRequestError(f"request {self.request_id!r}: layers [{b}, {e}) overlap "
                                      "layers already sent")
        self._sent[b:e] = True
        if not self._slices or b == e:
            return
        tx, t = self._tx, self._t
        plans = [plan_transfer(tx.cache, t.descriptor, self._src_blocks, t.blocks, layers=(b, e),
                               heads=s, num_tokens=self._num_tokens) for s in self._slices]
        groups = [g for p in plans for g in p.groups] or [None]
        for i, g in enumerate(groups):
            note = _core.encode_note("layers", self.request_id.encode(), tx.tp_rank,
                                     self._n_sources, b, e, i, len(groups))
            if g is None:  # nothing to move (no blocks): the note alone says so
                src, dst, segs = tx.regions[0], t.regions[0], np.zeros((0, 3), np.int64)
            else:
                src, dst, segs = tx.regions[g.src_buffer], t.regions[g.dst_buffer], g.segments
            self._transfers.append(tx.ep.write(self._peer, src, dst, segs, notify=note,
                                               timeout=tx.timeout))

    def close(self) -> None:
        """Sends the layers not sent yet; the stream then takes no more."""
        if self._closed:
            return
        missing = np.flatnonzero(~self._sent)
        # Send remaining layers in runs, each run one batch.
        if len(missing):
            runs = np.split(missing, np.flatnonzero(np.diff(missing) != 1) + 1)
            for run in runs:
                self.send_layers((int(run[0]), int(run[-1]) + 1))
        self._closed = True

    def done(self) -> bool:
        return all(x.done() for x in self._transfers)

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until every write of the request is acknowledged; raises the first error."""
        limit = self._tx.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        for x in self._transfers:
            x.wait(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> KVStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KVSender:
    """Sends KV blocks of ``cache`` (this rank's shard: ``tp_rank`` of ``tp_size``)."""

    def __init__(self, ep: Endpoint, cache: KVCache, *, tp_rank: int = 0, tp_size: int = 1,
                 total_kv_heads: int | None = None, timeout: float | None = None):
        if not 0 <= tp_rank < tp_size:
            raise InvalidRequestError(f"tp_rank {tp_rank} is outside tp_size {tp_size}")
        self.ep, self.cache = ep, cache
        self.tp_rank, self.tp_size, self.total_kv_heads = tp_rank, tp_size, total_kv_heads
        self.timeout = ep.timeout if timeout is None else float(timeout)
        # remote_read so decode can pull (fetch); nothing here accepts remote writes.
        self.regions = [ep.register(r, remote_read=True) for r in cache.regions()]
        self.peers = PeerCache(ep)

    def stream(self, request_id: str, src_blocks: Any, ticket: bytes,
               num_tokens: int | None = None) -> KVStream:
        """A request to push layer by layer. ``num_tokens`` is needed only when the two sides'
        block sizes differ and the last block is partial."""
        return KVStream(self, request_id, src_blocks, ticket, num_tokens)

    def send(self, request_id: str, src_blocks: Any, ticket: bytes,
             num_tokens: int | None = None) -> KVStream:
        """Pushes every layer of the request; returns the stream to wait() on."""
        s = self.stream(request_id, src_blocks, ticket, num_tokens)
        s.close()
        return s

    def offer(self, request_id: str, src_blocks: Any, timeout: float | None = None) -> bytes:
        """A ticket with which a KVReceiver pulls these blocks (KVReceiver.fetch)."""
        return Ticket("offer", request_id, self.ep.info(), self.tp_rank, self.tp_size,
                      self.cache.descriptor(), tuple(r.id for r in self.regions),
                      np.asarray(src_blocks, dtype=np.int64).reshape(-1),
                      int(1000 * (self.timeout if timeout is None else timeout))).to_bytes()

    def wait_fetched(self, request_id: str, timeout: float | None = None) -> None:
        """Blocks until the decode side has pulled the offered request (its blocks may then be
        freed); raises TransportError if the pull failed, TimeoutError if it did not come."""
        router = NoteRouter.of(self.ep)
        state: dict[str, Any] = {}

        def ready() -> bool:
            for n in router.take(request_id):
                if n.kind == "pulled":
                    state["note"] = n
            return "note" in state

        router.wait(ready, self.timeout if timeout is None else timeout,
                    f"pull of request {request_id!r}")

    def fetched(self, request_id: str) -> bool:
        """Non-blocking wait_fetched, for polling loops: True (once) when the decode side has
        pulled the offered request and its blocks may be freed; False while it has not."""
        router = NoteRouter.of(self.ep)
        router.poll()
        with router.lock:
            return any(n.kind == "pulled" and n.error is None for n in router.take(request_id))

    def close(self) -> None:
        """Deregisters the cache (waiting for transfers that use it)."""
        for r in self.regions:
            r.close()

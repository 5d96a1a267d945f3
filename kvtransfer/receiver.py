"""The decode side: KVReceiver says where a request's blocks must land (expect -> ticket) or
pulls them (fetch), and tells when a request is ready to decode — or that it failed, with the
blocks to recompute, never a half-written cache reported as complete."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core
from .cache import KVCache
from .endpoint import Endpoint, Transfer
from .errors import InvalidRequestError, KVTransferError, TransportError
from .errors import TimeoutError as KVTimeoutError
from .notes import NoteRouter
from .planner import plan_transfer
from .sender import PeerCache, check_same_layout
from .ticket import Ticket
from .tp import slices_between, total_heads


class RequestFailed(TransportError):
    """A request's KV did not arrive whole: ``failed_blocks`` must be recomputed."""

    def __init__(self, message: str, request_id: str, failed_blocks: list[int]):
        super().__init__(message)
        self.request_id = request_id
        self.failed_blocks = failed_blocks


@dataclass
class _Request:
    blocks: np.ndarray
    deadline: float
    n_sources: int | None = None  # learned from the first note (push) or the tickets (pull)
    layers: dict[int, np.ndarray] = field(default_factory=dict)  # src rank -> layers complete
    groups: dict[tuple[int, int, int], set] = field(default_factory=dict)
    reads: list[Transfer] = field(default_factory=list)  # pull: the reads in flight
    sources: list = field(default_factory=list)  # pull: (peer, offer ticket) per fetch
    error: KVTransferError | None = None
    done: bool = False


class KVReceiver:
    """Receives KV blocks into ``cache`` (this rank's shard: ``tp_rank`` of ``tp_size``).
    Consumes the endpoint's notifications (others stay in ``unclaimed_notifications``)."""

    def __init__(self, ep: Endpoint, cache: KVCache, *, tp_rank: int = 0, tp_size: int = 1,
                 total_kv_heads: int | None = None, timeout: float | None = None):
        if not 0 <= tp_rank < tp_size:
            raise InvalidRequestError(f"tp_rank {tp_rank} is outside tp_size {tp_size}")
        self.ep, self.cache = ep, cache
        self.tp_rank, self.tp_size, self.total_kv_heads = tp_rank, tp_size, total_kv_heads
        self.timeout = ep.timeout if timeout is None else float(timeout)
        self.regions = [ep.register(r, remote_write=True) for r in cache.regions()]
        self._router = NoteRouter.of(ep)
        self._requests: dict[str, _Request] = {}
        self._peers = PeerCache(ep)

    @property
    def unclaimed_notifications(self) -> list:
        return self._router.unclaimed

    # ------------------------------------------------------------------ push
    def expect(self, request_id: str, dst_blocks: Any, timeout: float | None = None) -> bytes:
        """Registers where request ``request_id``'s blocks must land; returns the ticket for the
        prefill side's KVSender.send / stream."""
        blocks = self._new_request(request_id, dst_blocks, timeout)
        return Ticket("expect", request_id, self.ep.info(), self.tp_rank, self.tp_size,
                      self.cache.descriptor(), tuple(r.id for r in self.regions), blocks,
                      int(1000 * (self.timeout if timeout is None else timeout))).to_bytes()

    # ------------------------------------------------------------------ pull
    def fetch(self, request_id: str, src_ticket: bytes, dst_blocks: Any,
              timeout: float | None = None, num_tokens: int | None = None) -> None:
        """Starts reading a request's blocks from the prefill side's offer (KVSender.offer).
        With heterogeneous TP, call once per prefill rank's ticket; wait() covers them all."""
        t = Ticket.from_bytes(src_ticket)
        if t.kind != "offer":
            raise InvalidRequestError("KVReceiver.fetch needs the ticket of KVSender.offer")
        check_same_layout(self.cache, t, "sender")
        with self._router.lock:
            req = self._requests.get(request_id)
        created = req is None
        if created:
            self._new_request(request_id, dst_blocks, timeout)
        with self._router.lock:
            req = self._requests[request_id]
        try:
            slices, n_sources = slices_between(
                total_heads(self.cache.layout, t.tp_size, self.total_kv_heads), t.tp_size,
                t.tp_rank, self.tp_size, self.tp_rank)
            peer = self._peers.get(t.endpoint_info)
            plans = [plan_transfer(t.descriptor, self.cache, t.blocks, req.blocks, heads=s,
                                   num_tokens=num_tokens) for s in slices]
        except BaseException:
            if created:  # nothing was read: the request is not left expected
                self.forget(request_id)
            raise
        left = max(0.001, req.deadline - time.monotonic())
        reads = [self.ep.read(peer, self.regions[g.dst_buffer], t.regions[g.src_buffer],
                              g.segments, timeout=left)
                 for p in plans for g in p.groups]
        with self._router.lock:
            req.n_sources = n_sources
            req.reads.extend(reads)
            req.sources.append((peer, t))

    # ------------------------------------------------------------------ completion
    def wait(self, request_id: str, timeout: float | None = None) -> None:
        """Blocks until the request's blocks are all in place, then forgets it. Raises
        RequestFailed (a
        TransportError, with ``failed_blocks``) when it failed, kvtransfer.TimeoutError when it
        is not complete in ``timeout`` seconds (it stays pending until its own deadline)."""
        req = self._get(request_id)
        limit = self.timeout if timeout is None else timeout
        if req.reads:
            self._wait_reads(request_id, req, limit)
        else:
            self._router.wait(lambda: self._settle(request_id, req), limit,
                              f"request {request_id!r}")
        self.forget(request_id)  # reported here; finished() / failed() will not list it again
        if req.error is not None:
            raise req.error

    def _wait_reads(self, request_id: str, req: _Request, limit: float) -> None:
        """Pull: waits on the reads themselves (no notification involved), then tells each
        prefill rank it may free the blocks."""
        deadline = time.monotonic() + limit
        for x in list(req.reads):
            try:
                x.wait(max(0.0, deadline - time.monotonic()))
            except KVTransferError as e:
                if not x.done():
                    raise  # still in flight: only this wait timed out
                with self._router.lock:
                    self._fail(request_id, req, str(e))
                return
        with self._router.lock:
            self._settle(request_id, req)

    def wait_layers(self, request_id: str, layers: int, timeout: float | None = None) -> None:
        """Blocks until layers [0, layers) of the request are complete from every source."""
        req = self._get(request_id)
        self._router.wait(lambda: self._settle(request_id, req) or
                          self._layers_ready(req) >= layers,
                          self.timeout if timeout is None else timeout,
                          f"layers [0, {layers}) of request {request_id!r}")
        if req.error is not None:
            raise req.error

    def layers_ready(self, request_id: str) -> int:
        """How many leading layers of the request are complete from every source (non-blocking)."""
        req = self._get(request_id)
        self._router.poll()
        with self._router.lock:
            self._settle(request_id, req)
            return self._layers_ready(req)

    def finished(self) -> list[str]:
        """Requests complete since the last call (non-blocking); they are forgotten."""
        self._router.poll()
        with self._router.lock:
            out = [rid for rid, req in self._requests.items()
                   if self._settle(rid, req) and req.error is None]
            for rid in out:
                del self._requests[rid]
            return out

    def failed(self) -> dict[str, RequestFailed]:
        """Requests that failed since the last call, with their blocks to recompute."""
        self._router.poll()
        with self._router.lock:
            out = {rid: req.error for rid, req in self._requests.items()
                   if self._settle(rid, req) and req.error is not None}
            for rid in out:
                del self._requests[rid]
            return out

    def cancel(self, request_id: str) -> None:
        """Gives up on a request: transfers of it in flight and any that start later are
        failed; on TCP their bytes are discarded before they land. Its blocks are reported
        failed (on RDMA fabrics, writes already posted can still land: keep the blocks out of
        use until the sender's lease expires)."""
        self.ep._core.refuse_inbound(_core.note_prefix(request_id.encode()),
                                     f"request {request_id!r} was cancelled by the receiver")
        with self._router.lock:
            req = self._requests.pop(request_id, None)
            if req is not None:
                for x in req.reads:
                    x.cancel()

    def forget(self, request_id: str) -> None:
        with self._router.lock:
            self._requests.pop(request_id, None)

    def close(self) -> None:
        """Deregisters the cache (waiting for transfers that use it)."""
        for r in self.regions:
            r.close()

    # ------------------------------------------------------------------ internals
    def _new_request(self, request_id: str, dst_blocks: Any, timeout: float | None) -> np.ndarray:
        blocks = np.asarray(dst_blocks, dtype=np.int64).reshape(-1)
        if len(blocks) and (blocks.min() < 0 or blocks.max() >= self.cache.layout.num_blocks):
            raise InvalidRequestError(f"request {request_id!r}: block ids must be in "
                                      f"[0, {self.cache.layout.num_blocks})")
        limit = self.timeout if timeout is None else float(timeout)
        with self._router.lock:
            if request_id in self._requests:
                raise InvalidRequestError(f"request {request_id!r} is already expected")
            self._requests[request_id] = _Request(blocks, time.monotonic() + limit)
        return blocks

    def _get(self, request_id: str) -> _Request:
        with self._router.lock:
            req = self._requests.get(request_id)
        if req is None:
            raise InvalidRequestError(f"request {request_id!r} is not expected here "
                                      "(never expected, already finished, or cancelled)")
        return req

    def _fail(self, request_id: str, req: _Request, why: str) -> None:
        if req.error is None:
            req.error = RequestFailed(f"request {request_id!r} failed: {why}; its "
                                      f"{len(req.blocks)} blocks must be recomputed",
                                      request_id, req.blocks.tolist())
        req.done = True

    def _notify_pulled(self, request_id: str, req: _Request) -> None:
        """Tells each prefill rank its offered blocks were read and may be freed (an empty read
        carrying the note: it travels after this side holds every byte)."""
        for peer, t in req.sources:
            note = _core.encode_note("pulled", request_id.encode(), t.tp_rank, req.n_sources or 1,
                                     0, self.cache.layout.num_layers, 0, 1)
            self.ep.read(peer, self.regions[0], t.regions[0], np.zeros((0, 3), np.int64),
                         notify=note)

    def _layers_ready(self, req: _Request) -> int:
        if req.n_sources is None or len(req.layers) < req.n_sources:
            return 0
        complete = np.logical_and.reduce(list(req.layers.values()))
        return int(np.argmin(complete)) if not complete.all() else len(complete)

    def _settle(self, request_id: str, req: _Request) -> bool:
        """Files the request's new notes (router lock held); True once it is done or failed."""
        if req.done:
            return True
        num_layers = self.cache.layout.num_layers
        for n in self._router.take(request_id):
            if n.error is not None:
                self._fail(request_id, req, n.error)
                return True
            if n.kind != "layers":
                continue
            req.n_sources = n.n_sources
            got = req.groups.setdefault((n.src_rank, n.layer_begin, n.layer_end), set())
            got.add(n.group)
            if len(got) == n.n_groups:
                req.layers.setdefault(n.src_rank, np.zeros(num_layers, bool))[
                    n.layer_begin:n.layer_end] = True
        if req.sources:
            failed = next((x.error for x in req.reads if x.error is not None), None)
            if failed is not None:
                self._fail(request_id, req, str(failed))
                return True
            if all(x.done() for x in req.reads) and len(req.sources) == req.n_sources:
                self._notify_pulled(request_id, req)
                req.done = True
                return True
        elif self._layers_ready(req) == num_layers:
            req.done = True
            return True
        if time.monotonic() > req.deadline:
            self._fail(request_id, req, KVTimeoutError("its deadline passed").args[0])
            return True
        return False

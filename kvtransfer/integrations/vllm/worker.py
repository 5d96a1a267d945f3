"""Worker-side transfers (vLLM worker process), on kvtransfer's KV layer.

``register_kv_caches`` derives a :class:`kvtransfer.KVLayout` from vLLM's tensors
(:mod:`.kvcache`), wraps them in a :class:`kvtransfer.KVCache` and makes a
:class:`kvtransfer.KVSender` (kv_producer) and/or a :class:`kvtransfer.KVReceiver`
(kv_consumer) on one Endpoint. The worker's handshake metadata (:class:`.connector.WorkerInfo`)
gives the scheduler process what it needs to compose tickets.

Pull: the prefill's scheduler puts an offer ticket in ``kv_transfer_params``; decode's worker
``KVReceiver.fetch``-es it. Once every byte is in, the receiver tells the prefill (the KV
layer's "pulled" note), whose worker sees it with ``KVSender.fetched`` and lets vLLM free the
blocks.
Push: decode's worker ``KVReceiver.expect``-s the request and sends the expect ticket to the
prefill's endpoint (a registration, notification ``kvt1:reg:<ticket>``: the one message the KV
layer has no channel for). The prefill's worker streams the layers with ``KVSender.stream`` from
``save_kv_layer`` as its forward pass computes them when the ticket came first, else sends them
all after; decode's ``KVReceiver`` reports the request once every layer is in.
Every wait is bounded: transfers by the endpoint's timeout, a decode's load by
``load_timeout_s`` (the receiver's deadline), a prefill's hold of blocks by ``lease_s``. A failed
or timed-out load reports its blocks through ``get_block_ids_with_load_errors`` (vLLM then
recomputes or fails the request, per ``kv_load_failure_policy``); the receiver never reports a
half-written request as complete.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

import kvtransfer as kvt
from kvtransfer.notes import NoteRouter
from kvtransfer.sender import PeerCache
from kvtransfer.ticket import Ticket

from .connector import Config, StepMetadata, WorkerInfo
from .kvcache import cache_from_kv_caches

if TYPE_CHECKING:
    import torch
    from vllm.config import KVTransferConfig

log = logging.getLogger("vllm.kvtransfer")  # under "vllm": shown with its logs

REG = b"kvt1:reg:"  # decode -> prefill: the expect ticket of a push
NOTE_LIMIT = 4096  # bytes a notification may carry
NO_SEGMENTS = np.zeros((0, 3), dtype=np.int64)


@dataclass
class Hold:
    """Prefill side: a finished request whose blocks vLLM keeps until decode has them."""
    mode: str
    xfer: str
    deadline: float
    over: bool = False  # sent / pulled / given up: report once vLLM finished the request


@dataclass
class Push:
    """Prefill side: one request's blocks being written to a decode."""
    xfer: str
    src: list[int]
    stream: kvt.KVStream | None = None
    streamed: int = 0  # layers written during the forward pass
    failed: bool = False


class WorkerSide:
    def __init__(self, cfg: Config, num_blocks: int, block_size: int,
                 kv_transfer_config: KVTransferConfig, tp_rank: int = 0, tp_size: int = 1):
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.producer = kv_transfer_config.is_kv_producer
        self.consumer = kv_transfer_config.is_kv_consumer
        self.ep: kvt.Endpoint | None = None
        self.cache: kvt.KVCache | None = None
        self.tx: kvt.KVSender | None = None
        self.rx: kvt.KVReceiver | None = None
        self.layer_index: dict[str, int] = {}
        # decode
        self._loads: dict[str, str] = {}  # KV-layer request id (transfer id) -> vLLM req id
        self._loads_over: set[str] = set()  # loads that failed to start, to report once
        self._load_errors: set[int] = set()
        # prefill
        self._holds: dict[str, Hold] = {}  # vLLM req id -> hold
        self._pushes: dict[str, Push] = {}  # transfer id -> push
        self._regs: dict[str, tuple[bytes, int, float]] = {}  # xfer -> (ticket, blocks, when)
        self._finished_seen: set[str] = set()
        self._step_drained = False

    # ------------------------------------------------------------------ set-up
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.cache = cache_from_kv_caches(kv_caches, self.num_blocks, self.block_size)
        self.layer_index = {name: i for i, name in enumerate(kv_caches)}
        self.ep = kvt.Endpoint(name=f"vllm-{'p' if self.producer else ''}"
                                    f"{'d' if self.consumer else ''}",
                               transport=self.cfg.transport, provider=self.cfg.provider,
                               listen=self.cfg.listen, auth_token=self.cfg.auth_token,
                               timeout=self.cfg.load_timeout_s)
        kw = dict(tp_rank=self.tp_rank, tp_size=self.tp_size)
        # The sender first: its (remote_read) regions get the lowest ids, which a decode-first
        # push registration is sent to (see _register_push).
        if self.producer:
            self.tx = kvt.KVSender(self.ep, self.cache, **kw)
        if self.consumer:
            self.rx = kvt.KVReceiver(self.ep, self.cache, **kw)
        self._router = NoteRouter.of(self.ep)
        self._peers = PeerCache(self.ep)
        log.info("kvtransfer: %r, %d KV layers in %d region(s), listening on %s",
                 self.cache.layout, len(kv_caches), len(self.cache.regions()), self.ep.address)

    def info(self) -> WorkerInfo:
        host, port = self.ep.address.rsplit(":", 1)
        address = f"{self.cfg.advertise_host or host}:{port}"
        return WorkerInfo(
            address=address,
            # connect() takes an info blob or "host:port": advertise the reachable one
            endpoint_info=address.encode() if self.cfg.advertise_host else self.ep.info(),
            descriptor=self.cache.descriptor().to_bytes(),
            send_regions=tuple(r.id for r in self.tx.regions) if self.tx else (),
            recv_regions=tuple(r.id for r in self.rx.regions) if self.rx else (),
            tp_rank=self.tp_rank, tp_size=self.tp_size)

    def close(self) -> None:
        if self.ep is None:
            return
        for side in (self.tx, self.rx):
            if side is not None:
                try:
                    side.close()
                except kvt.KVTransferError as e:
                    log.warning("kvtransfer: closing %s: %s", type(side).__name__, e)
        self.ep.close()
        self.ep = None

    # ------------------------------------------------------------------ per step
    def start_step(self, meta: StepMetadata) -> None:
        """After the forward pass: start this step's loads, take over finished requests."""
        self._step_drained = False
        now = time.monotonic()
        for rid, job in meta.loads.items():
            try:
                self._start_load(rid, job["mode"], job["dst"], job["params"])
            except Exception as e:  # noqa: BLE001 - any failure becomes a load error
                self._fail_start(rid, job, f"cannot start {job['mode']} load: {e}")
        for rid, hold in meta.holds.items():
            self._holds[rid] = Hold(hold["mode"], hold["xfer"], now + hold["lease_s"])
            if hold["mode"] == "push":
                self._pushes.setdefault(hold["xfer"], Push(hold["xfer"], hold["src"]))

    def save_layer(self, layer_name: str, meta: StepMetadata) -> None:
        """During the forward pass, after a layer's KV was written: push it where we can."""
        if not meta.streams or self.tx is None or self.ep is None:
            return
        if not self._step_drained:
            self._drain_registrations()
            self._step_drained = True
        layer = self.layer_index[layer_name]
        for job in meta.streams.values():
            push = self._pushes.setdefault(job["xfer"], Push(job["xfer"], job["src"]))
            if push.failed:
                continue
            try:
                if layer == 0 and push.stream is None:
                    push.stream = self._open_stream(push)
                if push.stream is not None and (layer == 0 or push.streamed):
                    push.stream.send_layers(layer)
                    push.streamed += 1
            except Exception as e:  # noqa: BLE001 - decode times out and reports a load error
                log.warning("kvtransfer: push %s failed: %s", push.xfer, e)
                push.failed = True

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._finished_seen |= finished_req_ids
        if self.ep is None:  # no KV cache registered (yet)
            return None, None
        self._drain_registrations()
        sending = self._poll_sends() if self.tx is not None else set()
        recving = self._poll_loads() if self.rx is not None else set()
        return sending or None, recving or None

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ------------------------------------------------------------------ decode side
    def _start_load(self, rid: str, mode: str, dst: list[int], params: dict[str, Any]) -> None:
        if self.rx is None:
            raise ValueError("this server is not a kv_consumer")
        if mode == "pull":
            ticket = base64.b64decode(params["kvt_ticket"])
            t = Ticket.from_bytes(ticket)
            if t.tp_size != self.tp_size:
                raise ValueError(f"prefill tp_size={t.tp_size}, decode tp_size={self.tp_size} "
                                 "(the connector supports equal TP only)")
            if len(t.blocks) < len(dst):
                raise ValueError(f"the prefill offers {len(t.blocks)} blocks for {len(dst)}")
            if len(t.blocks) > len(dst):  # it computed more than the prompt: take the prompt's
                ticket = dataclasses.replace(t, blocks=t.blocks[:len(dst)]).to_bytes()
            self._track(t.request_id, rid)
            self.rx.fetch(t.request_id, ticket, dst, timeout=self.cfg.load_timeout_s)
        elif mode == "push":
            xfer = str(params["transfer_id"])
            self._track(xfer, rid)
            ticket = self.rx.expect(xfer, dst, timeout=self.cfg.load_timeout_s)
            try:
                self._register_push(str(params["remote_address"]), ticket)
            except Exception:
                self.rx.cancel(xfer)
                raise
        else:
            raise ValueError(f"unknown kvt_mode {mode!r}")

    def _track(self, xfer: str, rid: str) -> None:
        if xfer in self._loads:
            raise ValueError(f"transfer {xfer!r} is already being loaded for "
                             f"{self._loads[xfer]}")
        self._loads[xfer] = rid

    def _register_push(self, address: str, ticket: bytes) -> None:
        """Sends the expect ticket to the prefill's endpoint: an empty read carrying it as its
        notification, aimed at the prefill's first (the KVSender's, remote_read) region."""
        payload = REG + ticket
        if len(payload) > NOTE_LIMIT:
            raise ValueError(f"the push registration takes {len(payload)} bytes, more than a "
                             f"notification's {NOTE_LIMIT} (too many blocks): use pull")
        peer = self._peers.get(address.encode())
        remote = min(peer.regions())
        self.ep.read(peer, self.rx.regions[0], remote, NO_SEGMENTS, notify=payload)

    def _poll_loads(self) -> set[str]:
        """Loads that ended since the last call: done, or failed (blocks in load errors)."""
        over, self._loads_over = self._loads_over, set()
        for xfer in self.rx.finished():
            rid = self._loads.pop(xfer, None)
            if rid is not None:
                over.add(rid)
        for xfer, err in self.rx.failed().items():
            rid = self._loads.pop(xfer, None)
            if rid is None:
                continue
            self.rx.cancel(xfer)  # late bytes of a push must not land in recomputed blocks
            log.warning("kvtransfer: load of %s failed (%s); %d block(s) reported", rid, err,
                        len(err.failed_blocks))
            self._load_errors.update(err.failed_blocks)
            over.add(rid)
        return over

    def _fail_start(self, rid: str, job: dict[str, Any], why: str) -> None:
        for xfer in [x for x, r in self._loads.items() if r == rid]:
            del self._loads[xfer]
        log.warning("kvtransfer: load of %s failed (%s); %d block(s) reported", rid, why,
                    len(job["dst"]))
        self._load_errors.update(job["dst"])
        self._loads_over.add(rid)

    # ------------------------------------------------------------------ prefill side
    def _open_stream(self, push: Push) -> kvt.KVStream | None:
        """The push's stream, once decode's expect ticket is here."""
        reg = self._regs.pop(push.xfer, None)
        if reg is None:
            return None
        ticket, nblocks, _ = reg
        if nblocks > len(push.src):
            raise ValueError(f"decode expects {nblocks} blocks, the prefill has {len(push.src)}")
        return self.tx.stream(push.xfer, push.src[:nblocks], ticket)

    def _poll_sends(self) -> set[str]:
        now = time.monotonic()
        done = set()
        for rid, hold in list(self._holds.items()):
            if not hold.over:
                if hold.mode == "pull":
                    hold.over = self.tx.fetched(hold.xfer)
                else:
                    hold.over = self._advance_push(self._pushes[hold.xfer])
                if not hold.over and now > hold.deadline:
                    log.warning("kvtransfer: lease of %s ended before decode took its KV", rid)
                    hold.over = True
            if hold.over and rid in self._finished_seen:
                done.add(rid)
                del self._holds[rid]
                self._finished_seen.discard(rid)
                self._pushes.pop(hold.xfer, None)
        self._expire(now)
        return done

    def _advance_push(self, push: Push) -> bool:
        """True once the push is over (every write acknowledged, or failed)."""
        try:
            if push.failed:
                return True
            if push.stream is None:
                push.stream = self._open_stream(push)
                if push.stream is None:
                    return False
            push.stream.close()  # sends the layers the forward pass did not
            if not push.stream.done():
                return False
            push.stream.wait(0)  # raises the first error
            log.info("kvtransfer: pushed %s (%d blocks, %d of %d layers during the forward)",
                     push.xfer, len(push.src), push.streamed, len(self.layer_index))
            return True
        except Exception as e:  # noqa: BLE001 - decode times out and reports a load error
            log.warning("kvtransfer: push %s failed: %s", push.xfer, e)
            push.failed = True
            return True

    # ------------------------------------------------------------------ both
    def _drain_registrations(self) -> None:
        """Files push registrations (notifications that are not the KV layer's own)."""
        router = self._router
        router.poll()
        with router.lock:
            got, router.unclaimed[:] = list(router.unclaimed), []
        now = time.monotonic()
        for n in got:
            if not n.payload.startswith(REG):
                log.warning("kvtransfer: ignoring an unknown notification from %s", n.peer)
                continue
            try:
                t = Ticket.from_bytes(n.payload[len(REG):])
                if t.kind != "expect":
                    raise ValueError(f"a {t.kind!r} ticket")
            except Exception as e:  # noqa: BLE001 - a bad registration harms nothing else
                log.warning("kvtransfer: malformed push registration from %s: %s", n.peer, e)
                continue
            self._regs[t.request_id] = (n.payload[len(REG):], len(t.blocks), now)

    def _expire(self, now: float) -> None:
        """Forget early registrations nobody claimed within a lease."""
        for xfer in [x for x, (_, _, t) in self._regs.items() if now - t > self.cfg.lease_s]:
            del self._regs[xfer]

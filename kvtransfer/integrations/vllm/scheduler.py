"""Scheduler-side bookkeeping (vLLM EngineCore process): which requests load, stream or hold
blocks, and the ``kv_transfer_params`` that carry what the other server needs.

The worker's handshake metadata (:class:`.connector.WorkerInfo`, received once) holds its
endpoint info, cache descriptor and region ids, so this process composes kvtransfer tickets
itself: a pull's offer ticket is ``Ticket("offer", ...)`` over the request's block ids.

kv_transfer_params, as they travel:

- client -> prefill: ``{"do_remote_decode": true}`` (+ optional ``"kvt_mode"``, and in
  decode-first push ``"transfer_id"``).
- prefill response (``request_finished``) -> client -> decode:
  ``{"do_remote_prefill": true, "kvt_mode", "transfer_id", "remote_request_id",
  "remote_address"}`` plus, in pull mode, ``"kvt_ticket"``: the offer ticket
  (``Ticket.to_bytes()``, base64) that decode's ``KVReceiver.fetch`` reads from.
- decode-first push, client -> decode (before the prefill request):
  ``{"do_remote_prefill": true, "kvt_mode": "push", "transfer_id", "remote_address"}`` where
  ``remote_address`` is the prefill's kvtransfer endpoint (its ``listen``); decode's worker sends
  its expect ticket there.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtransfer.cache import CacheDescriptor
from kvtransfer.ticket import Ticket

from .connector import MODES, Config, StepMetadata, WorkerInfo

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvtransfer")  # under "vllm": shown with its logs


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class SchedulerSide:
    def __init__(self, cfg: Config, block_size: int):
        self.cfg = cfg
        self.block_size = block_size
        self.worker: WorkerInfo | None = None
        self._descriptor: CacheDescriptor | None = None
        self._meta = StepMetadata()
        self._push_candidates: dict[str, tuple[Request, list[int]]] = {}
        self._held: set[str] = set()  # finished prefill requests whose blocks we hold

    def set_worker_info(self, info: WorkerInfo) -> None:
        self._descriptor = CacheDescriptor.from_bytes(info.descriptor)
        self.worker = info

    # -- decode: load what the prefill computed
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return 0, False
        # Every prompt token's KV comes from the prefill; vLLM recomputes the last one itself.
        count = request.num_prompt_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params:
            return
        if params.get("do_remote_prefill"):
            params["do_remote_prefill"] = False  # one transfer per request, even if re-allocated
            if num_external_tokens <= 0:
                return
            n = _blocks_for(num_external_tokens, self.block_size)
            dst = list(blocks.get_block_ids()[0][:n])
            mode = params.get("kvt_mode", "pull")
            self._meta.loads[request.request_id] = {"mode": mode, "dst": dst,
                                                    "params": dict(params)}
        elif params.get("do_remote_decode") and self._mode(params) == "push":
            self._push_candidates[request.request_id] = (request, blocks.get_block_ids()[0])

    # -- prefill: hold the blocks of finished requests for decode
    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        self._push_candidates.pop(request.request_id, None)
        if not params or not params.get("do_remote_decode"):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED) or not block_ids:
            return False, None  # aborted or errored: nothing to hand over
        if self.worker is None:
            log.error("no worker handshake: cannot hand over %s", request.request_id)
            return False, None
        mode = self._mode(params)
        xfer = str(params.get("transfer_id") or request.request_id)
        src = list(block_ids)
        out = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "kvt_mode": mode,
            "transfer_id": xfer,
            "remote_request_id": request.request_id,
            "remote_address": self.worker.address,
        }
        if mode == "pull":
            if not self.worker.send_regions:
                log.error("cannot offer %s for pull: this server is not a kv_producer",
                          request.request_id)
                return False, None
            out["kvt_ticket"] = base64.b64encode(self.offer_ticket(xfer, src)).decode()
        self._meta.holds[request.request_id] = {"mode": mode, "xfer": xfer, "src": src,
                                                "lease_s": self.cfg.lease_s}
        self._held.add(request.request_id)
        return True, out

    def offer_ticket(self, xfer: str, src_blocks: list[int]) -> bytes:
        """The ticket with which a decode worker pulls ``src_blocks`` (what
        ``KVSender.offer`` would return in the worker process)."""
        w = self.worker
        return Ticket("offer", xfer, w.endpoint_info, w.tp_rank, w.tp_size, self._descriptor,
                      tuple(w.send_regions), np.asarray(src_blocks, dtype=np.int64),
                      int(1000 * self.cfg.lease_s)).to_bytes()

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> StepMetadata:
        # Push requests whose whole prompt is computed in this step can stream layer by layer.
        for rid, (request, blocks) in list(self._push_candidates.items()):
            scheduled = scheduler_output.num_scheduled_tokens.get(rid, 0)
            if scheduled <= 0:
                continue
            if request.num_computed_tokens == 0 and scheduled >= request.num_prompt_tokens:
                params = request.kv_transfer_params
                n = _blocks_for(request.num_prompt_tokens, self.block_size)
                self._meta.streams[rid] = {
                    "xfer": str(params.get("transfer_id") or rid), "src": list(blocks[:n])}
            del self._push_candidates[rid]  # chunked prefill: sent whole once finished
        meta, self._meta = self._meta, StepMetadata()
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._held.difference_update(connector_output.finished_sending or ())

    def has_pending_work(self) -> bool:
        return bool(self._held)

    def _mode(self, params: dict[str, Any]) -> str:
        mode = params.get("kvt_mode") or self.cfg.mode
        if mode not in MODES:
            raise ValueError(f"kv_transfer_params kvt_mode={mode!r}: use one of {MODES}")
        return mode

"""``KVTransferConnector``: the vLLM (v1) KV connector backed by kvtransfer.

The facade only routes vLLM's calls: scheduler-side bookkeeping and ticket composition live
in :mod:`.scheduler` (EngineCore process), byte movement in :mod:`.worker` (worker process),
which wraps vLLM's tensors in a :class:`kvtransfer.KVCache` (layout derived in :mod:`.kvcache`)
and moves blocks with :class:`kvtransfer.KVSender` / :class:`kvtransfer.KVReceiver`.

``kv_connector_extra_config`` keys (all optional):

- ``mode``: ``"pull"`` (default; decode reads the prefill's blocks) or ``"push"`` (prefill
  writes into decode's blocks, layer by layer during its forward pass when decode registered
  first). A request may choose with ``kv_transfer_params["kvt_mode"]``.
- ``transport``: ``"tcp"`` (default), ``"fabric"`` (+ ``provider``) or ``"auto"``.
- ``listen``: ``"host:port"`` of this worker's kvtransfer endpoint (default ``127.0.0.1:0``;
  give a fixed port to a prefill server that decode servers register with first in push mode).
- ``advertise_host``: host put in ``kv_transfer_params`` and tickets instead of the listen host.
- ``auth_token``: shared secret for the endpoints' handshake.
- ``lease_s`` (30): how long a prefill keeps a finished request's blocks for decode.
- ``load_timeout_s`` (30): how long decode waits for a transfer before reporting a load error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvtransfer")  # under "vllm": shown with its logs

MODES = ("pull", "push")


@dataclass(frozen=True)
class Config:
    mode: str = "pull"
    transport: str = "tcp"
    provider: str | None = None
    listen: str = "127.0.0.1:0"
    advertise_host: str | None = None
    auth_token: str | None = None
    lease_s: float = 30.0
    load_timeout_s: float = 30.0

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> Config:
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys {unknown}; known: "
                             f"{sorted(known)}")
        cfg = cls(**extra)
        if cfg.mode not in MODES:
            raise ValueError(f"kv_connector_extra_config mode={cfg.mode!r}: use one of {MODES}")
        return cfg


@dataclass
class WorkerInfo(KVConnectorHandshakeMetadata):
    """What a worker tells its scheduler once, at start-up (vLLM's handshake-metadata path):
    everything the scheduler needs to compose kvtransfer tickets for this worker's cache."""

    address: str  # "host:port" of the worker's endpoint as peers should reach it
    endpoint_info: bytes  # what a peer connects with (ep.info(), or the advertised address)
    descriptor: bytes  # KVCache.descriptor().to_bytes(): layout, buffer sizes, planes
    send_regions: tuple[int, ...]  # KVSender's region ids (remote_read), one per buffer
    recv_regions: tuple[int, ...]  # KVReceiver's region ids (remote_write), one per buffer
    tp_rank: int = 0
    tp_size: int = 1


@dataclass
class StepMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step. Plain data (pickled to the worker process)."""

    # decode: requests whose blocks were allocated for a remote load this step
    #   req id -> {"mode", "dst": [block ids], "params": kv_transfer_params}
    loads: dict[str, dict[str, Any]] = field(default_factory=dict)
    # prefill, push: requests whose whole prompt is computed this step (streamable per layer)
    #   req id -> {"xfer": transfer id, "src": [block ids]}
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    # prefill: finished requests whose blocks are held until sent/pulled or the lease ends
    #   req id -> {"mode", "xfer", "src": [block ids], "lease_s"}
    holds: dict[str, dict[str, Any]] = field(default_factory=dict)


class KVTransferConnector(KVConnectorBase_V1):
    """Moves a request's KV blocks from a prefill vLLM to a decode vLLM with kvtransfer."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = Config.from_vllm(vllm_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        pp = vllm_config.parallel_config.pipeline_parallel_size
        if tp != 1 or pp != 1:
            raise NotImplementedError(f"KVTransferConnector supports tp=pp=1 for now "
                                      f"(got tp={tp}, pp={pp})")
        self._scheduler = self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler import SchedulerSide
            self._scheduler = SchedulerSide(cfg, vllm_config.cache_config.block_size)
        else:
            from .worker import WorkerSide
            self._worker = WorkerSide(cfg, kv_cache_config.num_blocks,
                                      vllm_config.cache_config.block_size,
                                      vllm_config.kv_transfer_config, tp_rank=0, tp_size=tp)

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler.update_connector_output(connector_output)

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]):
        self._scheduler.set_worker_info(metadata[0])

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        # A P/D load fills every block it was given: none of them needs zeroing.
        return self._kv_cache_config.transfer_group_ids

    def has_pending_push_work(self) -> bool:
        return self._scheduler is not None and self._scheduler.has_pending_work()

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._worker.info() if self._worker is not None else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker.start_step(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are asynchronous: vLLM schedules a request only after its load finished.
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        self._worker.save_layer(layer_name, self._get_connector_metadata())

    def wait_for_save(self) -> None:
        # Pushes complete asynchronously; the blocks stay held until get_finished says so.
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()

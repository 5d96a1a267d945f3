"""kvtransfer itself as a benchmark peer: the same workloads and verification as NIXL and
Mooncake get (kvtransfer.bench.harness), over any transport. Waits block in the C++ core
(condition variables, GIL released): nothing spins unless the workload asks for busy polling,
and even then the notification wait is the core's blocking one."""

from __future__ import annotations

from typing import Any

import numpy as np

import kvtransfer as kvt

from .harness import PeerSpec, Workload, block_permutation, now, run_pair


def versions() -> dict[str, str]:
    return {"kvtransfer": kvt.__version__}


def _endpoint(name: str, options: dict[str, Any]) -> kvt.Endpoint:
    return kvt.Endpoint(name, transport=options.get("transport", "tcp"),
                        provider=options.get("provider"),
                        listen=options.get("listen", "127.0.0.1:0"),
                        connections=int(options.get("connections", 2)),
                        timeout=float(options.get("timeout", 60.0)))


class Target:
    def __init__(self, workload: Workload, dst: np.ndarray, options: dict[str, Any]):
        self.ep = _endpoint("bench-decode", options)
        self.region = self.ep.register(dst, remote_write=True, remote_read=True)

    def info(self) -> tuple[bytes, int]:
        return self.ep.info(), self.region.id

    def wait(self, tag: str, deadline: float, busy: bool) -> None:
        self.ep.wait_notification(tag.encode(), timeout=max(0.001, deadline - now()))

    def close(self) -> None:
        self.ep.close()


class Initiator:
    def __init__(self, workload: Workload, src: np.ndarray, info: tuple[bytes, int],
                 options: dict[str, Any]):
        self.ep = _endpoint("bench-prefill", options)
        self.region = self.ep.register(src)
        target_info, self.remote = info
        self.peer = self.ep.connect(target_info)
        bs, n = workload.block_bytes, workload.blocks
        perm = block_permutation(workload)
        self.segments = np.stack([np.arange(n, dtype=np.int64) * bs, perm * bs,
                                  np.full(n, bs, np.int64)], axis=1)

    def write(self, tag: str, deadline: float, busy: bool) -> None:
        x = self.ep.write(self.peer, self.region, self.remote, self.segments, notify=tag.encode())
        x.wait(max(0.001, deadline - now()))

    def close(self) -> None:
        self.ep.close()


def make_target(workload: Workload, dst: np.ndarray, options: dict[str, Any]) -> Target:
    return Target(workload, dst, options)


def make_initiator(workload: Workload, src: np.ndarray, info: Any,
                   options: dict[str, Any]) -> Initiator:
    return Initiator(workload, src, info, options)


def run(workload: Workload, variant: str = "kvtransfer-tcp", **options: Any) -> dict[str, Any]:
    """Measure ``workload`` with kvtransfer between two spawned processes."""
    opts = {k: v for k, v in options.items() if v is not None}
    spec = PeerSpec(__name__, workload, {}, opts)
    return run_pair(variant, spec, {"options": opts,
                                    "notification": "kvtransfer notify (counted completion)"})

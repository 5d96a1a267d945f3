"""kvtransfer itself as a benchmark peer: the same workloads and verification as NIXL and
Mooncake get (kvtransfer.bench.harness), over any registered transport. Waits block in the C++
core (condition variables, GIL released): nothing spins unless the workload asks for busy
polling, and even then the notification wait is the core's blocking one.

write: ``ep.write`` of each batch (the whole request, or one layer) carrying its own
notification; the decode side waits for every one (``ep.wait_notification``), as KVReceiver
counts a streamed request's layer notes. read: the decode side ``ep.read``s each batch and waits
for the reads to complete, as ``KVReceiver.fetch`` does."""

from __future__ import annotations

from typing import Any

import numpy as np

import kvtransfer as kvt

from .harness import (
    PeerSpec,
    Unsupported,
    Workload,
    block_permutation,
    now,
    per_batch,
    places,
    run_pair,
    timed,
)


def versions() -> dict[str, str]:
    return {"kvtransfer": kvt.__version__}


def _endpoint(name: str, options: dict[str, Any]) -> kvt.Endpoint:
    return kvt.Endpoint(name, transport=options.get("transport", "tcp"),
                        provider=options.get("provider"),
                        listen=options.get("listen", f"{options.get('host', '127.0.0.1')}:0"),
                        connections=int(options.get("connections", 2)),
                        timeout=float(options.get("timeout", 60.0)))


def _check_read(ep: kvt.Endpoint, workload: Workload) -> None:
    if workload.op == "read" and not ep.caps().get("rdma_read", False):
        ep.close()
        raise Unsupported(f"transport {ep.caps().get('name')} has no remote read")


class Target:
    def __init__(self, workload: Workload, buf: np.ndarray, options: dict[str, Any]):
        self.ep = _endpoint("bench-decode" if workload.op == "write" else "bench-prefill",
                            options)
        _check_read(self.ep, workload)
        self.region, self.register_s = timed(self.ep.register, buf,
                                             remote_write=workload.op == "write",
                                             remote_read=workload.op == "read")

    def info(self) -> tuple[bytes, int]:
        return self.ep.info(), self.region.id

    def wait(self, tags: list[str], deadline: float, busy: bool) -> None:
        for tag in tags:
            left = max(0.001, deadline - now())
            # A busy-polling workload (latency) polls the whole wait, as the peers spin then.
            self.ep.wait_notification(tag.encode(), timeout=left, spin=left if busy else 0.0)

    def close(self) -> None:
        self.ep.close()


class Initiator:
    def __init__(self, workload: Workload, buf: np.ndarray, info: tuple[bytes, int],
                 options: dict[str, Any]):
        self.op = workload.op
        self.ep = _endpoint("bench-prefill" if workload.op == "write" else "bench-decode",
                            options)
        _check_read(self.ep, workload)
        self.region, self.register_s = timed(self.ep.register, buf)
        target_info, self.remote = info
        self.peer = self.ep.connect(target_info)
        # Other prefill endpoints connected to the same decode side, sending nothing: a decode
        # host's quiet peers (--idle-peers).
        self.idle = [_endpoint(f"bench-idle{i}", options)
                     for i in range(int(options.get("idle_peers", 0)))]
        for e in self.idle:
            e.connect(target_info)
        bs, n = workload.block_bytes, workload.blocks
        perm = block_permutation(workload)
        # (src_off, dst_off, len): for a read src is the remote (prefill) side, as for a write
        # it is the local one, so one table serves both.
        segments = np.stack([np.arange(n, dtype=np.int64) * bs, perm * bs,
                             np.full(n, bs, np.int64)], axis=1)
        self.batches = per_batch(workload, segments)
        self.pending: list[kvt.Transfer] = []

    def post(self, tag: str | None, lo: int, hi: int, deadline: float, busy: bool) -> None:
        move = self.ep.write if self.op == "write" else self.ep.read
        (segments,) = self.batches[lo, hi]
        self.pending.append(move(self.peer, self.region, self.remote, segments,
                                 notify=tag.encode() if tag else None))

    def complete(self, deadline: float, busy: bool) -> None:
        for x in self.pending:
            x.wait(max(0.001, deadline - now()))
        self.pending.clear()

    def close(self) -> None:
        self.ep.close()
        for e in self.idle:
            e.close()


def make_target(workload: Workload, buf: np.ndarray, options: dict[str, Any]) -> Target:
    return Target(workload, buf, options)


def make_initiator(workload: Workload, buf: np.ndarray, info: Any,
                   options: dict[str, Any]) -> Initiator:
    return Initiator(workload, buf, info, options)


def run(workload: Workload, variant: str = "kvtransfer-tcp", hosts: Any = None,
        **options: Any) -> dict[str, Any]:
    """Measure ``workload`` with kvtransfer between two spawned processes (in the network
    namespaces of kvtransfer.testing.netns.TwoHosts ``hosts`` when given)."""
    opts = {k: v for k, v in options.items() if v is not None}
    spec = PeerSpec(__name__, workload, {}, opts, **places(hosts))
    how = ("kvtransfer notify (counted completion), one per batch" if workload.op == "write"
           else "ep.read complete on the decode side")
    return run_pair(variant, spec, {"options": opts, "notification": how})

"""Mooncake Transfer Engine (TCP transport) as a loopback baseline.

Both engines start in P2P-handshake mode (``P2PHANDSHAKE``: no etcd, no metadata server); the
initiator reaches the target by its session name ``<host>:<rpc port>`` (127.0.0.1, or the
target's veth address with --netns). Per batch (the whole request, or one layer when streamed)
the initiator issues one ``batch_transfer_sync`` (source block i -> destination block perm[i]):
a WRITE carries a ``TransferNotify`` and the target (decode) polls ``get_notifies()`` until it
has every batch's; a READ is issued by the decode side and is done when the call returns.
``batch_transfer_sync`` blocks until its batch completes, and the async batch API takes no
notification, so a streamed WRITE posts layer i+1 only after layer i completed.

Mooncake's notification is sent by the initiator, over its metadata RPC, once the initiator has
seen the whole batch complete (``getBatchTransferStatus`` == COMPLETED), so the target hears of a
transfer one extra RPC after the initiator does. The timed window starts before the call (the
address lists are built once, outside it) and ends when the target has the notification.

    python -m kvtransfer.bench.peers.mooncake --block-bytes 65536 --blocks 4096 --pattern random \
        --reps 5 --json [--suite]
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kvtransfer.bench import harness as common
from kvtransfer.bench.harness import Workload

# The TCP transport rejects a batch with more descriptors than these (default 1024 per peer);
# MC_TRANSFER_TIMEOUT bounds a blocked batch_transfer_sync (seconds, plus 1 ns per byte).
VARIANTS: dict[str, dict[str, str]] = {
    "mooncake-tcp": {
        "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER": "65535",
        "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER": "65535",
        "MC_TRANSFER_TIMEOUT": "60",
        "MC_FORCE_TCP": "1",
        "GLOG_minloglevel": "1",  # glog: warnings and errors only
    },
}
DEFAULT_OPTIONS: dict[str, Any] = {}


def run(
    workload: Workload, variant: str = "mooncake-tcp", hosts: Any = None, **options: Any
) -> dict[str, Any]:
    """Measure ``workload`` with Mooncake's TCP transport; ``options`` are extra env vars;
    ``hosts`` (kvtransfer.testing.netns.TwoHosts) puts the sides in its network namespaces."""
    env = {**VARIANTS[variant], **{k: str(v) for k, v in options.items()}}
    spec = common.PeerSpec(__name__, workload, env, {}, **common.places(hosts))
    note = (
        "mooncake TransferNotify, sent by the initiator after each batch completed"
        if workload.op == "write"
        else "batch_transfer_sync READ returned on the decode side"
    )
    return common.run_pair(variant, spec, extra={"env": env, "notification": note})


def versions() -> dict[str, str]:
    return {
        "mooncake-transfer-engine-non-cuda": common.dist_version(
            "mooncake-transfer-engine-non-cuda"
        )
    }


def _engine(buf: np.ndarray, host: str):
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize(host, "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("mooncake TransferEngine.initialize failed")
    rc, register_s = common.timed(engine.register_memory, common.buffer_address(buf), buf.nbytes)
    if rc != 0:
        raise RuntimeError("mooncake register_memory failed")
    return engine, register_s


class _Target:
    def __init__(self, workload: Workload, buf: np.ndarray, options: dict[str, Any]):
        self.buf = buf
        self.host = options["host"]
        self.engine, self.register_s = _engine(buf, self.host)

    def info(self) -> dict[str, Any]:
        return {
            "session": f"{self.host}:{self.engine.get_rpc_port()}",
            "base": common.buffer_address(self.buf),
        }

    def wait(self, tags: list[str], deadline: float, busy: bool) -> None:
        missing = set(tags)

        def arrived() -> bool:
            missing.difference_update(n.msg for n in self.engine.get_notifies())
            return not missing

        common.poll_until(arrived, deadline, busy, f"Mooncake notifications {tags[0]}..")

    def close(self) -> None:
        self.engine.unregister_memory(common.buffer_address(self.buf))


class _Initiator:
    def __init__(
        self, workload: Workload, buf: np.ndarray, info: dict[str, Any], options: dict[str, Any]
    ):
        self.buf = buf
        self.engine, self.register_s = _engine(buf, options["host"])
        self.session = info["session"]
        perm = common.block_permutation(workload)
        # Source block i -> destination block perm[i]; this side holds the source of a WRITE
        # and the destination of a READ.
        here, there = common.buffer_address(buf), info["base"]
        if workload.op == "write":
            local = common.block_addresses(here, workload)
            remote = common.block_addresses(there, workload, perm)
        else:
            local = common.block_addresses(here, workload, perm)
            remote = common.block_addresses(there, workload)
        self.batches = common.per_batch(workload, local.tolist(), remote.tolist(),
                                        [workload.block_bytes] * workload.blocks)
        self.op = workload.op

    def post(self, tag: str | None, lo: int, hi: int, deadline: float, busy: bool) -> None:
        # Blocks until the batch completes or MC_TRANSFER_TIMEOUT passes; the harness's own
        # per-rep timeout kills the process should it hang beyond that.
        from mooncake.engine import TransferNotify, TransferOpcode

        opcode = TransferOpcode.Write if self.op == "write" else TransferOpcode.Read
        notify = TransferNotify("kvbench-initiator", tag) if tag else None
        local_addrs, remote_addrs, lengths = self.batches[lo, hi]
        rc = self.engine.batch_transfer_sync(
            self.session,
            local_addrs,
            remote_addrs,
            lengths,
            opcode,
            notify,
        )
        if rc != 0:
            raise RuntimeError(f"mooncake batch_transfer_sync {self.op} {tag} returned {rc}")

    def complete(self, deadline: float, busy: bool) -> None:
        """Nothing left: each batch_transfer_sync returned complete."""

    def close(self) -> None:
        self.engine.unregister_memory(common.buffer_address(self.buf))


def make_target(workload: Workload, buf: np.ndarray, options: dict[str, Any]) -> _Target:
    return _Target(workload, buf, options)


def make_initiator(
    workload: Workload, buf: np.ndarray, info: dict[str, Any], options: dict[str, Any]
) -> _Initiator:
    return _Initiator(workload, buf, info, options)


if __name__ == "__main__":
    sys.exit(common.cli(run, list(VARIANTS)))

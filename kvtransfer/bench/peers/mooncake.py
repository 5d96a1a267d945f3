"""Mooncake Transfer Engine (TCP transport) as a loopback baseline.

Both engines start in P2P-handshake mode (``P2PHANDSHAKE``: no etcd, no metadata server); the
initiator reaches the target by its session name ``127.0.0.1:<rpc port>``. Per rep the initiator
issues one ``batch_transfer_sync`` WRITE (source block i -> destination block perm[i]) carrying a
``TransferNotify``; the target polls ``get_notifies()`` until that notification arrives.

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

_HOST = "127.0.0.1"
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


def run(workload: Workload, variant: str = "mooncake-tcp", **options: Any) -> dict[str, Any]:
    """Measure ``workload`` with Mooncake's TCP transport; ``options`` are extra env vars."""
    env = {**VARIANTS[variant], **{k: str(v) for k, v in options.items()}}
    spec = common.PeerSpec(__name__, workload, env, {})
    note = "mooncake TransferNotify, sent by the initiator after its batch completed"
    return common.run_pair(variant, spec, extra={"env": env, "notification": note})


def versions() -> dict[str, str]:
    return {
        "mooncake-transfer-engine-non-cuda": common.dist_version(
            "mooncake-transfer-engine-non-cuda"
        )
    }


def _engine(buf: np.ndarray):
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize(_HOST, "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("mooncake TransferEngine.initialize failed")
    if engine.register_memory(common.buffer_address(buf), buf.nbytes) != 0:
        raise RuntimeError("mooncake register_memory failed")
    return engine


class _Target:
    def __init__(self, workload: Workload, dst: np.ndarray, options: dict[str, Any]):
        self.dst = dst
        self.engine = _engine(dst)

    def info(self) -> dict[str, Any]:
        return {
            "session": f"{_HOST}:{self.engine.get_rpc_port()}",
            "base": common.buffer_address(self.dst),
        }

    def wait(self, tag: str, deadline: float, busy: bool) -> None:
        def arrived() -> bool:
            return any(n.msg == tag for n in self.engine.get_notifies())

        common.poll_until(arrived, deadline, busy, f"Mooncake notification {tag}")

    def close(self) -> None:
        self.engine.unregister_memory(common.buffer_address(self.dst))


class _Initiator:
    def __init__(
        self, workload: Workload, src: np.ndarray, info: dict[str, Any], options: dict[str, Any]
    ):
        self.src = src
        self.engine = _engine(src)
        self.session = info["session"]
        perm = common.block_permutation(workload)
        self.src_addrs = common.block_addresses(common.buffer_address(src), workload).tolist()
        self.dst_addrs = common.block_addresses(info["base"], workload, perm).tolist()
        self.lengths = [workload.block_bytes] * workload.blocks

    def write(self, tag: str, deadline: float, busy: bool) -> None:
        # Blocks until the batch completes or MC_TRANSFER_TIMEOUT passes; the harness's own
        # per-rep timeout kills the process should it hang beyond that.
        from mooncake.engine import TransferNotify, TransferOpcode

        rc = self.engine.batch_transfer_sync(
            self.session,
            self.src_addrs,
            self.dst_addrs,
            self.lengths,
            TransferOpcode.Write,
            TransferNotify("kvbench-initiator", tag),
        )
        if rc != 0:
            raise RuntimeError(f"mooncake batch_transfer_sync {tag} returned {rc}")

    def close(self) -> None:
        self.engine.unregister_memory(common.buffer_address(self.src))


def make_target(workload: Workload, dst: np.ndarray, options: dict[str, Any]) -> _Target:
    return _Target(workload, dst, options)


def make_initiator(
    workload: Workload, src: np.ndarray, info: dict[str, Any], options: dict[str, Any]
) -> _Initiator:
    return _Initiator(workload, src, info, options)


if __name__ == "__main__":
    sys.exit(common.cli(run, list(VARIANTS)))

"""NVIDIA NIXL (UCX backend) as a loopback baseline.

Per rep the initiator makes one transfer request from prepared descriptor lists (source block
i -> destination block perm[i]) per batch (the whole request, or one layer when streamed), posts
it and polls them all to DONE. A WRITE carries the batch's notification and the target (decode)
polls ``get_new_notifs()`` until it has every one; a READ is posted by the decode side, which is
done when its READ requests are DONE (vLLM's NIXL connector pulls this way). The timed window
starts before the first ``make_prepped_xfer`` (a connector builds one request per KV request)
and ends when the decode side has the bytes. Metadata travels over the harness pipe
(``get_agent_metadata`` -> ``add_remote_agent``), so NIXL's own listener thread and any
metadata server stay off.

Variants (all pin UCX's network devices to ``lo``, or to the side's veth end with --netns):
  ``nixl-ucx-tcp``      UCX restricted to TCP (``UCX_TLS=tcp``), NIXL's defaults otherwise;
  ``nixl-ucx-default``  NIXL's and UCX's defaults: on one host that is TCP plus CMA
                        (process_vm_writev) for large messages; no shared memory, see below;
  ``nixl-ucx-shm``      ``ucx_error_handling_mode=none``, which lets UCX use sysv/posix shared
                        memory (NIXL's default error handling "peer" excludes it).
``--option progress_thread=false`` turns NIXL's progress thread off (system gets
``-noprogthread``); the caller's polling then drives UCX.

    python -m kvtransfer.bench.peers.nixl --block-bytes 65536 --blocks 4096 --pattern random \
        --reps 5 --json [--variant nixl-ucx-default] [--suite] [--all-variants]
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kvtransfer.bench import harness as common
from kvtransfer.bench.harness import Workload

# UCX_NET_DEVICES=lo keeps UCX's TCP on loopback (the worker address would otherwise list every
# interface); UCX_WARN_UNUSED_ENV_VARS=n silences a warning about the variables set here.
# UCX_NET_DEVICES is set per side from the harness's ``net_device`` option (see _agent).
_LOOPBACK = {"UCX_WARN_UNUSED_ENV_VARS": "n", "NIXL_LOG_LEVEL": "WARN"}

# progress_thread: NIXL's progress thread (NIXL's default: on). ucx_error_handling_mode: NIXL's
# default "peer" rules out UCX's shared-memory transports (sysv/posix cannot detect a dead peer),
# so with it same-host traffic goes over tcp + cma; "none" lets UCX use shared memory.
DEFAULT_OPTIONS: dict[str, Any] = {"progress_thread": True, "ucx_error_handling_mode": "peer"}

# variant -> (env for both processes, options that differ from DEFAULT_OPTIONS)
VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "nixl-ucx-tcp": ({**_LOOPBACK, "UCX_TLS": "tcp"}, {}),
    "nixl-ucx-default": (dict(_LOOPBACK), {}),
    "nixl-ucx-shm": (dict(_LOOPBACK), {"ucx_error_handling_mode": "none"}),
}
_TARGET_NAME, _INITIATOR_NAME = "kvbench-target", "kvbench-initiator"


def run(
    workload: Workload, variant: str = "nixl-ucx-tcp", hosts: Any = None, **options: Any
) -> dict[str, Any]:
    """Measure ``workload`` with NIXL; ``options`` override the variant's options; ``hosts``
    (kvtransfer.testing.netns.TwoHosts) puts the two sides in its network namespaces."""
    env, variant_options = VARIANTS[variant]
    opts = {**DEFAULT_OPTIONS, **variant_options, **options}
    system = variant if opts["progress_thread"] else f"{variant}-noprogthread"
    spec = common.PeerSpec(__name__, workload, env, opts, **common.places(hosts))
    extra = {
        "env": {**env, "UCX_NET_DEVICES": "lo" if hosts is None else "the side's veth end"},
        "options": opts,
        "notification": "nixl notif (get_new_notifs), one per batch"
        if workload.op == "write"
        else "READ requests DONE on the decode side",
        "app_polling": "spin" if _spins(workload.busy_poll, opts) else "sleep 100us",
    }
    return common.run_pair(system, spec, extra=extra)


def _spins(busy: bool, options: dict[str, Any]) -> bool:
    """Whether the application threads spin on NIXL. Not beside NIXL's progress thread: a main
    thread spinning on get_new_notifs/check_xfer_state contends with it for the UCX worker and,
    on 2 cores, turned a ~0.1 ms round trip into 24-32 ms (p50). So with the progress thread
    the application polls every 100 us, as a connector polling per scheduler step would."""
    return busy and not options["progress_thread"]


def versions() -> dict[str, str]:
    import nixl  # noqa: F401  (picks the nixl_cuXX backend module)

    backend = sys.modules["nixl._api"].__name__.split(".")[0]
    return {
        "nixl": common.dist_version("nixl"),
        "nixl_backend": backend,
        "nixl_backend_version": common.dist_version(backend.replace("_", "-")),
        "ucx": _ucx_version(),
    }


def _ucx_version() -> str:
    """Version of the libucp the UCX plugin loaded (the wheel bundles its own UCX)."""
    import ctypes

    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/libucp" in line}
    for path in sorted(paths):
        get = ctypes.CDLL(path).ucp_get_version_string
        get.restype = ctypes.c_char_p
        return get().decode()
    return "unknown (libucp not loaded)"


def _agent(name: str, options: dict[str, Any]):
    import os

    os.environ["UCX_NET_DEVICES"] = options["net_device"]  # read when the backend starts UCX
    from nixl._api import nixl_agent, nixl_agent_config

    config = nixl_agent_config(enable_prog_thread=options["progress_thread"], backends=[])
    agent = nixl_agent(name, config)
    agent.create_backend("UCX", {"ucx_error_handling_mode": options["ucx_error_handling_mode"]})
    return agent


def _register(agent, buf: np.ndarray):
    region = np.array([[common.buffer_address(buf), buf.nbytes, 0]], dtype=np.uint64)
    return agent.register_memory(region, "DRAM")


def _descs(base: int, workload: Workload) -> np.ndarray:
    """Nx3 (address, length, device id) rows, one per block."""
    rows = np.zeros((workload.blocks, 3), dtype=np.uint64)
    rows[:, 0] = common.block_addresses(base, workload)
    rows[:, 1] = workload.block_bytes
    return rows


class _Target:
    def __init__(self, workload: Workload, buf: np.ndarray, options: dict[str, Any]):
        self.options = options
        self.agent = _agent(_TARGET_NAME, options)
        self.reg, self.register_s = common.timed(_register, self.agent, buf)
        self.base = common.buffer_address(buf)

    def info(self) -> dict[str, Any]:
        return {"metadata": self.agent.get_agent_metadata(), "base": self.base}

    def wait(self, tags: list[str], deadline: float, busy: bool) -> None:
        missing = {t.encode() for t in tags}

        def arrived() -> bool:
            for msgs in self.agent.get_new_notifs().values():
                missing.difference_update(msgs)
            return not missing

        what = f"NIXL notifs {tags[0]}.. ({len(tags)})"
        common.poll_until(arrived, deadline, _spins(busy, self.options), what)

    def close(self) -> None:
        self.agent.deregister_memory(self.reg)


class _Initiator:
    def __init__(
        self, workload: Workload, buf: np.ndarray, info: dict[str, Any], options: dict[str, Any]
    ):
        self.options = options
        self.agent = _agent(_INITIATOR_NAME, options)
        self.reg, self.register_s = common.timed(_register, self.agent, buf)
        self.remote = self.agent.add_remote_agent(info["metadata"])
        self.local = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", _descs(common.buffer_address(buf), workload), "DRAM"
        )
        self.remote_side = self.agent.prep_xfer_dlist(
            self.remote, _descs(info["base"], workload), "DRAM"
        )
        # Source block i -> destination block perm[i]; the initiator holds the source of a
        # WRITE and the destination of a READ.
        src_idx = np.arange(workload.blocks, dtype=np.int32)
        dst_idx = common.block_permutation(workload).astype(np.int32)
        self.op = workload.op.upper()
        self.batches = common.per_batch(
            workload, *((src_idx, dst_idx) if self.op == "WRITE" else (dst_idx, src_idx)))
        self.agent.make_connection(self.remote)
        self.pending: list[list[Any]] = []  # [handle, state] per batch posted

    def post(self, tag: str | None, lo: int, hi: int, deadline: float, busy: bool) -> None:
        local_idx, remote_idx = self.batches[lo, hi]
        handle = self.agent.make_prepped_xfer(
            self.op,
            self.local,
            local_idx,
            self.remote_side,
            remote_idx,
            notif_msg=tag.encode() if tag else b"",
        )
        self.pending.append([handle, "PROC"])
        try:
            self.pending[-1][1] = self.agent.transfer(handle)
        except BaseException:
            self._release_all()
            raise

    def complete(self, deadline: float, busy: bool) -> None:
        def all_done() -> bool:
            for entry in self.pending:
                if entry[1] == "PROC":
                    entry[1] = self.agent.check_xfer_state(entry[0])
            return all(entry[1] != "PROC" for entry in self.pending)

        try:
            what = f"NIXL {self.op} of {len(self.pending)} batches"
            common.poll_until(all_done, deadline, _spins(busy, self.options), what)
            failed = [entry[1] for entry in self.pending if entry[1] != "DONE"]
            if failed:
                raise RuntimeError(f"NIXL {self.op} ended in states {failed}")
        finally:
            self._release_all()

    def _release_all(self) -> None:
        for handle, _ in self.pending:
            handle.release()
        self.pending.clear()

    def close(self) -> None:
        self.agent.remove_remote_agent(self.remote)
        self.agent.deregister_memory(self.reg)


def make_target(workload: Workload, buf: np.ndarray, options: dict[str, Any]) -> _Target:
    return _Target(workload, buf, options)


def make_initiator(
    workload: Workload, buf: np.ndarray, info: dict[str, Any], options: dict[str, Any]
) -> _Initiator:
    return _Initiator(workload, buf, info, options)


if __name__ == "__main__":
    sys.exit(common.cli(run, list(VARIANTS)))

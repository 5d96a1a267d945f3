"""NVIDIA NIXL (UCX backend) as a loopback baseline.

Per rep the initiator makes one transfer request from prepared descriptor lists (source block
i -> destination block perm[i]), posts it with the rep's notification, and polls it to DONE; the
target polls ``get_new_notifs()`` until that notification arrives. The timed window starts before
``make_prepped_xfer`` (a connector builds one request per KV request) and ends when the target
has the notification. Metadata travels over the harness pipe (``get_agent_metadata`` ->
``add_remote_agent``), so NIXL's own listener thread and any metadata server stay off.

Variants (all pin UCX's network devices to ``lo``):
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
_LOOPBACK = {"UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n", "NIXL_LOG_LEVEL": "WARN"}

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


def run(workload: Workload, variant: str = "nixl-ucx-tcp", **options: Any) -> dict[str, Any]:
    """Measure ``workload`` with NIXL; ``options`` override the variant's options."""
    env, variant_options = VARIANTS[variant]
    opts = {**DEFAULT_OPTIONS, **variant_options, **options}
    system = variant if opts["progress_thread"] else f"{variant}-noprogthread"
    spec = common.PeerSpec(__name__, workload, env, opts)
    extra = {
        "env": env,
        "options": opts,
        "notification": "nixl notif (get_new_notifs)",
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
    def __init__(self, workload: Workload, dst: np.ndarray, options: dict[str, Any]):
        self.options = options
        self.agent = _agent(_TARGET_NAME, options)
        self.reg = _register(self.agent, dst)
        self.base = common.buffer_address(dst)

    def info(self) -> dict[str, Any]:
        return {"metadata": self.agent.get_agent_metadata(), "base": self.base}

    def wait(self, tag: str, deadline: float, busy: bool) -> None:
        want = tag.encode()

        def arrived() -> bool:
            return any(want in msgs for msgs in self.agent.get_new_notifs().values())

        common.poll_until(arrived, deadline, _spins(busy, self.options), f"NIXL notif {tag}")

    def close(self) -> None:
        self.agent.deregister_memory(self.reg)


class _Initiator:
    def __init__(
        self, workload: Workload, src: np.ndarray, info: dict[str, Any], options: dict[str, Any]
    ):
        self.options = options
        self.agent = _agent(_INITIATOR_NAME, options)
        self.reg = _register(self.agent, src)
        self.remote = self.agent.add_remote_agent(info["metadata"])
        self.local = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", _descs(common.buffer_address(src), workload), "DRAM"
        )
        self.remote_side = self.agent.prep_xfer_dlist(
            self.remote, _descs(info["base"], workload), "DRAM"
        )
        self.local_idx = np.arange(workload.blocks, dtype=np.int32)
        self.remote_idx = common.block_permutation(workload).astype(np.int32)
        self.agent.make_connection(self.remote)

    def write(self, tag: str, deadline: float, busy: bool) -> None:
        handle = self.agent.make_prepped_xfer(
            "WRITE",
            self.local,
            self.local_idx,
            self.remote_side,
            self.remote_idx,
            notif_msg=tag.encode(),
        )
        try:
            state = [self.agent.transfer(handle)]

            def complete() -> bool:
                if state[0] == "PROC":
                    state[0] = self.agent.check_xfer_state(handle)
                return state[0] != "PROC"

            spin = _spins(busy, self.options)
            common.poll_until(complete, deadline, spin, f"NIXL transfer {tag}")
            if state[0] != "DONE":
                raise RuntimeError(f"NIXL transfer {tag} ended in state {state[0]}")
        finally:
            handle.release()

    def close(self) -> None:
        self.agent.remove_remote_agent(self.remote)
        self.agent.deregister_memory(self.reg)


def make_target(workload: Workload, dst: np.ndarray, options: dict[str, Any]) -> _Target:
    return _Target(workload, dst, options)


def make_initiator(
    workload: Workload, src: np.ndarray, info: dict[str, Any], options: dict[str, Any]
) -> _Initiator:
    return _Initiator(workload, src, info, options)


if __name__ == "__main__":
    sys.exit(common.cli(run, list(VARIANTS)))

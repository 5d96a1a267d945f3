"""What every transfer benchmark shares, whatever library moves the bytes.

- ``Workload`` and the standard set (``STANDARD_WORKLOADS``);
- the block mapping (source block i -> destination block ``perm[i]``), block addresses;
- payloads that differ per block and per rep, poisoning and byte-for-byte verification;
- clocks comparable across processes (CLOCK_MONOTONIC) and process CPU time;
- a two-process harness (a TARGET and an INITIATOR, spawned, on loopback or in two network
  namespaces) and the JSON record.

Dimensions of a run: ``op`` "write" (prefill pushes into decode; timed until decode is notified)
or "read" (decode pulls from prefill, as vLLM's NIXL connector does; timed until the read
completes on the decode side), and ``mode`` "whole" (one batch per request) or "streamed" (one
batch per layer, each with its own notification, posted back to back or ``layer_delay_s``
apart to stand in for the layer's compute). The destination is verified on the decode side
after every rep in every combination.

No transfer library is imported here, so kvtransfer's own bench can reuse all of it. A peer module
plugs into ``run_pair`` by exposing ``make_target``, ``make_initiator`` and ``versions`` (see
``run_pair``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

GB = 1e9
OPS = ("write", "read")
MODES = ("whole", "streamed")
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
POLL_SLEEP_S = 100e-6  # pause between completion polls when not busy-polling
SETUP_TIMEOUT_S = 120.0  # start-up of a child: import, allocation, registration, handshake
SHUTDOWN_TIMEOUT_S = 15.0
POISON_BYTE = 0x5A


class PeerError(RuntimeError):
    """A child process failed; the message carries its traceback."""


class VerificationError(RuntimeError):
    """The destination did not hold the expected bytes after a transfer."""


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """One request of ``blocks`` blocks of ``block_bytes``, written once per rep."""

    block_bytes: int
    blocks: int
    pattern: str = "random"  # "random": seeded permutation; "sequential": identity
    reps: int = 5
    warmup: int = 1  # verified like the others, left out of the numbers
    seed: int = 1234  # of the permutation; payloads are seeded by (seed, rep)
    busy_poll: bool = False  # spin on completion instead of sleeping POLL_SLEEP_S
    # The initiator polls for its next command instead of sleeping, so it posts from a busy CPU
    # as a prefill worker does right after its forward pass. Asleep between reps, every post
    # starts on a CPU that was idle and pays for cold caches (benchmarks/NOTES.md).
    initiator_busy: bool = False
    sweep: str = ""  # the sweep it is a point of ("block-size", "blocks"), for charts
    name: str = ""
    op: str = "write"  # "write": prefill pushes; "read": decode pulls
    mode: str = "whole"  # "whole": one batch; "streamed": one batch per layer
    layers: int = 1  # streamed: batches; the same block table in every layer, as a paged cache
    layer_delay_s: float = 0.0  # streamed: pause before each layer after the first (compute)

    def __post_init__(self) -> None:
        if self.pattern not in ("random", "sequential"):
            raise ValueError(f"pattern must be 'random' or 'sequential', not {self.pattern!r}")
        if self.block_bytes <= 0 or self.blocks <= 0 or self.reps <= 0 or self.warmup < 0:
            raise ValueError("block_bytes, blocks and reps must be > 0, warmup >= 0")
        if self.op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}, not {self.op!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.layers <= 0 or self.blocks % self.layers:
            raise ValueError(f"{self.blocks} blocks cannot be split into {self.layers} layers "
                             "of equal size (give a layer count that divides the block count)")
        if self.mode == "whole" and self.layers != 1:
            raise ValueError("layers > 1 needs mode='streamed'")
        if self.layer_delay_s < 0:
            raise ValueError("layer_delay_s must be >= 0")

    @property
    def total_bytes(self) -> int:
        return self.block_bytes * self.blocks

    @property
    def label(self) -> str:
        """The workload's name, plus op and mode where they are not the default write/whole."""
        base = self.name or f"{self.blocks}x{self.block_bytes}B-{self.pattern}"
        if self.op != "write":
            base += f" {self.op}"
        if self.mode == "streamed":
            delay = f" +{self.layer_delay_s * 1e6:g}us" if self.layer_delay_s else ""
            base += f" streamed {self.layers}L{delay}"
        return base

    def layer_bounds(self) -> list[tuple[int, int]]:
        """[lo, hi) source block indices of each batch: one per layer (one in whole mode)."""
        per = self.blocks // self.layers
        return [(i * per, (i + 1) * per) for i in range(self.layers)]

    def rep_timeout_s(self) -> float:
        """Bound on one rep: generous (20 MB/s floor), but never infinite."""
        return 30.0 + self.total_bytes / 20e6


def latency_workload(reps: int = 200, initiator_busy: bool = False,
                     decode_sleeps: bool = False) -> Workload:
    """One 64 KiB write -> target notified, repeated; spins on completion on both sides, or
    (``decode_sleeps``) sleeps until notified, as a serving framework's receiver does."""
    name = "latency-64KiB"
    if initiator_busy:
        name += "-busy-prefill"
    if decode_sleeps:
        name += "-sleeping-decode"
    return Workload(
        65536, 1, "sequential", reps=reps, warmup=20, busy_poll=not decode_sleeps,
        initiator_busy=initiator_busy, name=name,
    )


STANDARD_WORKLOADS: dict[str, Workload] = {
    "4MiBx64": Workload(4 << 20, 64, "random", name="4MiBx64-random"),
    "64KiBx4096": Workload(64 << 10, 4096, "random", name="64KiBx4096-random"),
    "4KiBx16384": Workload(4 << 10, 16384, "random", name="4KiBx16384-random"),
    "latency": latency_workload(),
    "latency-busy": latency_workload(initiator_busy=True),
    "latency-sleeping": latency_workload(decode_sleeps=True),
}
# Their reps are their own, not --reps.
LATENCY_WORKLOADS = ("latency", "latency-busy", "latency-sleeping")


def block_permutation(workload: Workload) -> np.ndarray:
    """perm[i] = destination block of source block i (int64). With several layers, every layer
    gets the same block table (as in a paged cache), offset to its own part of the buffer."""
    per = workload.blocks // workload.layers
    if workload.pattern == "sequential":
        table = np.arange(per, dtype=np.int64)
    else:
        table = np.random.default_rng(workload.seed).permutation(per).astype(np.int64)
    offsets = np.arange(workload.layers, dtype=np.int64)[:, None] * per
    return (offsets + table[None, :]).reshape(-1)


def per_batch(workload: Workload, *tables: Any) -> dict[tuple[int, int], tuple[Any, ...]]:
    """``tuple(t[lo:hi] for t in tables)`` for each batch [lo, hi) of ``workload``, made at
    setup: the block table is fixed for the run, so an adapter's post looks its batch up instead
    of slicing on the clock (a numpy slice on a CPU gone cold between reps costs ~2 µs, most of
    what the latency rows' adapters added). Every peer's adapter does the same."""
    return {(lo, hi): tuple(t[lo:hi] for t in tables) for lo, hi in workload.layer_bounds()}


def block_addresses(base: int, workload: Workload, order: np.ndarray | None = None) -> np.ndarray:
    """Start address of each block (uint64); ``order`` picks and orders block indices."""
    idx = np.arange(workload.blocks, dtype=np.uint64) if order is None else order.astype(np.uint64)
    return np.uint64(base) + idx * np.uint64(workload.block_bytes)


def buffer_address(buf: np.ndarray) -> int:
    return int(buf.ctypes.data)


def transfer_tag(rep: int) -> str:
    """Notification payload of rep ``rep``: one per rep, so a stale one cannot match."""
    return f"kvbench-rep-{rep}"


def layer_tags(workload: Workload, rep: int) -> list[str]:
    """Notification payload of each batch of rep ``rep`` (one per layer when streamed)."""
    if workload.mode == "whole":
        return [transfer_tag(rep)]
    return [f"{transfer_tag(rep)}-L{i}" for i in range(workload.layers)]


# --------------------------------------------------------------------------- payloads


def allocate(nbytes: int) -> np.ndarray:
    """A zeroed, already faulted-in byte buffer (page faults stay out of timed windows)."""
    buf = np.empty(nbytes, dtype=np.uint8)
    buf.fill(0)
    return buf


def payload(workload: Workload, rep: int) -> np.ndarray:
    """Source content of rep ``rep``: random bytes seeded by (seed, rep), so every block and
    every rep differ and data left from an earlier rep cannot pass verification."""
    rng = np.random.default_rng((workload.seed, rep))
    return np.frombuffer(rng.bytes(workload.total_bytes), dtype=np.uint8)


def fill_source(src: np.ndarray, workload: Workload, rep: int) -> None:
    src[:] = payload(workload, rep)


def poison(dst: np.ndarray) -> None:
    dst.fill(POISON_BYTE)


def count_bad_blocks(dst: np.ndarray, workload: Workload, rep: int, perm: np.ndarray) -> int:
    """Number of destination blocks that differ from what rep ``rep`` must have written."""
    expected = payload(workload, rep).reshape(workload.blocks, workload.block_bytes)
    landed = dst.reshape(workload.blocks, workload.block_bytes)[perm]
    if np.array_equal(landed, expected):
        return 0
    return int(np.count_nonzero((landed != expected).any(axis=1)))


# --------------------------------------------------------------------------- clocks


def now() -> float:
    """CLOCK_MONOTONIC seconds: one clock for every process on this host."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and the seconds it took (a side's ``register_s``)."""
    t0 = now()
    out = fn(*args, **kwargs)
    return out, now() - t0


def cpu_seconds() -> float:
    """user + sys seconds of this process, all its threads (progress threads included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def poll_until(done: Callable[[], bool], deadline: float, busy: bool, what: str) -> None:
    """Call ``done`` until it returns True; TimeoutError past ``deadline`` (CLOCK_MONOTONIC)."""
    while not done():
        if now() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        if busy:
            os.sched_yield()  # spin, but let a progress thread sharing the core run
        else:
            time.sleep(POLL_SLEEP_S)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RepResult:
    latency_s: float  # first batch posted -> decode side has every byte (notified / read done)
    initiator_complete_s: float  # first batch posted -> initiator sees all its batches complete
    last_post_to_done_s: float  # last batch posted -> decode side has every byte
    post_span_s: float  # first batch posted -> last batch posted (the pacing, streamed)
    cpu_initiator_s: float
    cpu_target_s: float
    bad_blocks: int


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(
    system: str,
    workload: Workload,
    results: list[RepResult],
    versions: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON record of ``results`` (every rep run, the ``workload.warmup`` warm-up reps first).
    Raises VerificationError, rather than report an unverified number, if any rep (warm-up ones
    included) left a wrong block."""
    bad = {i: r.bad_blocks for i, r in enumerate(results) if r.bad_blocks}
    reps = results[workload.warmup :]
    if bad or not reps:
        raise VerificationError(
            f"{system} {workload.label}: wrong blocks after reps {bad} "
            f"(rep index: wrong block count; the first {workload.warmup} are warm-up)"
        )
    lat = [r.latency_s for r in reps]
    tail = [r.last_post_to_done_s for r in reps]
    gb = workload.total_bytes / GB
    record: dict[str, Any] = {
        "system": system,
        "workload": workload.label,
        "block_bytes": workload.block_bytes,
        "blocks": workload.blocks,
        "pattern": workload.pattern,
        "op": workload.op,
        "mode": workload.mode,
        "layers": workload.layers,
        "layer_delay_s": workload.layer_delay_s,
        "reps": len(reps),
        "initiator_busy": workload.initiator_busy,
        "busy_poll": workload.busy_poll,
        "sweep": workload.sweep,
        "gbps_p50": statistics.median(gb / t for t in lat),
        "gbps_all": [gb / t for t in lat],
        "latency_s_p50": percentile(lat, 50),
        "latency_s_p99": percentile(lat, 99),
        "last_post_to_done_s_p50": percentile(tail, 50),
        "last_post_to_done_s_p99": percentile(tail, 99),
        "post_span_s_p50": percentile([r.post_span_s for r in reps], 50),
        "initiator_complete_s_p50": percentile([r.initiator_complete_s for r in reps], 50),
        "cpu_s_per_gb_initiator": sum(r.cpu_initiator_s for r in reps) / (gb * len(reps)),
        "cpu_s_per_gb_target": sum(r.cpu_target_s for r in reps) / (gb * len(reps)),
        "verified": True,
        "verified_on": "decode",
        "versions": versions,
    }
    if workload.blocks == 1:
        record["latency_us_p50"] = record["latency_s_p50"] * 1e6
        record["latency_us_p99"] = record["latency_s_p99"] * 1e6
    record.update(extra or {})
    return record


def unsupported_record(system: str, workload: Workload, why: str,
                       network: str = "loopback") -> dict[str, Any]:
    """The record of a system that cannot run ``workload`` (shown as "n/a (why)")."""
    return {"system": system, "workload": workload.label, "block_bytes": workload.block_bytes,
            "blocks": workload.blocks, "pattern": workload.pattern, "op": workload.op,
            "mode": workload.mode, "layers": workload.layers,
            "layer_delay_s": workload.layer_delay_s, "network": network, "verified": False,
            "unsupported": why}


def base_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "kernel": platform.release(),
    }


def dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------- two processes


class Unsupported(Exception):
    """A peer library cannot run this workload (op, mode, network): the message says why."""


@dataclass(frozen=True)
class Place:
    """Where one side runs: the address it listens on / is reached at, its network interface,
    and its network namespace (None: this one)."""

    host: str = "127.0.0.1"
    device: str = "lo"
    netns: str | None = None


LOOPBACK = Place()


@dataclass(frozen=True)
class PeerSpec:
    """What a child needs: the peer module, the workload, env to set before importing it,
    peer-specific options (plain picklable values), and where each side runs."""

    module: str
    workload: Workload
    env: dict[str, str]
    options: dict[str, Any]
    decode: Place = LOOPBACK
    prefill: Place = LOOPBACK

    def place(self, role: str) -> Place:
        """The target is the decode side of a write and the prefill side of a read."""
        decode_role = "target" if self.workload.op == "write" else "initiator"
        return self.decode if role == decode_role else self.prefill

    @property
    def network(self) -> str:
        if self.decode.netns:
            return (f"veth {self.prefill.host} ({self.prefill.netns}) -> {self.decode.host} "
                    f"({self.decode.netns})")
        return "loopback"


def places(hosts: Any) -> dict[str, Place]:
    """decode= and prefill= Places of kvtransfer.testing.netns.TwoHosts ``hosts`` (None:
    both on loopback), for PeerSpec."""
    if hosts is None:
        return {}
    return {"decode": Place(hosts.decode_ip, hosts.decode_dev, hosts.decode_ns),
            "prefill": Place(hosts.prefill_ip, hosts.prefill_dev, hosts.prefill_ns)}


def run_pair(system: str, spec: PeerSpec, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``spec.workload`` between a spawned TARGET and a spawned INITIATOR; return the record.

    The initiator posts, the target's memory is the other end: for a write the target is the
    decode side (destination buffer), for a read the prefill side (source buffer).
    ``spec.module`` must define
      ``make_target(workload, buf, options)`` -> object with ``info()`` (picklable: how to reach
          it), ``wait(tags, deadline, busy)`` (write only: returns once every notification in
          ``tags`` arrived, raises TimeoutError past ``deadline``) and ``close()``;
      ``make_initiator(workload, buf, info, options)`` -> object with
          ``post(tag, lo, hi, deadline, busy)`` (one batch: source block i -> destination
          block perm[i] for i in [lo, hi); a write carries notification ``tag``, a read gets
          None) and ``complete(deadline, busy)`` (returns once every batch posted is complete
          locally), and ``close()``;
      both objects also have ``register_s``: the seconds their library took to register
      ``buf`` (harness.timed around the registration call alone);
      ``versions()`` -> dict of library versions.
    ``options`` also hold ``host`` and ``net_device``: the side's address and interface.
    Either maker may raise ``Unsupported`` for a workload its library cannot run.
    """
    load_before = os.getloadavg()[0]  # the record says how busy the (shared) host was
    # numpy's OpenBLAS starts a thread per core in every process, and those threads spin: 20% of
    # this 2-core host in the latency workload, for no BLAS call. The children inherit this.
    for var in BLAS_THREAD_VARS:
        os.environ.setdefault(var, "1")
    ctx = multiprocessing.get_context("spawn")
    procs, conns = {}, {}
    for role in ("target", "initiator"):
        parent_end, child_end = ctx.Pipe()
        procs[role] = ctx.Process(
            target=_child_main, args=(child_end, role, spec), name=f"{system}-{role}", daemon=True
        )
        conns[role] = parent_end
    try:
        for p in procs.values():
            p.start()
        _, info, versions, reg_target = _expect(conns["target"], "info", SETUP_TIMEOUT_S)
        conns["initiator"].send(("info", info))
        _, reg_initiator = _expect(conns["initiator"], "ready", SETUP_TIMEOUT_S)
        w = spec.workload
        results = [_one_rep(conns, w, rep) for rep in range(w.warmup + w.reps)]
        _close_children(conns)
    except BaseException:
        _stop(procs, grace_s=0.0)  # a child failed or hung: the other may be stuck in a wait
        raise
    _stop(procs, grace_s=SHUTDOWN_TIMEOUT_S)
    record = summarize(system, w, results, versions, extra)
    record["register_s_initiator"] = reg_initiator
    record["register_s_target"] = reg_target
    record["network"] = spec.network
    record["netns"] = spec.decode.netns is not None
    record["warmup_verified"] = w.warmup
    record["loadavg_1min_before_after"] = [load_before, os.getloadavg()[0]]
    return record


def _one_rep(conns: dict, workload: Workload, rep: int) -> RepResult:
    timeout = workload.rep_timeout_s()
    src_side, dst_side = (("initiator", "target") if workload.op == "write"
                          else ("target", "initiator"))
    conns[src_side].send(("prep", rep))
    _expect(conns[src_side], "prepped", timeout)
    conns[dst_side].send(("arm", rep))
    _expect(conns[dst_side], "armed", timeout)
    conns["initiator"].send(("go", rep))
    _, t_post, t_last, t_done, cpu_i, bad_i = _expect(conns["initiator"], "sent", timeout)
    if workload.op == "write":
        _, t_seen, cpu_t, bad = _expect(conns["target"], "seen", timeout)
    else:  # the initiator is the decode side: its read completing is the end
        conns["target"].send(("cpu", rep))
        _, cpu_t = _expect(conns["target"], "cpu", timeout)
        t_seen, bad = t_done, bad_i
    return RepResult(t_seen - t_post, t_done - t_post, t_seen - t_last, t_last - t_post,
                     cpu_i, cpu_t, bad)


def _expect(conn, kind: str, timeout: float) -> tuple:
    if not conn.poll(timeout):
        raise TimeoutError(f"no '{kind}' from child within {timeout:.0f} s")
    try:
        msg = conn.recv()
    except EOFError:
        raise PeerError(f"child exited (crashed?) while '{kind}' was awaited") from None
    if msg[0] == "error":
        raise PeerError(msg[1])
    if msg[0] == "unsupported":
        raise Unsupported(msg[1])
    if msg[0] != kind:
        raise PeerError(f"expected '{kind}' from child, got {msg[0]!r}")
    return msg


def _close_children(conns: dict) -> None:
    for conn in conns.values():
        conn.send(("close",))
        _expect(conn, "closed", SHUTDOWN_TIMEOUT_S)


def _stop(procs: dict, grace_s: float) -> None:
    """Join the children, killing any still alive after ``grace_s``."""
    started = [p for p in procs.values() if p.pid is not None]
    deadline = now() + grace_s
    for p in started:
        p.join(max(0.0, deadline - now()))
    for p in started:
        if p.is_alive():
            p.kill()
            p.join(5.0)


def _child_main(conn, role: str, spec: PeerSpec) -> None:
    place = spec.place(role)
    try:
        if place.netns:  # before any socket or thread: both stay in the namespace they start in
            from kvtransfer.testing.netns import enter

            enter(place.netns)
        os.environ.update(spec.env)  # before the library is imported and reads it
        peer = importlib.import_module(spec.module)
        _child_loop(conn, peer, spec, role, place)
    except Unsupported as e:
        conn.send(("unsupported", str(e)))
    except BaseException:
        conn.send(("error", f"{role}: {traceback.format_exc()}"))
        raise


def next_command(conn, busy: bool = False) -> tuple:
    """Next command from the parent; a silent or vanished parent ends the child. ``busy`` polls
    for it without sleeping (Workload.initiator_busy)."""
    limit = SETUP_TIMEOUT_S + 600
    if busy:
        give_up = now() + limit
        while not conn.poll(0):
            if now() > give_up:
                raise TimeoutError("parent sent nothing for too long")
        return conn.recv()
    if not conn.poll(limit):
        raise TimeoutError("parent sent nothing for too long")
    return conn.recv()


def _child_loop(conn, peer, spec: PeerSpec, role: str, place: Place) -> None:
    """One side of every rep. "prep" fills the source, "arm" poisons the destination, "go"
    (initiator) posts the batches; the decode side verifies after its end of the rep."""
    w = spec.workload
    options = {**spec.options, "host": place.host, "net_device": place.device}
    buf = allocate(w.total_bytes)
    perm = block_permutation(w)
    if role == "target":
        side = peer.make_target(w, buf, options)
        conn.send(("info", side.info(), {**base_versions(), **peer.versions()},
                   side.register_s))
    else:
        _, info = next_command(conn)
        side = peer.make_initiator(w, buf, info, options)
        conn.send(("ready", side.register_s))
    cpu0 = cpu_seconds()
    busy = role == "initiator" and w.initiator_busy
    while (msg := next_command(conn, busy))[0] != "close":
        kind, rep = msg
        deadline = now() + w.rep_timeout_s()
        if kind == "prep":
            fill_source(buf, w, rep)
            cpu0 = cpu_seconds()
            conn.send(("prepped",))
        elif kind == "arm":
            poison(buf)
            cpu0 = cpu_seconds()
            conn.send(("armed",))
            if role == "target":  # the decode side of a write: wait for it, then verify
                side.wait(layer_tags(w, rep), deadline, w.busy_poll)
                t_seen = now()
                cpu = cpu_seconds() - cpu0
                conn.send(("seen", t_seen, cpu, count_bad_blocks(buf, w, rep, perm)))
        elif kind == "go":
            t_post, t_last, t_done, cpu = _post_all(side, w, rep, deadline)
            bad = count_bad_blocks(buf, w, rep, perm) if w.op == "read" else 0
            conn.send(("sent", t_post, t_last, t_done, cpu, bad))
        elif kind == "cpu":
            conn.send(("cpu", cpu_seconds() - cpu0))
    side.close()
    conn.send(("closed",))


def _post_all(side, w: Workload, rep: int, deadline: float) -> tuple[float, float, float, float]:
    """Posts every batch of rep ``rep`` (one per layer when streamed, ``layer_delay_s`` apart)
    and waits until they are complete locally: (first post, last post, complete, CPU s)."""
    tags = layer_tags(w, rep) if w.op == "write" else [None] * w.layers
    batches = list(enumerate(zip(w.layer_bounds(), tags, strict=True)))  # not on the clock
    cpu0 = cpu_seconds()
    t_post = t_last = now()
    for i, ((lo, hi), tag) in batches:
        if i and w.layer_delay_s:
            time.sleep(w.layer_delay_s)  # the next layer's compute; sleeping, not spinning
        t_last = now()
        side.post(tag, lo, hi, deadline, w.busy_poll)
    side.complete(deadline, w.busy_poll)
    t_done = now()
    return t_post, t_last, t_done, cpu_seconds() - cpu0


# --------------------------------------------------------------------------- command line


def parse_args(variants: list[str], argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Loopback transfer benchmark of a peer library.")
    p.add_argument("--variant", choices=variants, default=variants[0])
    p.add_argument("--all-variants", action="store_true", help="run every variant in turn")
    p.add_argument(
        "--workload",
        choices=sorted(STANDARD_WORKLOADS),
        help="a standard workload (overrides the size options)",
    )
    p.add_argument("--suite", action="store_true", help="run every standard workload")
    p.add_argument("--latency", action="store_true", help="the 64 KiB small-message workload")
    p.add_argument("--block-bytes", type=int, default=65536)
    p.add_argument("--blocks", type=int, default=4096)
    p.add_argument("--pattern", choices=["random", "sequential"], default="random")
    p.add_argument("--reps", type=int, help="measured reps (default: 5, latency 200)")
    p.add_argument("--warmup", type=int, help="unreported, verified reps first")
    p.add_argument("--op", choices=OPS, default="write", help="write (push) or read (pull)")
    p.add_argument("--layers", type=int, default=1,
                   help="stream the request as this many per-layer batches")
    p.add_argument("--layer-delay-us", type=float, default=0.0,
                   help="streamed: pause between layers (the layer's compute)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="peer-specific option (VALUE read as JSON when it parses)",
    )
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    return p.parse_args(argv)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option wants KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def workloads_from_args(args: argparse.Namespace) -> list[Workload]:
    if args.suite:
        chosen = list(STANDARD_WORKLOADS.values())
    elif args.workload:
        chosen = [STANDARD_WORKLOADS[args.workload]]
    elif args.latency:
        chosen = [latency_workload()]
    else:
        chosen = [Workload(args.block_bytes, args.blocks, args.pattern)]
    overrides = {k: v for k, v in (("reps", args.reps), ("warmup", args.warmup)) if v is not None}
    overrides["op"] = args.op
    if args.layers > 1:
        overrides.update(mode="streamed", layers=args.layers,
                         layer_delay_s=args.layer_delay_us * 1e-6)
    return [dataclasses.replace(w, **overrides) for w in chosen]


def format_record(rec: dict[str, Any]) -> str:
    if "unsupported" in rec:
        return f"{rec['system']:<22} {rec['workload']:<22} n/a ({rec['unsupported']})"
    if "error" in rec:
        return f"{rec['system']:<22} {rec['workload']:<22} FAILED: {rec['error']}"
    head = f"{rec['system']:<22} {rec['workload']:<22}"
    cpu = f"cpu s/GB i={rec['cpu_s_per_gb_initiator']:.2f} t={rec['cpu_s_per_gb_target']:.2f}"
    if "latency_us_p50" in rec:
        return (
            f"{head} p50 {rec['latency_us_p50']:7.1f} us  p99 {rec['latency_us_p99']:7.1f} us"
            f"  (verified x{rec['reps']})"
        )
    return (
        f"{head} {rec['gbps_p50']:6.2f} GB/s p50  latency p50 {rec['latency_s_p50'] * 1e3:7.1f}"
        f" ms  {cpu}  (verified x{rec['reps']})"
    )


def cli(
    run: Callable[..., dict[str, Any]], variants: list[str], argv: list[str] | None = None
) -> int:
    """Command line shared by the peer runners: ``run(workload, variant=..., **options)``."""
    args = parse_args(variants, argv)
    options = parse_options(args.option)
    failed = 0
    for variant in variants if args.all_variants else [args.variant]:
        for workload in workloads_from_args(args):
            try:
                rec = run(workload, variant=variant, **options)
            except Unsupported as exc:
                rec = unsupported_record(variant, workload, str(exc))
            except (PeerError, TimeoutError, VerificationError) as exc:
                failed += 1
                rec = {
                    "system": variant,
                    "workload": workload.label,
                    "verified": False,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            print(json.dumps(rec) if args.json else format_record(rec), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover - helpers only
    sys.exit("run kvtransfer.bench.peers.nixl or kvtransfer.bench.peers.mooncake")

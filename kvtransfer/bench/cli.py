"""kvtransfer bench — prefill and decode as two processes (on loopback, or in two network
namespaces joined by a veth pair), every byte verified on the decode side, kvtransfer and its
peers (NIXL, Mooncake) side by side in one run, with the machine's physical limits (iperf3,
memcpy) measured in the same run.

    kvtransfer bench                                   # the standard workloads, kvtransfer tcp
    kvtransfer bench --peers nixl,mooncake --limits    # ... and the peers and limits
    kvtransfer bench --sweep --plot plots/             # block size 4 KiB -> 4 MiB, PNG charts
    kvtransfer bench --sweep-blocks --plot plots/      # 1 -> 4096 blocks of 64 KiB a request
    kvtransfer bench --model llama-3.1-8b --prompt-tokens 1024,8192,131072
    kvtransfer bench --transport tcp,fabric:shm --workloads 64KiBx4096 --json out.jsonl
    kvtransfer bench --op write,read --peers nixl      # push vs pull (decode reads, as vLLM)
    kvtransfer bench --stream --layers 32 --layer-delay-us 200   # layer by layer
    kvtransfer bench --netns                           # across a veth between two namespaces

Dimensions (every combination given is run):
  --op write    prefill writes into decode; timed from the post until decode is notified.
  --op read     decode reads from prefill (vLLM's NIXL connector pulls this way); timed from
                the post until the read completes on the decode side.
  --mode whole  one batch per request.
  --mode streamed (or --stream)  one batch per layer, each with its own notification (decode
                waits for all), the same block table in every layer. Layers are posted back to
                back, or --layer-delay-us apart to stand in for each layer's compute. Reported
                besides GB/s (over the whole window, pauses included): "last->done", from the
                last layer's post until decode has every byte, the part that adds to TTFT.
                Mooncake's batch_transfer_sync blocks per batch, so its layers go one at a time.
  --netns       prefill and decode in two network namespaces made (and removed) by the bench,
                joined by a veth pair (needs root and iproute2). This separates the network
                only: same-host paths (CMA, shared memory) still work between them.
Latency workloads (one 64 KiB write, 200 reps, both sides spinning on completion unless said):
  latency       the prefill process sleeps between reps, so every write is posted from a CPU
                that was idle (cold caches; on a VM the vCPU may have been descheduled).
  latency-busy  the prefill process polls for its next command instead, so it posts from a
                busy CPU, as a prefill worker does right after its forward pass.
  latency-sleeping  as latency, but the decode side sleeps until notified instead of spinning
                (kvtransfer: wait_notification without spin, as KVReceiver waits; the peers,
                which have no blocking wait, poll every 100 us).
A peer that cannot run a combination shows "n/a (why)". Any transport this build registers
(kvtransfer.transports.available()) is accepted by --transport; fabric takes :provider.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import platform
import re
import sys
import time
from typing import Any

from . import limits
from .harness import (
    LATENCY_WORKLOADS,
    MODES,
    OPS,
    STANDARD_WORKLOADS,
    Unsupported,
    Workload,
    unsupported_record,
)
from .models import MODELS, model_workload

SWEEP_BLOCKS = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
SWEEP_TOTAL = 256 << 20
SWEEP_BLOCK_COUNTS = [1, 4, 16, 64, 256, 1024, 4096]
# Small requests finish in microseconds: each point moves at least this much, in up to 200 reps.
SWEEP_BYTES_PER_POINT = 64 << 20
DEFAULT_LAYERS = 32
PEERS = {  # --peers name -> (module, variants)
    "nixl": ("kvtransfer.bench.peers.nixl", ["nixl-ucx-tcp", "nixl-ucx-default"]),
    "mooncake": ("kvtransfer.bench.peers.mooncake", ["mooncake-tcp"]),
    # No library: the latency rows' floor with the bench's own Python in it (small writes only).
    "bare-tcp": ("kvtransfer.bench.peers.bare_tcp", ["bare-tcp"]),
}
# Where both sides spin (the latency write), NIXL is also measured at its best on 2 cores: no
# progress thread, the spinning caller driving UCX (system name "<variant>-noprogthread"). Not
# for reads: without its progress thread NIXL's passive side serves no READ unless it polls.
BUSY_POLL_PEERS = {
    "nixl": [("nixl-ucx-tcp", {"progress_thread": False}),
             ("nixl-ucx-default", {"progress_thread": False})],
}
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_UNIT = "|".join(_UNITS)
_WORKLOAD = re.compile(rf"^(\d+(?:{_UNIT}))x(\d+)(?:-(random|sequential))?$")


def _counts(text: str) -> list[int]:
    """"0,16" -> [0, 16]: comma list of counts >= 0."""
    try:
        out = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give counts such as 0,16") from None
    if any(v < 0 for v in out):
        raise argparse.ArgumentTypeError(f"{text!r}: counts are >= 0")
    return out


def parse_size(text: str) -> int:
    """"64KiB" -> 65536 (B, KiB, MiB or GiB)."""
    m = re.fullmatch(rf"(\d+)({_UNIT})", text)
    if not m:
        raise ValueError(f"size {text!r}: give a number and B, KiB, MiB or GiB, e.g. 64KiB")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_workload(name: str, reps: int) -> Workload:
    """A standard workload by name, or "<size>x<blocks>[-random|-sequential]" (64KiBx4096)."""
    if name in STANDARD_WORKLOADS:
        w = STANDARD_WORKLOADS[name]
        return w if name in LATENCY_WORKLOADS else dataclasses.replace(w, reps=reps)
    m = _WORKLOAD.match(name)
    if not m:
        raise ValueError(f"unknown workload {name!r}: use one of {', '.join(STANDARD_WORKLOADS)} "
                         "or <size>x<blocks>[-random|-sequential], e.g. 64KiBx4096")
    size, blocks, pattern = m.groups()
    return Workload(parse_size(size), int(blocks), pattern or "random", reps=reps,
                    name=name if pattern else f"{name}-random")


def _base_workloads(args: argparse.Namespace) -> list[tuple[Workload, str, int]]:
    """(workload, scaling note, layers it streams in) before op and mode are applied."""
    out: list[tuple[Workload, str, int]] = []
    if args.sweep:
        for bs in SWEEP_BLOCKS:
            for pattern in args.patterns:
                out.append((Workload(bs, SWEEP_TOTAL // bs, pattern, reps=args.reps,
                                     sweep="block-size"), "", args.layers))
    if args.sweep_blocks:
        bs = parse_size(args.sweep_block_size)
        for n in SWEEP_BLOCK_COUNTS:
            reps = min(200, max(args.reps, SWEEP_BYTES_PER_POINT // (bs * n)))
            for pattern in args.patterns:
                name = f"{args.sweep_block_size}x{n}-{pattern}"
                out.append((Workload(bs, n, pattern, reps=reps, warmup=max(1, reps // 10),
                                     name=name, sweep="blocks"), "", min(args.layers, n)))
    if args.model:
        for tokens in args.prompt_tokens:
            w, note = model_workload(args.model, tokens, reps=args.reps)
            out.append((w, note, MODELS[args.model].layers))
    if not out:
        out = [(parse_workload(name, args.reps), "", args.layers) for name in args.workloads]
    return out


def _workloads(args: argparse.Namespace) -> list[tuple[Workload, str]]:
    """Every (workload, note) to run: each base workload in each op and mode asked for."""
    out = []
    for w, note, layers in _base_workloads(args):
        for op in args.op:
            for mode in args.mode:
                if mode == "whole":
                    out.append((dataclasses.replace(w, op=op), note))
                    continue
                if w.blocks == 1 and "whole" in args.mode:
                    continue  # one block is one layer: the whole run already measured it
                n = min(layers, w.blocks)
                if w.blocks % n:
                    raise ValueError(f"{w.label}: {w.blocks} blocks cannot be split into {n} "
                                     "equal layers; pick --layers dividing the block count")
                out.append((dataclasses.replace(w, op=op, mode="streamed", layers=n,
                                                layer_delay_s=args.layer_delay_us * 1e-6), note))
    return out


def _systems(args: argparse.Namespace, workload: Workload
             ) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, module, run kwargs) of every system to measure on ``workload``."""
    out = []
    for t in args.transport:
        name, _, provider = t.partition(":")
        for idle in args.idle_peers:
            label = f"kvtransfer-{t}" + (f"-{idle}idle" if idle else "")
            out.append((label, "kvtransfer.bench.kvtransfer_peer",
                        {"variant": label, "transport": name, "provider": provider or None,
                         "connections": args.connections, "idle_peers": idle}))
    for peer in args.peers:
        module, variants = PEERS[peer]
        out.extend((v, module, {"variant": v}) for v in variants)
        if workload.busy_poll and workload.op == "write":
            out.extend((f"{v}-noprogthread", module, {"variant": v, **opts})
                       for v, opts in BUSY_POLL_PEERS.get(peer, []))
    return out


def check_transports(names: list[str]) -> str | None:
    """Why one of ``names`` ("tcp", "fabric:shm", ...) cannot be used here, or None."""
    from kvtransfer.transports import available

    built = available()
    for t in names:
        name, _, provider = t.partition(":")
        if name != "auto" and name not in built:
            return (f"transport {name!r} is not registered in this build "
                    f"(registered: {', '.join(built)}; also 'auto')")
        if provider and name != "fabric":
            return f"{t!r}: only the fabric transport takes a provider (fabric:<provider>)"
    return None


def machine() -> dict[str, Any]:
    return {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "loadavg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _dims(workload: Workload, network: str) -> dict[str, Any]:
    return {"op": workload.op, "mode": workload.mode, "layers": workload.layers,
            "layer_delay_s": workload.layer_delay_s, "network": network,
            "netns": network != "loopback"}


def _run_one(system: str, module: str, workload: Workload, kwargs: dict[str, Any], hosts: Any
             ) -> dict[str, Any]:
    network = "loopback" if hosts is None else "veth between network namespaces"
    try:
        mod = importlib.import_module(module)
        if hosts is None:
            return mod.run(workload, **kwargs)
        return _counting_veth(hosts, lambda: mod.run(workload, hosts=hosts, **kwargs))
    except Unsupported as e:
        return {**unsupported_record(system, workload, str(e), network), **_dims(workload,
                                                                                  network)}
    except ImportError as e:
        return {"system": system, "workload": workload.label, **_dims(workload, network),
                "verified": False, "error": f"not installed here ({e})"}
    except Exception as e:  # noqa: BLE001 - one failed system must not stop the run
        return {"system": system, "workload": workload.label, **_dims(workload, network),
                "verified": False, "error": f"{type(e).__name__}: {e}"[:500]}


def _counting_veth(hosts: Any, run: Any) -> dict[str, Any]:
    """``run()``'s record plus the bytes the decode side's veth end received meanwhile (all
    reps, warm-up and set-up included): proof the traffic crossed the veth."""
    from kvtransfer.testing.netns import link_bytes

    before = link_bytes(hosts.decode_ns, hosts.decode_dev)
    rec = run()
    after = link_bytes(hosts.decode_ns, hosts.decode_dev)
    rec["veth_decode_rx_bytes"] = after["rx"] - before["rx"]
    rec["veth_decode_tx_bytes"] = after["tx"] - before["tx"]
    return rec


def _time(seconds: float, width: int) -> str:
    return (f"{seconds * 1e6:{width}.0f} us" if seconds < 0.01
            else f"{seconds * 1e3:{width}.1f} ms")


def format_table(records: list[dict[str, Any]]) -> str:
    """One block per workload (op and mode are part of its name): each system's verified
    figures and kvtransfer's ratio to it."""
    lines = []
    networks = sorted({r["network"] for r in records if r.get("network")})
    if networks:
        lines.append("network: " + "; ".join(networks))
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_workload.setdefault(r.get("workload", "limits"), []).append(r)
    for workload, recs in by_workload.items():
        ours = next((r for r in recs if r["system"].startswith("kvtransfer") and "gbps_p50" in r),
                    None)
        first = recs[0]
        done = "notified" if first.get("op", "write") == "write" else "read done"
        layers = first.get("layers", 1)
        dims = [first.get("op", "write"), first.get("mode", "whole")]
        dims += [f"{layers} layers"] if layers > 1 else []
        if first.get("layer_delay_s"):
            dims.append(f"{first['layer_delay_s'] * 1e6:g} us between layers")
        if first.get("runs", 1) > 1:
            dims.append(f"median of {first['runs']} runs")
        by_time = "latency_us_p50" in (ours or {})  # the latency row: ranked by time, not GB/s
        lines.append(f"\n{workload}  [{', '.join(dims)}]")
        lines.append(f"  {'system':<30} {'GB/s p50':>9} {'vs ours':>8} {done + ' p50':>14} "
                     f"{'p99':>10} {'last->done p50':>15} {'CPU s/GB init':>14} {'target':>7} "
                     f"{'register init':>14} {'target':>9}")
        for r in recs:
            if "unsupported" in r:
                lines.append(f"  {r['system']:<30} {'n/a':>9}  ({r['unsupported'][:90]})")
                continue
            if "error" in r:
                lines.append(f"  {r['system']:<30} {'-':>9}  {r['error'][:80]}")
                continue
            ratio = ""
            if ours and r is not ours:
                ratio = (f"{r['latency_s_p50'] / ours['latency_s_p50']:.2f}x" if by_time
                         else f"{ours['gbps_p50'] / r['gbps_p50']:.2f}x")
            tail = (_time(r["last_post_to_done_s_p50"], 10) if r.get("mode") == "streamed"
                    else "")
            lines.append(f"  {r['system']:<30} {r['gbps_p50']:9.2f} {ratio:>8} "
                         f"{_time(r['latency_s_p50'], 11):>14} {_time(r['latency_s_p99'], 7):>10} "
                         f"{tail:>15} {r['cpu_s_per_gb_initiator']:14.2f} "
                         f"{r['cpu_s_per_gb_target']:7.2f} "
                         f"{_time(r['register_s_initiator'], 11):>14} "
                         f"{_time(r['register_s_target'], 6):>9}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvtransfer bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--workloads", type=csv, default=["4MiBx64", "64KiBx4096", "4KiBx16384",
                                                      "latency"],
                    help=f"comma list of {', '.join(STANDARD_WORKLOADS)}, or "
                         "<size>x<blocks>[-random|-sequential] such as 16KiBx512")
    ap.add_argument("--sweep", action="store_true", help="block size 4 KiB -> 4 MiB, 256 MiB")
    ap.add_argument("--sweep-blocks", action="store_true",
                    help="blocks per request 1 -> 4096, of --sweep-block-size each")
    ap.add_argument("--sweep-block-size", default="64KiB",
                    help="block size of --sweep-blocks (e.g. 16KiB)")
    ap.add_argument("--patterns", type=csv, default=["random", "sequential"],
                    help="block tables for --sweep and --sweep-blocks")
    ap.add_argument("--model", choices=sorted(MODELS), help="model-shaped workload")
    ap.add_argument("--prompt-tokens", type=lambda s: [int(x) for x in csv(s)],
                    default=[1024, 8192, 32768, 131072])
    ap.add_argument("--op", type=csv, default=["write"],
                    help="comma list of write (prefill pushes) and read (decode pulls)")
    ap.add_argument("--mode", type=csv, default=["whole"],
                    help="comma list of whole (one batch) and streamed (one batch per layer)")
    ap.add_argument("--stream", action="store_true", help="same as --mode streamed")
    ap.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                    help="streamed: layers per request (a --model uses its own layer count)")
    ap.add_argument("--layer-delay-us", type=float, default=0.0,
                    help="streamed: pause before each layer after the first, standing in for "
                         "the layer's compute (default 0: back to back)")
    ap.add_argument("--netns", action="store_true",
                    help="prefill and decode in two network namespaces joined by a veth pair "
                         "(made and removed here; needs root and iproute2)")
    ap.add_argument("--transport", type=csv, default=["tcp"],
                    help="kvtransfer transports, any this build registers: tcp, fabric:shm, "
                         "fabric:tcp, ... (see kvtransfer doctor)")
    ap.add_argument("--connections", type=int, default=2, help="TCP connections per peer")
    ap.add_argument("--idle-peers", type=_counts, default=[0], metavar="N[,N...]",
                    help="kvtransfer only: also with N more prefill endpoints connected to the "
                         "decode side that send nothing, as a decode host's quiet peers (system "
                         "kvtransfer-<transport>-<N>idle); default 0")
    ap.add_argument("--peers", type=csv, default=[], help=f"comma list of {', '.join(PEERS)}")
    ap.add_argument("--limits", action="store_true",
                    help="also measure the machine: iperf3 and memcpy beside bandwidth rows, "
                         "and beside latency rows, in turns with them, one 64 KiB message over "
                         "bare loopback TCP sockets (the kernel's floor)")
    ap.add_argument("--reps", type=int, default=5, help="measured reps per workload (median)")
    ap.add_argument("--runs", type=int, default=1,
                    help="measure every system this many times, taking turns, and report each "
                         "one's median run (timings on a shared host drift between runs)")
    ap.add_argument("--json", metavar="FILE", help="append one JSON record per result")
    ap.add_argument("--plot", metavar="DIR", help="write PNG charts there (matplotlib)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.stream:
        args.mode = ["streamed"]
    for p in args.peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r} (known: {', '.join(PEERS)})")
    for values, known, flag in ((args.op, OPS, "--op"), (args.mode, MODES, "--mode")):
        bad = [v for v in values if v not in known]
        if bad or not values:
            ap.error(f"{flag}: {', '.join(bad) or 'nothing'} given; choose from "
                     f"{', '.join(known)}")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.layers <= 0 or args.layer_delay_us < 0:
        ap.error("--layers must be > 0 and --layer-delay-us >= 0")
    why = check_transports(args.transport)
    if why:
        ap.error(f"--transport: {why}")
    if args.netns:
        from kvtransfer.testing.netns import unavailable_reason

        why = unavailable_reason()
        if why:
            ap.error(f"--netns: {why}; run without --netns for loopback")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    _check_args(ap, args)
    try:
        workloads = _workloads(args)
    except ValueError as e:
        ap.error(str(e))
    with contextlib.ExitStack() as stack:
        hosts = None
        if args.netns:
            from kvtransfer.testing.netns import NetnsUnavailable, two_hosts

            try:
                hosts = stack.enter_context(two_hosts())
            except NetnsUnavailable as e:
                ap.error(f"--netns: {e}")
        records = _run_all(args, workloads, hosts)
    header = {"argv": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
              "machine": machine()}
    print(format_table([r for r in records if r.get("workload") != "limits"]))
    for r in records:
        if r.get("workload") == "limits":
            print(f"limit: {r['system']:<20} {limits.describe(r)}")
    for note in dict.fromkeys(f"{r['workload']}: {r['scaled']}" for r in records
                              if r.get("scaled")):
        print(f"note: {note}")
    if args.json:
        with open(args.json, "a") as f:
            for r in records:
                f.write(json.dumps({**header, **r}) + "\n")
    if args.plot:
        from .plots import write_plots
        for path in write_plots(records, args.plot):
            print(f"wrote {path}")
    return 1 if any("error" in r and r.get("workload") != "limits" for r in records) else 0


def _run_all(args: argparse.Namespace, workloads: list[tuple[Workload, str]],
             hosts: Any) -> list[dict[str, Any]]:
    # Round-robin over the systems, --runs times: drift on a shared host hits them all alike.
    # With --limits, each round of a latency row also measures its floor (bare sockets, the
    # sender idle or busy as the row's prefill), so that the floor drifts with the rows.
    # (workload, note, label, module, kw); module None: the row's floor.
    runs: list[tuple[Workload, str, str, str | None, dict[str, Any]]] = []
    for w, note in workloads:
        for _ in range(args.runs):
            if args.limits and w.name.startswith("latency"):
                runs.append((w, note, "floor", None, {}))
            runs.extend((w, note, label, module, kw) for label, module, kw in _systems(args, w))
    records: list[dict[str, Any]] = []
    probes: list[tuple[Any, dict[str, Any]]] = []
    if args.limits and not all(w.name.startswith("latency") for w, _ in workloads):
        # On the host's loopback, also with --netns: the bandwidth ceilings of this machine.
        probes = [(limits.iperf3_gbps, {"streams": 1}), (limits.iperf3_gbps, {"streams": 2}),
                  (limits.memcpy_gbps, {})]
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(runs) + len(probes), unit="run",
                   disable=args.no_progress, file=sys.stderr)
    except ImportError:
        bar = None
    for fn, kw in probes:
        if bar:
            bar.set_description(f"limit {fn.__name__}")
        records.append({**fn(**kw), "workload": "limits"})
        if bar:
            bar.update()
    for w, note, label, module, kw in runs:
        if bar:
            bar.set_description(f"{label} {w.label}")
        if module is None:
            records.append({**limits.tcp_oneway_us(w.block_bytes, busy=w.initiator_busy),
                            "workload": "limits"})
        else:
            rec = _run_one(label, module, w, kw, hosts)
            if note:
                rec["scaled"] = note
            records.append(rec)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return median_runs(records)


def _headline(rec: dict[str, Any]) -> float:
    """The figure a run is ranked by: time until notified for latency rows, else GB/s."""
    return rec["latency_s_p50"] if "latency_us_p50" in rec else rec.get("gbps_p50", 0.0)


def median_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (system, workload, op, mode, network): of several runs, the median one by
    its headline figure (so p99, CPU and the rest come from that same run), with every run's
    headline kept in ``run_headlines``. Failed runs count as failed: any error is kept."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        key = (r.get("system"), r.get("workload"), r.get("op"), r.get("mode"), r.get("network"))
        groups.setdefault(key, []).append(r)
    out = []
    for runs in groups.values():
        if len(runs) == 1:
            out.append(runs[0])
            continue
        bad = [r for r in runs if not r.get("verified") and r.get("workload") != "limits"]
        if bad:
            out.append(bad[0])
            continue
        ranked = sorted(runs, key=_headline)
        out.append({**ranked[(len(ranked) - 1) // 2], "runs": len(runs),
                    "run_headlines": [_headline(r) for r in runs]})
    return out

"""kvtransfer bench — prefill and decode as two processes, every byte verified on the decode
side, kvtransfer and its peers (NIXL, Mooncake) side by side in one run, with the machine's
physical limits (iperf3, memcpy) measured in the same run.

    kvtransfer bench                                   # the standard workloads, kvtransfer tcp
    kvtransfer bench --peers nixl,mooncake --limits    # ... and the peers and limits
    kvtransfer bench --sweep --plot plots/             # block size 4 KiB -> 4 MiB, PNG charts
    kvtransfer bench --model llama-3.1-8b --prompt-tokens 1024,8192,131072
    kvtransfer bench --transport tcp,fabric:shm --workloads 64KiBx4096 --json out.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from typing import Any

from . import limits
from .harness import STANDARD_WORKLOADS, Workload
from .models import MODELS, model_workload

SWEEP_BLOCKS = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
SWEEP_TOTAL = 256 << 20
PEERS = {  # --peers name -> (module, variants)
    "nixl": ("kvtransfer.bench.peers.nixl", ["nixl-ucx-tcp", "nixl-ucx-default"]),
    "mooncake": ("kvtransfer.bench.peers.mooncake", ["mooncake-tcp"]),
}


def _workloads(args: argparse.Namespace) -> list[tuple[Workload, str]]:
    out: list[tuple[Workload, str]] = []
    if args.sweep:
        for bs in SWEEP_BLOCKS:
            for pattern in args.patterns:
                out.append((Workload(bs, SWEEP_TOTAL // bs, pattern, reps=args.reps), ""))
    if args.model:
        for tokens in args.prompt_tokens:
            out.append(model_workload(args.model, tokens, reps=args.reps))
    if not out:
        for name in args.workloads:
            w = STANDARD_WORKLOADS[name]
            out.append((w if name == "latency" else dataclasses.replace(w, reps=args.reps), ""))
    return out


def _systems(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, module, run kwargs) of every system to measure."""
    out = []
    for t in args.transport:
        name, _, provider = t.partition(":")
        out.append((f"kvtransfer-{t}", "kvtransfer.bench.kvtransfer_peer",
                    {"variant": f"kvtransfer-{t}", "transport": name, "provider": provider or None,
                     "connections": args.connections}))
    for peer in args.peers:
        module, variants = PEERS[peer]
        out.extend((v, module, {"variant": v}) for v in variants)
    return out


def machine() -> dict[str, Any]:
    return {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "loadavg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _run_one(module: str, workload: Workload, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        mod = importlib.import_module(module)
        return mod.run(workload, **kwargs)
    except ImportError as e:
        return {"system": kwargs["variant"], "workload": workload.label, "verified": False,
                "error": f"not installed here ({e})"}
    except Exception as e:  # noqa: BLE001 - one failed system must not stop the run
        return {"system": kwargs["variant"], "workload": workload.label, "verified": False,
                "error": f"{type(e).__name__}: {e}"[:500]}


def format_table(records: list[dict[str, Any]]) -> str:
    """One block per workload: each system's verified figures and its ratio to kvtransfer."""
    lines = []
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_workload.setdefault(r.get("workload", "limits"), []).append(r)
    for workload, recs in by_workload.items():
        ours = next((r for r in recs if r["system"].startswith("kvtransfer") and "gbps_p50" in r),
                    None)
        lines.append(f"\n{workload}")
        lines.append(f"  {'system':<24} {'GB/s p50':>9} {'vs ours':>8} {'notified p50':>13} "
                     f"{'p99':>10} {'CPU s/GB init':>14} {'target':>7}")
        for r in recs:
            if "error" in r:
                lines.append(f"  {r['system']:<24} {'-':>9}  {r['error'][:80]}")
                continue
            ratio = (f"{ours['gbps_p50'] / r['gbps_p50']:.2f}x" if ours and r is not ours
                     else "")
            lat = (f"{r['latency_s_p50'] * 1e6:9.0f} us" if r['latency_s_p50'] < 0.01
                   else f"{r['latency_s_p50'] * 1e3:9.1f} ms")
            p99 = (f"{r['latency_s_p99'] * 1e6:7.0f} us" if r['latency_s_p99'] < 0.01
                   else f"{r['latency_s_p99'] * 1e3:7.1f} ms")
            lines.append(f"  {r['system']:<24} {r['gbps_p50']:9.2f} {ratio:>8} {lat:>13} "
                         f"{p99:>10} {r['cpu_s_per_gb_initiator']:14.2f} "
                         f"{r['cpu_s_per_gb_target']:7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtransfer bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--workloads", type=csv, default=["4MiBx64", "64KiBx4096", "4KiBx16384",
                                                      "latency"],
                    help=f"comma list of {', '.join(STANDARD_WORKLOADS)}")
    ap.add_argument("--sweep", action="store_true", help="block size 4 KiB -> 4 MiB, 256 MiB")
    ap.add_argument("--patterns", type=csv, default=["random", "sequential"],
                    help="block tables for --sweep")
    ap.add_argument("--model", choices=sorted(MODELS), help="model-shaped workload")
    ap.add_argument("--prompt-tokens", type=lambda s: [int(x) for x in csv(s)],
                    default=[1024, 8192, 32768, 131072])
    ap.add_argument("--transport", type=csv, default=["tcp"],
                    help="kvtransfer transports: tcp, fabric:shm, fabric:tcp, ...")
    ap.add_argument("--connections", type=int, default=2, help="TCP connections per peer")
    ap.add_argument("--peers", type=csv, default=[], help=f"comma list of {', '.join(PEERS)}")
    ap.add_argument("--limits", action="store_true", help="also measure iperf3 and memcpy")
    ap.add_argument("--reps", type=int, default=5, help="measured reps per workload (median)")
    ap.add_argument("--json", metavar="FILE", help="append one JSON record per result")
    ap.add_argument("--plot", metavar="DIR", help="write PNG charts there (matplotlib)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    for p in args.peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r} (known: {', '.join(PEERS)})")

    runs = [(w, note, label, module, kw) for w, note in _workloads(args)
            for label, module, kw in _systems(args)]
    header = {"argv": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
              "machine": machine()}
    records: list[dict[str, Any]] = []
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(runs) + (3 if args.limits else 0), unit="run",
                   disable=args.no_progress, file=sys.stderr)
    except ImportError:
        bar = None
    if args.limits:
        for fn, kw in ((limits.iperf3_gbps, {"streams": 1}), (limits.iperf3_gbps, {"streams": 2}),
                       (limits.memcpy_gbps, {})):
            if bar:
                bar.set_description(f"limit {fn.__name__}")
            records.append({**fn(**kw), "workload": "limits"})
            if bar:
                bar.update()
    for w, note, label, module, kw in runs:
        if bar:
            bar.set_description(f"{label} {w.label}")
        rec = _run_one(module, w, kw)
        if note:
            rec["scaled"] = note
        records.append(rec)
        if bar:
            bar.update()
    if bar:
        bar.close()
    print(format_table([r for r in records if r.get("workload") != "limits"]))
    for r in records:
        if r.get("workload") == "limits":
            text = f"{r['gbps_p50']:.2f} GB/s" if "gbps_p50" in r else r.get("error")
            print(f"limit: {r['system']:<20} {text}")
    for r in records:
        if r.get("scaled"):
            print(f"note: {r['workload']}: {r['scaled']}")
    if args.json:
        with open(args.json, "a") as f:
            for r in records:
                f.write(json.dumps({**header, **r}) + "\n")
    if args.plot:
        from .plots import write_plots
        for path in write_plots(records, args.plot):
            print(f"wrote {path}")
    return 1 if any("error" in r and r.get("workload") != "limits" for r in records) else 0

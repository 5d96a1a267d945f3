"""How fast each libfabric provider moves bytes on this machine, raw, next to kvtransfer's fabric
transport on the same provider (and the native TCP transport), in one run.

    .venv/bin/python benchmarks/fabric_limits.py [--quick] [--runs 3]
        [--providers "tcp;ofi_rxm,shm"] [--markdown bench-results/fabric_limits.md]

raw         libfabric's own ``fi_pingpong`` (package libfabric-bin): two processes on loopback,
            pinned to one core each (it spins), RDM endpoints, one message in flight;
            ``us/msg`` is half a round trip, ``MB/s`` the bytes it moved per second (one
            direction at a time).
kvtransfer  two processes, ``Endpoint(transport="fabric", provider=...)``:
            ``lat 4K``    one 4 KiB write and the target's acknowledgement, p50 (a full round
                          trip: compare with twice the raw half round trip);
            ``1 MiB x1``  1 MiB writes one at a time, each waited for (one in flight, as
                          fi_pingpong);
            ``stream``    256 MiB as one transfer of 1 MiB blocks, GB/s (best of the runs).
The same three workloads run over ``transport="tcp"``. Every figure is the median of --runs
runs, each provider's raw and kvtransfer runs interleaved so load drifts hit both alike; ratios
compare kvtransfer with its provider's raw figure from the same run. Prints a table, writes a
JSON record (with argv) to bench-results/ and, with --markdown, the table as markdown (the
"libfabric providers" section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import kvtransfer as kvt
from kvtransfer import transports

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_pingpong(provider: str, size: int, iters: int) -> dict:
    """fi_pingpong between two processes on loopback; {} when it cannot run."""
    exe = shutil.which("fi_pingpong")
    if not exe:
        return {"error": "fi_pingpong not installed (libfabric-bin)"}
    port = str(_free_port())
    dom = [] if provider == "shm" else ["-d", "lo"]
    args = [exe, "-p", provider, "-e", "rdm", *dom, "-S", str(size), "-I", str(iters)]
    # fi_pingpong spins on its CQ: two spinning processes sharing a core measure the scheduler
    # (seen here: 40 us to 3.9 ms half round trips on tcp). One core each, when there are two.
    pin = (lambda cpu: ["taskset", "-c", str(cpu)]) if shutil.which("taskset") and \
        (os.cpu_count() or 1) > 1 else (lambda cpu: [])
    server = subprocess.Popen([*pin(0), *args, "-B", port], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for attempt in range(3):  # the server needs a moment to listen on its control port
            time.sleep(0.5 * (attempt + 1))
            r = subprocess.run([*pin(1), *args, "-P", port, "127.0.0.1"], capture_output=True,
                               text=True, timeout=120)
            if r.returncode == 0 or server.poll() is not None:
                break
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    finally:
        server.kill()
        server.wait()
    lines = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("bytes")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr or r.stdout).strip()[-200:] or f"exit {r.returncode}"}
    f = lines[-1].split()
    # bytes #sent #ack total time MB/sec usec/xfer Mxfers/sec
    return {"mb_s": float(f[5]), "us_per_msg": float(f[6])}


def _target(conn, transport: str, provider: str | None, nbytes: int) -> None:
    with kvt.Endpoint("bench-target", transport=transport, provider=provider, timeout=60) as ep:
        buf = np.zeros(nbytes, np.uint8)
        r = ep.register(buf, remote_write=True)
        conn.send((ep.info(), r.id))
        conn.recv()


def ours(transport: str, provider: str | None, quick: bool) -> dict:
    """The three workloads against a target in another process."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    stream_bytes = (64 if quick else 256) * MiB
    proc = ctx.Process(target=_target, args=(child, transport, provider, stream_bytes),
                       daemon=True)
    proc.start()
    out: dict = {}
    try:
        info, rid = parent.recv()
        with kvt.Endpoint("bench-init", transport=transport, provider=provider, timeout=60) as ep:
            src = np.random.default_rng(0).integers(0, 256, stream_bytes, dtype=np.uint8)
            rs = ep.register(src)
            peer = ep.connect(info)
            lat = []
            for i in range(50 if quick else 300):
                t0 = time.perf_counter()
                ep.write(peer, rs, rid, [[0, 0, 4096]]).wait(10)
                if i >= 10:
                    lat.append(time.perf_counter() - t0)
            out["lat4k_us"] = float(np.median(lat) * 1e6)
            n = 20 if quick else 100
            t0 = time.perf_counter()
            for i in range(n):
                ep.write(peer, rs, rid, [[i % 64 * MiB, 0, MiB]]).wait(10)
            out["mib_x1_mb_s"] = n * MiB / (time.perf_counter() - t0) / 1e6
            blocks = stream_bytes // MiB
            idx = np.arange(blocks, dtype=np.int64) * MiB
            segs = np.stack([idx, idx, np.full(blocks, MiB, np.int64)], axis=1)
            best = 0.0
            for _ in range(2 if quick else 4):
                t0 = time.perf_counter()
                ep.write(peer, rs, rid, segs).wait(60)
                best = max(best, stream_bytes / (time.perf_counter() - t0) / 1e9)
            out["stream_gb_s"] = best
    except Exception as e:  # noqa: BLE001 - a provider that fails is reported, not fatal
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return out


def _median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return float(np.median(vals)) if vals else None


def _errors(runs: list[dict]) -> str | None:
    errs = sorted({r["error"] for r in runs if r.get("error")})
    return "; ".join(errs) or None


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b else "-"


def markdown(rows: list[dict], runs: int, cmd: str, when: str) -> str:
    """The BENCHMARKS.md section: one line per provider, raw next to kvtransfer, and ratios."""
    by = {r["system"]: r for r in rows}
    out = [f"`{cmd}` ({when}; medians of {runs} runs; {os.cpu_count()} cores shared with "
           "other work, so expect +-15% between runs: read the ratios, which come from the "
           "same runs)", "",
           "| provider | raw 4K half-RTT | raw 1 MiB, one in flight | kvtransfer 4K write+ack "
           "(full RTT) | kvtransfer 1 MiB x1 | kvtransfer stream (1 MiB blocks) | 1 MiB x1 vs raw "
           "| 4K RTT vs 2x raw half-RTT |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["system"].startswith("kvtransfer "):
            continue
        name = r["system"].removeprefix("kvtransfer ")
        raw = by.get(f"raw fi_pingpong {name.removeprefix('fabric:')}", {})
        rl, rb = raw.get("raw_lat4k_us"), raw.get("raw_mib_mb_s")
        out.append(
            f"| {name} | {_fmt(rl, '.1f')} us | {_fmt(rb, '.0f')} MB/s | "
            f"{_fmt(r.get('lat4k_us'), '.1f')} us | {_fmt(r.get('mib_x1_mb_s'), '.0f')} MB/s | "
            f"{_fmt(r.get('stream_gb_s'), '.2f')} GB/s | {_ratio(r.get('mib_x1_mb_s'), rb)} | "
            f"{_ratio(r.get('lat4k_us'), 2 * rl if isinstance(rl, float) else None)} |"
            + (f" ({r['error']})" if r.get("error") else ""))
    spread = []
    for r in rows:
        for key, unit in (("raw_mib_mb_s", "MB/s"), ("mib_x1_mb_s", "MB/s"),
                          ("stream_gb_s", "GB/s")):
            vals = [x[key] for x in r.get("runs", []) if isinstance(x.get(key), (int, float))]
            if len(vals) > 1:
                spread.append(f"{r['system']} {key.removesuffix('_mb_s').removesuffix('_gb_s')} "
                              f"{min(vals):.4g}-{max(vals):.4g} {unit}")
    if spread:
        out += ["", "Spread over the runs (min-max): " + "; ".join(spread) + "."]
    out += ["", "raw: libfabric's fi_pingpong (Debian libfabric-bin "
            f"{transports.probe().version}), two processes on loopback pinned to a core each "
            "(it spins; kvtransfer's processes are not pinned and block), one message in flight, "
            "no completion counting or notification; libfabric-bin has no fi_rma_bw here, so "
            "there is no raw streaming figure. kvtransfer: two processes, RMA writes with "
            "remote CQ data, every byte of the 1 MiB writes counted at the target."]
    return "\n".join(out)


OURS = ("lat4k_us", "mib_x1_mb_s", "stream_gb_s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--providers", default="tcp;ofi_rxm,udp;ofi_rxd,shm")
    ap.add_argument("--quick", action="store_true", help="fewer iterations, 64 MiB stream")
    ap.add_argument("--runs", type=int, default=3, help="runs per system; medians reported")
    ap.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    args = ap.parse_args(argv)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    have = transports.fabric_providers() if "fabric" in transports.available() else []
    rows = []
    for prov in args.providers.split(","):
        if prov not in have:
            rows.append({"system": f"kvtransfer fabric:{prov}", "error": "provider not available"})
            continue
        raw_runs, our_runs = [], []
        for _ in range(args.runs):
            lat = raw_pingpong(prov, 4096, 500 if args.quick else 5000)
            bw = raw_pingpong(prov, MiB, 50 if args.quick else 300)
            raw_runs.append({"raw_lat4k_us": lat.get("us_per_msg"), "raw_mib_mb_s": bw.get("mb_s"),
                             "error": lat.get("error") or bw.get("error")})
            our_runs.append(ours("fabric", prov, args.quick))
        rows.append({"system": f"raw fi_pingpong {prov}", "runs": raw_runs,
                     "raw_lat4k_us": _median(raw_runs, "raw_lat4k_us"),
                     "raw_mib_mb_s": _median(raw_runs, "raw_mib_mb_s"), "error": _errors(raw_runs)})
        rows.append({"system": f"kvtransfer fabric:{prov}", "runs": our_runs,
                     **{k: _median(our_runs, k) for k in OURS},
                     "error": _errors(our_runs)})
    tcp_runs = [ours("tcp", None, args.quick) for _ in range(args.runs)]
    rows.append({"system": "kvtransfer tcp", "runs": tcp_runs,
                 **{k: _median(tcp_runs, k) for k in OURS},
                 "error": _errors(tcp_runs)})

    print(f"\n{'system':<30} {'4K half-rtt':>11} {'4K write+ack':>12} {'1 MiB x1':>10} "
          f"{'stream':>10}")
    for r in rows:
        print(f"{r['system']:<30} {_fmt(r.get('raw_lat4k_us'), '9.1f') + ' us':>11} "
              f"{_fmt(r.get('lat4k_us'), '9.1f') + ' us':>12} "
              f"{_fmt(r.get('raw_mib_mb_s', r.get('mib_x1_mb_s')), '6.0f') + ' MB/s':>10} "
              f"{_fmt(r.get('stream_gb_s'), '5.2f') + ' GB/s':>10}"
              + (f"   ({r['error']})" if r.get("error") else ""))
    record = {"argv": [sys.executable, *sys.argv], "time": time.time(),
              "host": platform.node(), "cpus": os.cpu_count(),
              "libfabric": transports.probe().version, "rows": rows}
    OUT.mkdir(exist_ok=True)
    path = OUT / f"fabric_limits-{int(time.time())}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"\nrecord: {path.relative_to(ROOT)}")
    if args.markdown:
        cmd = " ".join(["python benchmarks/fabric_limits.py", *(argv if argv is not None
                                                                 else sys.argv[1:])])
        args.markdown.write_text(markdown(rows, args.runs, cmd, when) + "\n")
        print(f"markdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

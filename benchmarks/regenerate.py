"""Regenerates BENCHMARKS.md in one command (`make bench`): transfers of kvtransfer and its
peers side by side with the machine's limits, sweeps of block size and of blocks per request
with charts, push vs pull and whole vs layer-streamed, the same across two network namespaces
(when run as root), model-shaped workloads, the pytest-benchmark micro suite, and (where
installed) vLLM time-to-first-token.

    python benchmarks/regenerate.py [--quick] [--skip-peers] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results"
PY = sys.executable


def run(cmd: list[str], **kw) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kw).returncode


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def transfer_table(recs: list[dict]) -> str:
    rows = [r for r in recs if r.get("workload") != "limits"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    cell = {(r["workload"], r["system"]): r for r in rows}
    out = ["| workload | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for w in workloads:
        vals = []
        for s in systems:
            r = cell.get((w, s))
            if r is None or "gbps_p50" not in r:
                vals.append("failed" if r else "")
            elif r["blocks"] == 1:
                p50, p99 = r["latency_s_p50"] * 1e6, r["latency_s_p99"] * 1e6
                runs = [x * 1e6 for x in r.get("run_headlines", [])]
                spread = f"; runs {min(runs):.0f}–{max(runs):.0f}" if runs else ""
                vals.append(f"{p50:.0f} µs (p99 {p99:.0f}{spread})")
            elif r.get("mode") == "streamed":
                tail = r["last_post_to_done_s_p50"] * 1e6
                vals.append(f"{r['gbps_p50']:.2f} GB/s, last layer → done {tail:.0f} µs")
            else:
                runs = r.get("run_headlines", [])
                spread = f" (runs {min(runs):.2f}–{max(runs):.2f})" if runs else ""
                vals.append(f"{r['gbps_p50']:.2f} GB/s{spread}")
        out.append(f"| {w} | " + " | ".join(vals) + " |")
    return "\n".join(out)


# (label, our system, the peers it is held against): the two comparisons.
# On the latency row NIXL is also measured without its progress thread (its best here).
COMPARISONS = [
    ("kvtransfer tcp", "kvtransfer-tcp", "best TCP peer",
     ("nixl-ucx-tcp", "nixl-ucx-tcp-noprogthread", "mooncake-tcp")),
    ("kvtransfer cma", "kvtransfer-cma", "NIXL same-host",
     ("nixl-ucx-default", "nixl-ucx-default-noprogthread")),
]
# A 5-run median still moved by 20 µs between runs of one system (host noise comes in spells
# of seconds): 9 runs, in turns with the peers.
LATENCY_RUNS = 9
# The latency rows again with this many quiet prefill peers connected to the decode side, as a
# decode host has (kvtransfer only: `kvtransfer bench --idle-peers`).
IDLE_PEERS = 16


def _ratio(w: str, here: list[dict], label: str, ours_name: str, peers_label: str,
           peer_names: tuple[str, ...]) -> str | None:
    ours = next((r for r in here if r["system"] == ours_name), None)
    peers = [r for r in here if r["system"] in peer_names]
    if not ours or not peers:
        return None
    if ours["blocks"] == 1:
        best = min(peers, key=lambda r: r["latency_s_p50"])
        return (f"- {w}: {label} {ours['latency_s_p50'] * 1e6:.0f} µs vs {peers_label} "
                f"({best['system']}) {best['latency_s_p50'] * 1e6:.0f} µs "
                f"(**{best['latency_s_p50'] / ours['latency_s_p50']:.2f}x** faster)")
    best = max(peers, key=lambda r: r["gbps_p50"])
    return (f"- {w}: {label} / {peers_label} ({best['system']}) = "
            f"**{ours['gbps_p50'] / best['gbps_p50']:.2f}x**")


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def ratio_lines(recs: list[dict]) -> str:
    rows = [r for r in recs if "gbps_p50" in r and r.get("workload") != "limits"]
    lines = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        here = [r for r in rows if r["workload"] == w]
        found = [line for c in COMPARISONS if (line := _ratio(w, here, *c))]
        lines.extend(found)
        if found and here[0]["blocks"] > 1:
            cpu = [f"{r['system']} {r['cpu_s_per_gb_initiator']:.2f}/{r['cpu_s_per_gb_target']:.2f}"
                   for r in here]
            lines.append(f"  CPU s/GB initiator/target: {', '.join(cpu)}")
            reg = [f"{r['system']} {_us(r['register_s_initiator'])}/{_us(r['register_s_target'])}"
                   for r in here if "register_s_target" in r]
            if reg:
                size = here[0]["block_bytes"] * here[0]["blocks"]
                size_text = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
                lines.append(f"  registering the {size_text} buffer, initiator/target: "
                             f"{', '.join(reg)}")
    return "\n".join(lines)


def limits_lines(recs: list[dict], latency: bool = False) -> str:
    """The limits measured in a run: its ceilings (GB/s), or with ``latency`` its floors (µs)."""
    from kvtransfer.bench.limits import describe

    return "\n".join(f"- {r['system']}: {describe(r)}" for r in recs
                     if r.get("workload") == "limits" and ("latency_us_p50" in r) == latency)


def micro_table(path: Path) -> str:
    data = json.loads(path.read_text())
    out = ["| benchmark | median | ops/s |", "|---|---|---|"]
    for b in data["benchmarks"]:
        med = b["stats"]["median"]
        unit = f"{med * 1e6:.1f} µs" if med < 1e-3 else f"{med * 1e3:.2f} ms"
        out.append(f"| {b['fullname'].split('::')[-1]} ({Path(b['fullname'].split('::')[0]).stem})"
                   f" | {unit} | {b['stats']['ops']:.0f} |")
    return "\n".join(out)


FABRIC_HEADING = "## libfabric providers: kvtransfer next to each provider's own limit"


def fabric_section(quick: bool) -> str:
    """Runs benchmarks/fabric_limits.py (about 3 minutes) and returns its BENCHMARKS.md section."""
    out = OUT / "fabric_limits.md"
    cmd = [PY, "benchmarks/fabric_limits.py", "--runs", "3",
           "--markdown", str(out.relative_to(ROOT))]
    if quick:
        cmd.append("--quick")
    out.unlink(missing_ok=True)
    run(cmd)
    body = out.read_text().strip() if out.exists() else "(fabric_limits.py produced nothing)"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{FABRIC_HEADING}\n\nOn {platform.node() or 'this machine'} ({os.cpu_count()} cores, "
            f"Linux {platform.release()}; load average after the run {load}; the machine is "
            f"shared with other work).\n\n{body}\n")


LATENCY_HEADING = "## Latency: one 64 KiB write -> target notified"


def idle_peer_lines(recs: list[dict]) -> str:
    """Each latency row's kvtransfer time with IDLE_PEERS quiet peers against its time alone."""
    rows = {(r["workload"], r["system"]): r for r in recs if "latency_s_p50" in r
            and r.get("workload") != "limits"}
    lines = []
    for (w, system), alone in rows.items():
        crowded = rows.get((w, f"{system}-{IDLE_PEERS}idle"))
        if crowded:
            lines.append(f"- {w}: {system} {alone['latency_s_p50'] * 1e6:.0f} µs alone, "
                         f"{crowded['latency_s_p50'] * 1e6:.0f} µs with {IDLE_PEERS} idle peers "
                         f"({crowded['latency_s_p50'] / alone['latency_s_p50']:.2f}x; p99 "
                         f"{alone['latency_s_p99'] * 1e6:.0f} -> "
                         f"{crowded['latency_s_p99'] * 1e6:.0f} µs)")
    return "\n".join(lines)


def latency_section(bench: list[str], peer_names: list[str], quick: bool) -> str:
    """Runs the latency rows beside the peers and returns their BENCHMARKS.md section."""
    out = OUT / "latency.jsonl"
    out.unlink(missing_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    # The latency row drifts most between runs (where each process lands on 2 cores): every
    # system is measured LATENCY_RUNS times, taking turns, and its median run is reported.
    # bare-tcp: the same harness over bare sockets, so a row minus it is what the library adds.
    peers = ["--peers", ",".join([*peer_names, "bare-tcp"])]
    cmd = [*bench, *peers, "--limits", "--workloads", "latency,latency-busy,latency-sleeping",
           "--transport", "tcp,cma", "--idle-peers", f"0,{IDLE_PEERS}",
           "--runs", "3" if quick else str(LATENCY_RUNS), "--json", str(out)]
    run(cmd)
    recs = records(out) if out.exists() else []
    return "\n".join([
        LATENCY_HEADING, "",
        f"`{' '.join(['kvtransfer bench', *cmd[3:]])}` (run {started})", "",
        "In the first two rows the decode side spins: it waits with "
        "`wait_notification(..., spin=)` (it then reads TCP frames and cma records itself, "
        "docs/transports.md); the peers spin on their completion calls, and NIXL is also run "
        "without its progress thread (`-noprogthread`), its best here. In "
        "`latency-64KiB-sleeping-decode` it sleeps until notified, as a serving framework's "
        "receiver does: `wait_notification` without spin, which sleeps in `poll()` on the "
        "connections itself; the peers, which have no blocking wait, poll every 100 µs. Every "
        "system was measured in turns; the table shows each one's median run. In "
        "`latency-64KiB` the prefill process sleeps between reps, so each write starts on a CPU "
        "that was idle; in `latency-64KiB-busy-prefill` it polls for its next command instead, "
        "so it posts from a busy CPU, as a prefill worker right after its forward pass.", "",
        transfer_table(recs), "",
        "`bare-tcp` is no library: the same harness over one bare TCP socket (the prefill side "
        "`sendall`s the block, the decode side `recv_into`s it straight into place, spinning or "
        "blocking as the row's decode side), so a row's time minus bare-tcp's is what that "
        "library adds.", "",
        f"`-{IDLE_PEERS}idle` is kvtransfer with {IDLE_PEERS} more prefill endpoints connected "
        "to the decode side that send nothing (`--idle-peers`), as a decode host serving many "
        "prefill peers has at any moment; the peers are measured alone. Same runs:", "",
        idle_peer_lines(recs), "",
        "The kernel's floor, measured in turns with the rows (once per round of each row, its "
        "median run shown): one 64 KiB message between two threads over loopback TCP, bare "
        "sockets, no library and no Python (`kvtransfer._core.tcp_oneway_seconds`), the sender "
        "asleep for 1 ms before each (as the idle prefill) or spinning (as the busy one). Read "
        "the rows against it: on this shared VM it moves by 2x within an hour.",
        "",
        limits_lines(recs, latency=True), "",
        "Ratios (same runs):", "",
        ratio_lines(recs), "",
    ])


MODELS_HEADING = "## Model-shaped requests (one segment per layer, K/V and block of 16 tokens)"
MODEL_PROMPTS = "1024,131072"  # a short prompt, and the longest (scaled to fit, and said so)


def model_section(bench: list[str], peers: list[str]) -> str:
    """Runs every model preset beside the peers and returns its BENCHMARKS.md section."""
    from kvtransfer.bench.models import MODELS

    out = OUT / "models.jsonl"
    out.unlink(missing_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def cmd(model: str) -> list[str]:
        return [*bench, *peers, "--model", model, "--prompt-tokens", MODEL_PROMPTS,
                "--transport", "tcp,cma", "--json", str(out)]

    for model in sorted(MODELS):
        run(cmd(model))
    recs = records(out) if out.exists() else []
    return "\n".join([
        MODELS_HEADING, "",
        f"`{' '.join(['kvtransfer bench', *cmd('<preset>')[3:]])}` for each preset: "
        f"{', '.join(sorted(MODELS))} (run {started})", "",
        transfer_table(recs), "",
        ratio_lines(recs), "",
        "\n".join(f"- {r['workload']}: {r['scaled']}" for r in recs
                  if r.get("scaled") and r["system"] == "kvtransfer-tcp"), "",
    ])


NOTES = ROOT / "benchmarks" / "NOTES.md"


def notes_heading() -> str:
    """The heading BENCHMARKS.md's closing notes start with: NOTES.md's first line."""
    return NOTES.read_text().splitlines()[0]


def replace_section(heading: str, section: str) -> None:
    """Puts `section` in place of BENCHMARKS.md's section `heading` (or before the notes)."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    if heading in doc:
        head, rest = doc.split(heading, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
    else:
        marker = notes_heading()
        head, tail = (doc.split(marker, 1) if marker in doc else (doc + "\n", ""))
        tail = marker + tail if tail else ""
    path.write_text(head + section + ("\n" + tail if tail else ""))


def replace_notes() -> None:
    """Puts benchmarks/NOTES.md in place of the notes BENCHMARKS.md ends with."""
    path = ROOT / "BENCHMARKS.md"
    doc, notes = path.read_text(), NOTES.read_text()
    heading = notes_heading()
    if heading not in doc:
        raise SystemExit(f"BENCHMARKS.md has no {heading!r} to replace: run make bench")
    path.write_text(doc[:doc.index(heading)] + notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="3 reps, fewer workloads")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--only-fabric", action="store_true",
                    help="rerun only the libfabric providers section of BENCHMARKS.md")
    ap.add_argument("--only-latency", action="store_true",
                    help="rerun only the latency section of BENCHMARKS.md")
    ap.add_argument("--only-models", action="store_true",
                    help="rerun only the model-shaped section of BENCHMARKS.md")
    ap.add_argument("--only-notes", action="store_true",
                    help="copy benchmarks/NOTES.md into BENCHMARKS.md again, measuring nothing")
    args = ap.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    if args.only_notes:
        replace_notes()
        print("updated the notes at the end of BENCHMARKS.md")
        return 0
    if args.only_fabric:
        replace_section(FABRIC_HEADING, fabric_section(args.quick))
        print("updated the libfabric section of BENCHMARKS.md")
        return 0
    reps = "3" if args.quick else "5"
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    bench = [PY, "-m", "kvtransfer.bench", "--reps", reps]
    peer_names = [] if args.skip_peers else ["nixl", "mooncake"]
    peers = ["--peers", ",".join(peer_names)] if peer_names else []
    sys.path.insert(0, str(ROOT))  # the children run from ROOT; this process from benchmarks/
    if args.only_models:
        replace_section(MODELS_HEADING, model_section(bench, peers))
        print("updated the model-shaped section of BENCHMARKS.md")
        return 0
    if args.only_latency:
        replace_section(LATENCY_HEADING, latency_section(bench, peer_names, args.quick))
        print("updated the latency section of BENCHMARKS.md")
        return 0
    for f in OUT.glob("*.jsonl"):
        f.unlink()

    # The targets' table: each system five times, in turns, its median run shown.
    main_cmd = [*bench, *peers, "--limits", "--transport", "tcp,cma,fabric:shm",
                "--workloads", "4MiBx64,64KiBx4096,4KiBx16384",
                "--runs", "1" if args.quick else "5",
                "--json", str(OUT / "transfers.jsonl"), "--plot", "docs/bench"]
    run(main_cmd)
    latency = latency_section(bench, peer_names, args.quick)
    sweep_cmd = [*bench, "--sweep", "--patterns", "random", "--transport", "tcp,cma", *peers,
                 "--limits", "--json", str(OUT / "sweep.jsonl"), "--plot", "docs/bench"]
    run(sweep_cmd)
    # Requests of a few blocks take a millisecond or less: one run is at the mercy of a spell of
    # host noise, so three, in turns.
    blocks_cmd = [*bench, "--sweep-blocks", "--patterns", "random", "--transport", "tcp,cma",
                  *peers, "--runs", "1" if args.quick else "3",
                  "--json", str(OUT / "blocks.jsonl"), "--plot", "docs/bench"]
    run(blocks_cmd)
    modes_cmd = [*bench, *peers, "--workloads", "4MiBx64,64KiBx4096,latency", "--op",
                 "write,read", "--mode", "whole,streamed", "--layers", "32",
                 "--transport", "tcp,cma",
                 "--json", str(OUT / "modes.jsonl"), "--plot", "docs/bench/modes"]
    run(modes_cmd)
    # Back to back, "last layer -> done" is the whole transfer for a library whose posts return
    # at once; paced like a prefill computing its layers, it is what the transfer adds to TTFT.
    paced_cmd = [*bench, *peers, "--workloads", "64KiBx4096", "--stream", "--layers", "32",
                 "--layer-delay-us", "3000", "--transport", "tcp,cma",
                 "--json", str(OUT / "modes.jsonl")]
    run(paced_cmd)
    from kvtransfer.testing.netns import unavailable_reason

    netns_skipped = unavailable_reason()
    netns_cmd = [*bench, *peers, "--netns", "--workloads", "4MiBx64,64KiBx4096,latency", "--op",
                 "write,read", "--transport", "tcp", "--json", str(OUT / "netns.jsonl")]
    if not netns_skipped:
        run(netns_cmd)
    models = model_section(bench, peers)
    micro_cmd = [PY, "-m", "pytest", "-q", "benchmarks", "-p", "no:cacheprovider",
                 f"--benchmark-json={OUT / 'micro.json'}", "--benchmark-min-rounds=5"]
    run(micro_cmd)
    fabric = fabric_section(args.quick)
    ttft = ""
    if not args.skip_vllm and (ROOT / ".venv-vllm").exists():
        ttft_cmd = [PY, "benchmarks/vllm_ttft.py", "--out", str(OUT / "vllm_ttft.json")]
        print("+", " ".join(ttft_cmd), flush=True)
        proc = subprocess.run(ttft_cmd, cwd=ROOT, capture_output=True, text=True)
        lines = proc.stdout.splitlines()
        table = [ln for ln in lines if ln.startswith("|") or ln.startswith("(medians")]
        if table:
            ttft = f"`{' '.join(ttft_cmd[1:])}`\n\n" + "\n".join(table)

    t = records(OUT / "transfers.jsonl")
    machine = t[0]["machine"] if t else {}
    md = [
        "# Benchmarks",
        "",
        f"Regenerated by `make bench` (`python benchmarks/regenerate.py`) on {started}: "
        f"{machine.get('cpus')} cores, Linux {platform.release()}, Python "
        f"{platform.python_version()}; load average at start {machine.get('loadavg')}. "
        "Shared machines are noisy: every figure is the median of "
        f"{reps} byte-verified reps; where a command says `--runs N`, each system ran N times, "
        "in turns with the others, and its median run is shown (with the spread of its runs); "
        "systems are compared as ratios within one run.",
        "",
        "## Transfers: kvtransfer and its peers, same run, same verification",
        "",
        f"`{' '.join(['kvtransfer bench', *main_cmd[3:]])}`",
        "",
        "GB/s until the decode side was notified (write posted -> target notified), two processes "
        "on loopback; the latency row has its own section below.",
        "",
        transfer_table(t),
        "",
        "Ratios (same runs):",
        "",
        ratio_lines(t),
        "",
        "Limits measured in the same run:",
        "",
        limits_lines(t),
        "",
        latency,
        "## Block-size sweep (random block tables, 256 MiB)",
        "",
        f"`{' '.join(['kvtransfer bench', *sweep_cmd[3:]])}`",
        "",
        transfer_table(records(OUT / "sweep.jsonl")),
        "",
        "![bandwidth vs block size](docs/bench/bandwidth_vs_block_size.png)",
        "![latency CDF](docs/bench/latency_cdf.png)",
        "",
        "## Blocks per request (64 KiB blocks, random block tables)",
        "",
        f"`{' '.join(['kvtransfer bench', *blocks_cmd[3:]])}`",
        "",
        "From one block (a short prompt's layer) to 4096 (256 MiB); small requests get more reps "
        "(each point moves at least 64 MiB, up to 200 reps). Waits sleep here (no spinning), as a "
        "serving loop's would.",
        "",
        transfer_table(records(OUT / "blocks.jsonl")),
        "",
        ratio_lines(records(OUT / "blocks.jsonl")),
        "",
        "![bandwidth vs blocks per request](docs/bench/bandwidth_vs_blocks_per_request.png)",
        "",
        "## Push vs pull, whole vs layer-streamed",
        "",
        f"`{' '.join(['kvtransfer bench', *modes_cmd[3:]])}`",
        "",
        "write: prefill pushes, timed until decode is notified; read: decode pulls (as vLLM's "
        "NIXL connector does), timed until its reads complete. streamed: one batch per layer "
        "(32, back to back), each with its own notification; \"last layer → done\" is what the "
        "transfer adds after prefill posts its last layer. Verified on the decode side. "
        "The `+3000us` row paces the layers 3 ms apart, as a prefill computing them would "
        f"(`{' '.join(['kvtransfer bench', *paced_cmd[3:]])}`): its \"last layer → done\" is "
        "what the transfer adds to time-to-first-token.",
        "",
        transfer_table(records(OUT / "modes.jsonl")),
        "",
        "![streamed: last layer to done](docs/bench/modes/streamed_last_layer_to_done.png)",
        "",
        "## Two network namespaces joined by a veth pair",
        "",
        f"`{' '.join(['kvtransfer bench', *netns_cmd[3:]])}`",
        "",
        (f"(not run: {netns_skipped})" if netns_skipped else
         "Prefill and decode in namespaces made by the bench; only the network is separated "
         "(same-host paths such as CMA still work, see each record's veth byte count).\n\n"
         + transfer_table(records(OUT / "netns.jsonl"))),
        "",
        models,
        "## Micro benchmarks (pytest-benchmark)",
        "",
        f"`{' '.join(micro_cmd[1:])}`",
        "",
        micro_table(OUT / "micro.json") if (OUT / "micro.json").exists() else "(not run)",
        "",
    ]
    if ttft:
        md += ["## vLLM: decode time-to-first-token, kvtransfer pull vs recompute", "", ttft, ""]
    md += [fabric]
    if NOTES.exists():
        md += [NOTES.read_text()]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(md))
    print("wrote BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

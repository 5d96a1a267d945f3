"""PNG charts of a bench run: bandwidth against block size per system (and op, mode, network),
bandwidth against blocks per request (--sweep-blocks), the CDF of one-block latency (write ->
notified, read -> done), and, for layer-streamed runs, the time from the last layer's post until
the decode side has every byte."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def series_name(r: dict[str, Any]) -> str:
    """The system, plus the dimensions a reader must not confuse it across: op, mode, network."""
    dims = [r.get("op", "write")]
    if r.get("mode", "whole") == "streamed":
        delay = r.get("layer_delay_s") or 0.0
        dims.append(f"streamed {r.get('layers')}L" + (f" +{delay * 1e6:g}us" if delay else ""))
    if r.get("netns"):
        dims.append("netns")
    return f"{r['system']} ({', '.join(dims)})"


def _block_size_chart(plt: Any, ok: list[dict[str, Any]], records: list[dict[str, Any]],
                      out_dir: str) -> str:
    """GB/s against block size, one line per system and block table; the limits as lines."""
    series = sorted({series_name(r) for r in ok})

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in series:
        for pattern, style in (("random", "-o"), ("sequential", "--s")):
            pts = sorted((r["block_bytes"], r["gbps_p50"]) for r in ok
                         if series_name(r) == name and r.get("pattern") == pattern
                         and r["blocks"] > 1)
            if len(pts) > 1:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                        label=f"{name} {pattern}")
    limits = [r for r in records if r.get("workload") == "limits" and "gbps_p50" in r]
    for r in limits:
        ax.axhline(r["gbps_p50"], linestyle=":", color="grey")
        ax.text(4096, r["gbps_p50"], f" {r['system']}", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (bytes)")
    ax.set_ylabel("GB/s until the decode side has the bytes (p50, verified)")
    ax.set_title("Bandwidth vs block size")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run of one block size draws no line
        ax.legend(fontsize=7)
    path = os.path.join(out_dir, "bandwidth_vs_block_size.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _blocks_chart(plt: Any, records: list[dict[str, Any]], out_dir: str) -> str:
    """GB/s against blocks per request, one line per system and block table."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in sorted({series_name(r) for r in records}):
        for pattern, style in (("random", "-o"), ("sequential", "--s")):
            pts = sorted((r["blocks"], r["gbps_p50"]) for r in records
                         if series_name(r) == name and r.get("pattern") == pattern)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                        label=f"{name} {pattern}")
    sizes = sorted({r["block_bytes"] for r in records})
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"blocks per request (of {', '.join(f'{s >> 10} KiB' for s in sizes)})")
    ax.set_ylabel("GB/s until the decode side has the bytes (p50, verified)")
    ax.set_title("Bandwidth vs blocks per request")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    path = os.path.join(out_dir, "bandwidth_vs_blocks_per_request.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(records: list[dict[str, Any]], out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    ok = [r for r in records if "gbps_p50" in r and "block_bytes" in r]
    paths = []
    by_blocks = [r for r in ok if r.get("sweep") == "blocks"]
    ok = [r for r in ok if r.get("sweep") != "blocks"]
    if any(r["blocks"] > 1 for r in ok):
        paths.append(_block_size_chart(plt, ok, records, out_dir))
    if by_blocks:
        paths.append(_blocks_chart(plt, by_blocks, out_dir))

    single = [r for r in ok if r["blocks"] == 1 and r.get("gbps_all")]
    if single:
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in single:
            lat_us = np.sort(r["block_bytes"] / 1e9 / np.asarray(r["gbps_all"]) * 1e6)
            style = "-" if r.get("op", "write") == "write" else "--"
            ax.plot(lat_us, np.arange(1, len(lat_us) + 1) / len(lat_us), style,
                    label=series_name(r))
        ax.set_xscale("log")  # scheduler tails on a shared host run to tens of ms
        ax.set_xlabel("one 64 KiB block: write -> decode notified, or read -> done (µs)")
        ax.set_ylabel("fraction of transfers")
        ax.set_title("Latency CDF")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(os.path.join(out_dir, "latency_cdf.png"))
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)

    streamed = [r for r in ok if r.get("mode") == "streamed"]
    if streamed:
        fig, ax = plt.subplots(figsize=(8, 0.6 + 0.35 * len(streamed)))
        labels = [f"{series_name(r)} {r['workload'].split()[0]}" for r in streamed]
        tails = [r["last_post_to_done_s_p50"] * 1e6 for r in streamed]
        ax.barh(range(len(streamed)), tails)
        ax.set_yticks(range(len(streamed)), labels, fontsize=7)
        ax.set_xlabel("last layer posted -> decode side has every byte, p50 (µs)")
        ax.set_title("Layer-streamed: what the transfer adds after the last layer")
        ax.grid(True, axis="x", alpha=0.3)
        paths.append(os.path.join(out_dir, "streamed_last_layer_to_done.png"))
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths

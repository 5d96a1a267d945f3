"""PNG charts of a bench run: bandwidth against block size per system, and the CDF of
write-to-notified latency."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def write_plots(records: list[dict[str, Any]], out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    ok = [r for r in records if "gbps_p50" in r and "block_bytes" in r]
    paths = []
    systems = sorted({r["system"] for r in ok})

    fig, ax = plt.subplots(figsize=(8, 5))
    for system in systems:
        for pattern, style in (("random", "-o"), ("sequential", "--s")):
            pts = sorted((r["block_bytes"], r["gbps_p50"]) for r in ok
                         if r["system"] == system and r.get("pattern") == pattern
                         and r["blocks"] > 1)
            if len(pts) > 1:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                        label=f"{system} ({pattern})")
    limits = [r for r in records if r.get("workload") == "limits" and "gbps_p50" in r]
    for r in limits:
        ax.axhline(r["gbps_p50"], linestyle=":", color="grey")
        ax.text(4096, r["gbps_p50"], f" {r['system']}", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (bytes)")
    ax.set_ylabel("GB/s until the decode side is notified (p50, verified)")
    ax.set_title("Bandwidth vs block size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(os.path.join(out_dir, "bandwidth_vs_block_size.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    single = [r for r in ok if r["blocks"] == 1 and r.get("gbps_all")]
    if not single:
        return paths
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in single:
        lat_us = np.sort(r["block_bytes"] / 1e9 / np.asarray(r["gbps_all"]) * 1e6)
        ax.plot(lat_us, np.arange(1, len(lat_us) + 1) / len(lat_us), label=r["system"])
    ax.set_xlabel("one 64 KiB write -> target notified (µs)")
    ax.set_ylabel("fraction of writes")
    ax.set_title("Latency CDF")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(os.path.join(out_dir, "latency_cdf.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths

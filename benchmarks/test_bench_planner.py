"""Planner throughput and segment counts (pytest-benchmark).

    .venv/bin/python -m pytest benchmarks/test_bench_planner.py -s \
        --benchmark-columns=min,median,ops --benchmark-sort=name

Workload: a Llama-3-8B-like cache (32 layers, 8 KV heads, head_dim 128, fp16, blocks of 16
tokens, 65536 blocks per side) and a 2048-block request (32k tokens) planned from three block
tables: ``random`` (distinct random ids on both sides), ``sequential`` (one run on each side),
``partly`` (runs of 1-32 consecutive ids at random places, as a fragmented allocator hands out).
Only descriptors are built: planning touches no KV memory.

Rates: ``blocks/s`` counts block-table entries planned per second; ``block-layers/s`` counts
(block, layer) pairs, the unit a per-layer transfer moves. One Python thread, one core.
Prints a human table of segment counts and writes a JSON record (with argv) to bench-results/.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np
import pytest

from kvtransfer.cache import CacheDescriptor
from kvtransfer.layout import KVLayout
from kvtransfer.planner import plan_transfer
from kvtransfer.tp import head_sources

NUM_BLOCKS = 65536
REQUEST = 2048
MODEL = dict(num_layers=32, num_blocks=NUM_BLOCKS, block_size=16, num_kv_heads=8, head_dim=128,
             dtype="float16")
TARGET_BLOCK_LAYERS_PER_S = 20e6


def one_buffer(layout: KVLayout) -> CacheDescriptor:
    """The descriptor of a cache whose tensors sit back to back in one allocation."""
    planes = layout.plane_offsets()
    planes[:, 1] += planes[:, 0] * layout.tensor_nbytes
    planes[:, 0] = 0
    return CacheDescriptor(layout, (layout.nbytes,), planes)


def per_tensor(layout: KVLayout) -> CacheDescriptor:
    """The descriptor of a cache with one allocation per tensor (vLLM GPU, SGLang)."""
    return CacheDescriptor(layout, (layout.tensor_nbytes,) * layout.num_tensors,
                           layout.plane_offsets())


def table(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.choice(NUM_BLOCKS, REQUEST, replace=False).astype(np.int64)
    if kind == "sequential":
        start = int(rng.integers(0, NUM_BLOCKS - REQUEST))
        return np.arange(start, start + REQUEST, dtype=np.int64)
    assert kind == "partly"
    out: list[int] = []
    used = np.zeros(NUM_BLOCKS, dtype=bool)
    while len(out) < REQUEST:
        start, n = int(rng.integers(0, NUM_BLOCKS)), int(rng.integers(1, 33))
        run = [b for b in range(start, min(start + n, NUM_BLOCKS)) if not used[b]]
        run = run[:REQUEST - len(out)]
        used[run] = True
        out.extend(run)
    return np.asarray(out, dtype=np.int64)


TABLES = ("random", "partly", "sequential")
PAIRS = {k: (table(k, 1), table(k, 2)) for k in TABLES}


@pytest.fixture(scope="module")
def flash():
    return one_buffer(KVLayout.vllm_flash(**MODEL))


def _rate(benchmark, units: int) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if not stats:
        return None  # --benchmark-disable
    return units / stats.stats.min


@pytest.mark.parametrize("kind", TABLES)
@pytest.mark.parametrize("layers", ["all", "one"])
def test_plan_rate(benchmark, flash, kind, layers):
    """vllm_flash (NHD, all layers in one allocation): the whole model, or one layer as a
    streaming sender plans it."""
    src, dst = PAIRS[kind]
    sel = None if layers == "all" else 7
    plan = benchmark(plan_transfer, flash, flash, src, dst, layers=sel)
    n_layers = 32 if layers == "all" else 1
    blocks_s = _rate(benchmark, REQUEST)
    block_layers_s = _rate(benchmark, REQUEST * n_layers)
    benchmark.extra_info.update(segments=len(plan.segments), blocks_per_s=blocks_s,
                                block_layers_per_s=block_layers_s)
    if block_layers_s is not None:
        assert block_layers_s >= TARGET_BLOCK_LAYERS_PER_S, (
            f"{block_layers_s / 1e6:.1f}M block-layers/s is under the 20M/s target")


def test_plan_rate_heterogeneous_tp(benchmark):
    """Prefill TP=1 -> decode TP=2 on HND: decode rank 1 takes heads 4-7, one run per block."""
    src = one_buffer(KVLayout.vllm_flash(**MODEL, kv_order="HND"))
    dst = one_buffer(KVLayout.vllm_flash(**{**MODEL, "num_kv_heads": 4}, kv_order="HND"))
    (s,) = head_sources(8, 1, 2, 1)
    a, b = PAIRS["random"]
    plan = benchmark(plan_transfer, src, dst, a, b, heads=s)
    rate = _rate(benchmark, REQUEST * 32)
    benchmark.extra_info.update(segments=len(plan.segments), block_layers_per_s=rate)
    if rate is not None:
        assert rate >= TARGET_BLOCK_LAYERS_PER_S


def test_plan_rate_cpu_layout(benchmark):
    """vLLM CPU (BHT(KD), all layers views of one allocation): one segment per block-layer."""
    desc = one_buffer(KVLayout("BHT(KD)", **MODEL))
    a, b = PAIRS["random"]
    plan = benchmark(plan_transfer, desc, desc, a, b)
    assert len(plan.segments) == REQUEST * 32
    rate = _rate(benchmark, REQUEST * 32)
    benchmark.extra_info.update(segments=len(plan.segments), block_layers_per_s=rate)
    if rate is not None:
        assert rate >= TARGET_BLOCK_LAYERS_PER_S


LAYOUTS = {
    "vllm_flash NHD (1 alloc)": lambda: one_buffer(KVLayout.vllm_flash(**MODEL)),
    "vllm_flash HND (per layer)": lambda: per_tensor(KVLayout.vllm_flash(**MODEL, kv_order="HND")),
    "vllm_flashinfer NHD": lambda: per_tensor(KVLayout.vllm_flashinfer(**MODEL)),
    "vllm_flashinfer NHD (1 alloc)": lambda: one_buffer(KVLayout.vllm_flashinfer(**MODEL)),
    "vllm_cross_layer NHD": lambda: one_buffer(KVLayout.vllm_cross_layer(**MODEL)),
    "vllm CPU BHT(KD) (1 alloc)": lambda: one_buffer(KVLayout("BHT(KD)", **MODEL)),
    "sglang_mha": lambda: per_tensor(KVLayout.sglang_mha(
        num_layers=32, num_tokens=NUM_BLOCKS * 16, page_size=16, num_kv_heads=8, head_dim=128)),
    "mla (576 x bf16)": lambda: per_tensor(KVLayout.mla(num_layers=32, num_blocks=NUM_BLOCKS,
                                                        block_size=16)),
}


def test_segment_counts():
    """Segments emitted for the whole model (and one layer), per layout and table; printed and
    recorded. Not timed: counts are deterministic."""
    rows = []
    for name, make in LAYOUTS.items():
        desc = make()
        for kind in TABLES:
            src, dst = PAIRS[kind]
            t0 = time.perf_counter()
            whole = plan_transfer(desc, desc, src, dst)
            dt = time.perf_counter() - t0
            layer = plan_transfer(desc, desc, src, dst, layers=0)
            rows.append(dict(layout=name, table=kind, segments_all_layers=len(whole.segments),
                             segments_one_layer=len(layer.segments), buffer_pairs=len(whole.groups),
                             mib=whole.nbytes / 2**20, plan_s=dt))
    runs = {k: 1 + int(np.count_nonzero(np.diff(PAIRS[k][0]) != 1)) for k in TABLES}
    print(f"\nplanner segment counts: {REQUEST}-block request, 32 layers x K/V, "
          f"source runs per table: {runs}")
    print(f"{'layout':30} {'table':11} {'all layers':>10} {'one layer':>9} {'pairs':>5} "
          f"{'MiB':>6} {'plan ms':>8}")
    for r in rows:
        print(f"{r['layout']:30} {r['table']:11} {r['segments_all_layers']:>10} "
              f"{r['segments_one_layer']:>9} {r['buffer_pairs']:>5} {r['mib']:>6.0f} "
              f"{r['plan_s'] * 1e3:>8.2f}")
    record = dict(bench="planner_segment_counts", argv=sys.argv, python=sys.version,
                  machine=platform.machine(), request_blocks=REQUEST, rows=rows)
    os.makedirs("bench-results", exist_ok=True)
    with open(os.path.join("bench-results", "planner_segment_counts.json"), "w") as f:
        json.dump(record, f, indent=1)
    by = {(r["layout"], r["table"]): r for r in rows}
    assert by[("vllm_flash NHD (1 alloc)", "sequential")]["segments_all_layers"] == 64
    assert by[("vllm_cross_layer NHD", "sequential")]["segments_all_layers"] == 1
    assert by[("vllm_flash NHD (1 alloc)", "random")]["segments_all_layers"] == REQUEST * 64
    # K|V inside a block (FlashInfer) or inside each head (vLLM CPU): one segment per block-layer
    # even with every layer in one allocation, where the planes have no single stride
    for name in ("vllm_flashinfer NHD (1 alloc)", "vllm CPU BHT(KD) (1 alloc)"):
        assert by[(name, "random")]["segments_all_layers"] == REQUEST * 32
        assert by[(name, "sequential")]["segments_all_layers"] == 32

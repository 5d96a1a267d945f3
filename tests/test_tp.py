"""Heterogeneous tensor parallelism: head mapping, and transfers between differently sharded
prefill and decode ranks checked against the unsharded numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kv_reference import (
    MHA_KINDS,
    actual,
    block_table,
    buffers,
    build,
    expected_after,
    make_tensors,
    plane_view,
)

from kvtransfer.cache import KVCache
from kvtransfer.errors import InvalidRequestError
from kvtransfer.layout import KVLayout
from kvtransfer.planner import apply_plan, plan_transfer
from kvtransfer.tp import HeadSlice, head_sources, head_targets, heads_per_rank, rank_heads

# (num_kv_heads, prefill tp, decode tp): the cases, and replication on either side.
CASES = [(8, 2, 4), (8, 4, 2), (8, 1, 8), (4, 2, 8), (2, 4, 1), (2, 8, 4), (2, 1, 4), (4, 4, 4),
         (1, 2, 8), (1, 4, 2), (8, 8, 1), (4, 8, 2)]


def test_rank_heads():
    assert rank_heads(8, 4, 1) == range(2, 4)
    assert rank_heads(2, 8, 5) == range(1, 2)  # 4 replicas per head
    assert heads_per_rank(2, 8) == 1 and heads_per_rank(8, 2) == 4
    with pytest.raises(InvalidRequestError, match="evenly"):
        rank_heads(6, 4, 0)
    with pytest.raises(InvalidRequestError, match="multiple"):
        rank_heads(4, 6, 0)
    with pytest.raises(InvalidRequestError, match="outside"):
        rank_heads(4, 2, 2)


def test_examples():
    # prefill TP=2 -> decode TP=4: decode rank 3 takes heads 2-3 of prefill rank 1
    assert head_sources(8, 2, 4, 3) == [HeadSlice(src_rank=1, src_head=2, dst_head=0, num_heads=2)]
    # TP=4 -> 2: decode rank 1 gathers heads from prefill ranks 2 and 3
    assert head_sources(8, 4, 2, 1) == [HeadSlice(2, 0, 0, 2), HeadSlice(3, 0, 2, 2)]
    # TP=1 -> 8: every decode rank reads one head of the single prefill rank
    assert head_sources(8, 1, 8, 5) == [HeadSlice(0, 5, 0, 1)]
    # MLA (one latent, replicated): every decode rank gets it whole, spread over prefill ranks
    assert {s.src_rank for d in range(8) for s in head_sources(1, 2, 8, d)} == {0, 1}
    assert head_targets(8, 4, 2, 3) == [(1, HeadSlice(3, 0, 2, 2))]


@pytest.mark.parametrize("heads,ptp,dtp", CASES)
def test_each_decode_head_comes_once_from_a_rank_that_holds_it(heads, ptp, dtp):
    for d in range(dtp):
        got = []
        for s in head_sources(heads, ptp, dtp, d):
            held = rank_heads(heads, ptp, s.src_rank)
            for k in range(s.num_heads):
                assert held[s.src_head + k] == rank_heads(heads, dtp, d)[s.dst_head + k]
                got.append(s.dst_head + k)
        assert sorted(got) == list(range(heads_per_rank(heads, dtp)))
    sent = sorted((d, s) for p in range(ptp) for d, s in head_targets(heads, ptp, dtp, p))
    assert sent == sorted((d, s) for d in range(dtp) for s in head_sources(heads, ptp, dtp, d))


def shard(global_layout, global_tensors, layout, heads: range, rng, shared):
    """A rank's tensors holding `heads` of the global cache (same block ids)."""
    tensors = make_tensors(layout, rng, shared)
    for layer in range(layout.num_layers):
        for part in range(layout.kv_parts):
            plane_view(layout, tensors, layer, part)[...] = \
                plane_view(global_layout, global_tensors, layer, part)[:, :, heads.start:heads.stop]
    return tensors


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_heterogeneous_tp_matches_reference(data):
    heads, ptp, dtp = data.draw(st.sampled_from(CASES))
    mla = heads == 1 and data.draw(st.booleans(), label="mla")
    kinds = data.draw(st.tuples(st.sampled_from(MHA_KINDS), st.sampled_from(MHA_KINDS)))
    L, D = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))
    bs_s = data.draw(st.sampled_from([1, 2, 4]))
    bs_d = bs_s * data.draw(st.sampled_from([1, 2])) if data.draw(st.booleans()) else bs_s
    nb_s, nb_d = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    dtype = data.draw(st.sampled_from(["float16", "bfloat16", "float8_e4m3"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))

    def layout(kind, nb, bs, h):
        if mla:
            return KVLayout.mla(num_layers=L, num_blocks=nb, block_size=bs, kv_lora_rank=D,
                                rope_dim=1, dtype=dtype)
        return build(kind, num_layers=L, num_blocks=nb, block_size=bs, num_kv_heads=h,
                     head_dim=D, dtype=dtype)

    global_layout = layout(kinds[0], nb_s, bs_s, heads)
    global_t = make_tensors(global_layout, rng, True)
    p_layouts = [layout(kinds[0], nb_s, bs_s, heads_per_rank(heads, ptp)) for _ in range(ptp)]
    prefill = []
    for r in range(ptp):
        t = shard(global_layout, global_t, p_layouts[r], rank_heads(heads, ptp, r), rng, r % 2 == 0)
        prefill.append(KVCache(p_layouts[r], t))

    tokens = data.draw(st.integers(0, min(nb_s * bs_s, nb_d * bs_d)))
    sb = data.draw(block_table(nb_s, -(-tokens // bs_s)))
    db = data.draw(block_table(nb_d, -(-tokens // bs_d)))
    for d in range(dtp):
        d_layout = layout(kinds[1], nb_d, bs_d, heads_per_rank(heads, dtp))
        d_tensors = make_tensors(d_layout, rng, d % 2 == 1)
        mine = rank_heads(heads, dtp, d)
        want = expected_after(global_layout, global_t, d_layout, d_tensors, sb, db, range(L),
                              (mine.start, len(mine), 0), tokens)
        dst = KVCache(d_layout, d_tensors)
        for s in head_sources(heads, ptp, dtp, d):
            src = prefill[s.src_rank]
            plan = plan_transfer(src, dst, sb, db, heads=s, num_tokens=tokens)
            apply_plan(plan, buffers(src), buffers(dst))
        for q, (w, g) in enumerate(zip(want, actual(d_layout, d_tensors), strict=True)):
            assert np.array_equal(w, g), f"decode rank {d}, plane {q}"

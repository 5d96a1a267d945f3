"""The planner against a plain-numpy reference: for every preset (and across presets), random
block tables, layer ranges, head ranges and block sizes, applying the emitted segments leaves the
destination cache equal to what numpy indexing says, byte for byte."""

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
)

from kvtransfer import _core
from kvtransfer.cache import KVCache
from kvtransfer.errors import InvalidRequestError
from kvtransfer.layout import DTYPES, KVLayout
from kvtransfer.planner import apply_plan, plan_transfer

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

def run_transfer(src_layout, dst_layout, src_blocks, dst_blocks, layers, heads, num_tokens,
                 rng, shared=(True, False)):
    src_t = make_tensors(src_layout, rng, shared[0])
    dst_t = make_tensors(dst_layout, rng, shared[1])
    src, dst = KVCache(src_layout, src_t), KVCache(dst_layout, dst_t)
    want = expected_after(src_layout, src_t, dst_layout, dst_t, src_blocks, dst_blocks, layers,
                          heads, num_tokens)
    plan = plan_transfer(src, dst, src_blocks, dst_blocks, layers=layers, heads=heads,
                         num_tokens=None if num_tokens is None else num_tokens)
    apply_plan(plan, buffers(src), buffers(dst))
    got = actual(dst_layout, dst_t)
    for q, (w, g) in enumerate(zip(want, got, strict=True)):
        assert np.array_equal(w, g), f"plane {q} differs ({src_layout!r} -> {dst_layout!r})"
    return plan


@SETTINGS
@given(st.data())
def test_presets_match_numpy_reference(data):
    """Any MHA preset to any MHA preset: same block size, random tables, layers, heads."""
    L = data.draw(st.integers(1, 3), label="layers")
    H = data.draw(st.sampled_from([1, 2, 3, 4]), label="heads")
    D = data.draw(st.integers(1, 6), label="head_dim")
    bs = data.draw(st.sampled_from([1, 2, 3, 4, 8]), label="block_size")
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    kinds = data.draw(st.tuples(st.sampled_from(MHA_KINDS), st.sampled_from(MHA_KINDS)))
    orders = data.draw(st.tuples(*[st.permutations("KBTH").map(lambda p: "".join(p) + "D")] * 2))
    nb_s, nb_d = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))
    heads = None
    H_d = H
    if data.draw(st.booleans(), label="head range"):
        H_d = data.draw(st.sampled_from([1, 2, 3, 4]))
        nh = data.draw(st.integers(1, min(H, H_d)))
        heads = (data.draw(st.integers(0, H - nh)), nh, data.draw(st.integers(0, H_d - nh)))
    src_layout = build(kinds[0], num_layers=L, num_blocks=nb_s, block_size=bs, num_kv_heads=H,
                       head_dim=D, dtype=dtype, order=orders[0])
    dst_layout = build(kinds[1], num_layers=L, num_blocks=nb_d, block_size=bs, num_kv_heads=H_d,
                       head_dim=D, dtype=dtype, order=orders[1])
    n = data.draw(st.integers(0, min(nb_s, nb_d)), label="n")
    sb = data.draw(block_table(nb_s, n), label="src_blocks")
    db = data.draw(block_table(nb_d, n), label="dst_blocks")
    lo = data.draw(st.integers(0, L))
    layers = range(lo, data.draw(st.integers(lo, L)))
    shared = data.draw(st.tuples(st.booleans(), st.booleans()))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    plan = run_transfer(src_layout, dst_layout, sb, db, layers, heads, n * bs, rng, shared)
    nh = H if heads is None else heads[1]
    assert plan.nbytes == n * bs * nh * D * DTYPES[dtype] * len(layers) * 2
    assert int(plan.segments[:, 2].sum()) == plan.nbytes


@SETTINGS
@given(st.data())
def test_mismatched_block_sizes(data):
    """One side's block size divides the other's; a partial last block moves its slots only."""
    L = data.draw(st.integers(1, 2))
    H = data.draw(st.sampled_from([1, 2, 4]))
    D = data.draw(st.integers(1, 4))
    small = data.draw(st.sampled_from([1, 2, 4]))
    factor = data.draw(st.sampled_from([1, 2, 4]))
    bs_s, bs_d = (small, small * factor) if data.draw(st.booleans()) else (small * factor, small)
    dtype = data.draw(st.sampled_from(sorted(DTYPES)))
    kinds = data.draw(st.tuples(st.sampled_from(MHA_KINDS), st.sampled_from(MHA_KINDS)))
    nb_s, nb_d = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    tokens = data.draw(st.integers(0, min(nb_s * bs_s, nb_d * bs_d)), label="tokens")
    ns, nd = -(-tokens // bs_s), -(-tokens // bs_d)
    src_layout = build(kinds[0], num_layers=L, num_blocks=nb_s, block_size=bs_s,
                       num_kv_heads=H, head_dim=D, dtype=dtype)
    dst_layout = build(kinds[1], num_layers=L, num_blocks=nb_d, block_size=bs_d,
                       num_kv_heads=H, head_dim=D, dtype=dtype)
    sb = data.draw(block_table(nb_s, ns))
    db = data.draw(block_table(nb_d, nd))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    run_transfer(src_layout, dst_layout, sb, db, range(L), None, tokens, rng)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mla_matches_numpy_reference(data):
    L = data.draw(st.integers(1, 3))
    lora, rope = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 4))
    bs = data.draw(st.sampled_from([1, 2, 4]))
    factor = data.draw(st.sampled_from([1, 2]))
    nb_s, nb_d = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))
    src_layout = KVLayout.mla(num_layers=L, num_blocks=nb_s, block_size=bs, kv_lora_rank=lora,
                              rope_dim=rope)
    dst_layout = KVLayout.mla(num_layers=L, num_blocks=nb_d, block_size=bs * factor,
                              kv_lora_rank=lora, rope_dim=rope)
    tokens = data.draw(st.integers(0, min(nb_s * bs, nb_d * bs * factor)))
    sb = data.draw(block_table(nb_s, -(-tokens // bs)))
    db = data.draw(block_table(nb_d, -(-tokens // (bs * factor))))
    lo = data.draw(st.integers(0, L))
    layers = range(lo, data.draw(st.integers(lo, L)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    run_transfer(src_layout, dst_layout, sb, db, layers, None, tokens, rng)


# -- coalescing --------------------------------------------------------------------------------

def _caches(layout_fn, **kw):
    lay = layout_fn(**kw)
    return KVCache.allocate(lay), KVCache.allocate(lay)


def test_sequential_blocks_become_one_segment_per_plane():
    src, dst = _caches(KVLayout.vllm_flash, num_layers=4, num_blocks=64, block_size=16,
                       num_kv_heads=2, head_dim=8)
    plan = plan_transfer(src, dst, range(10, 30), range(40, 60))
    assert len(plan.segments) == 8  # 4 layers x K/V, each one run of 20 blocks
    assert (plan.segments[:, 2] == 20 * 16 * 2 * 8 * 2).all()
    assert len(plan.groups) == 1  # all layers are views of one allocation


def test_cross_layer_moves_all_layers_of_a_run_as_one_segment():
    src, dst = _caches(KVLayout.vllm_cross_layer, num_layers=4, num_blocks=64, block_size=16,
                       num_kv_heads=2, head_dim=8)
    blk = src.layout.block_stride
    assert blk == 4 * 2 * 16 * 2 * 8 * 2
    plan = plan_transfer(src, dst, [3, 4, 5, 9], [7, 8, 9, 1])
    assert plan.segments.tolist() == [[3 * blk, 7 * blk, 3 * blk], [9 * blk, blk, blk]]
    half = plan_transfer(src, dst, [3, 4], [7, 8], layers=range(1, 3))
    assert len(half.segments) == 2  # layers 1-2 of each block: contiguous inside a block


def test_random_blocks_make_one_segment_per_block_and_plane():
    src, dst = _caches(KVLayout.vllm_flashinfer, num_layers=2, num_blocks=64, block_size=16,
                       num_kv_heads=2, head_dim=8)
    plan = plan_transfer(src, dst, [5, 1, 9], [2, 7, 4])
    assert len(plan.segments) == 3 * 2 * 2


def test_head_range_on_hnd_is_one_run_per_block():
    lay = KVLayout.vllm_flash(num_layers=1, num_blocks=8, block_size=16, num_kv_heads=4,
                              head_dim=8, kv_order="HND")
    half = KVLayout.vllm_flash(num_layers=1, num_blocks=8, block_size=16, num_kv_heads=2,
                               head_dim=8, kv_order="HND")
    src, dst = KVCache.allocate(lay), KVCache.allocate(half)
    plan = plan_transfer(src, dst, [1, 5], [0, 3], heads=(2, 2, 0))
    assert len(plan.segments) == 2 * 2  # two blocks x K/V, heads 2-3 contiguous in HND


def test_separate_tensors_are_separate_buffer_pairs():
    lay = KVLayout.sglang_mha(num_layers=2, num_tokens=64, page_size=4, num_kv_heads=2,
                              head_dim=4)
    rng = np.random.default_rng(0)
    src = KVCache(lay, make_tensors(lay, rng, shared=False))
    dst = KVCache.allocate(lay)
    assert len(src.regions()) == 4 and len(dst.regions()) == 1
    plan = plan_transfer(src, dst, [1, 2], [3, 4])
    assert [(g.src_buffer, g.dst_buffer) for g in plan.groups] == [(0, 0), (1, 0), (2, 0), (3, 0)]


# -- errors ------------------------------------------------------------------------------------

@pytest.fixture
def pair():
    return _caches(KVLayout.vllm_flash, num_layers=2, num_blocks=8, block_size=4,
                   num_kv_heads=2, head_dim=4)


def test_block_id_out_of_range(pair):
    with pytest.raises(InvalidRequestError, match=r"dst_blocks\[1\] = 8 is out of range"):
        plan_transfer(*pair, [0, 1], [0, 8])
    with pytest.raises(InvalidRequestError, match=r"src_blocks\[0\] = -1"):
        plan_transfer(*pair, [-1], [0])


def test_block_list_length_mismatch(pair):
    with pytest.raises(InvalidRequestError, match="src_blocks has 2 ids but dst_blocks has 3"):
        plan_transfer(*pair, [0, 1], [0, 1, 2])
    with pytest.raises(InvalidRequestError, match="need 2 source blocks"):
        plan_transfer(*pair, [0, 1, 2], [0, 1], num_tokens=5)


def test_incompatible_layouts_name_both(pair):
    other = KVCache.allocate(KVLayout.vllm_flash(num_layers=2, num_blocks=8, block_size=4,
                                                 num_kv_heads=2, head_dim=4, dtype="bfloat16"))
    with pytest.raises(InvalidRequestError, match=r"(?s)float16.*bfloat16.*dtype"):
        plan_transfer(pair[0], other, [0], [0])


def test_head_and_layer_ranges_are_checked(pair):
    with pytest.raises(InvalidRequestError, match="source heads"):
        plan_transfer(*pair, [0], [0], heads=(1, 2, 0))
    with pytest.raises(InvalidRequestError, match="layers"):
        plan_transfer(*pair, [0], [0], layers=range(1, 3))
    one = KVCache.allocate(KVLayout.vllm_flash(num_layers=2, num_blocks=8, block_size=4,
                                               num_kv_heads=1, head_dim=4))
    with pytest.raises(InvalidRequestError, match="give a head range"):
        plan_transfer(pair[0], one, [0], [0])


def test_plane_set_rejects_planes_outside_their_buffer():
    with pytest.raises(InvalidRequestError, match="plane 1 spans"):
        _core.PlaneSet(num_blocks=4, block_size=2, num_heads=1, head_bytes=8, block_stride=16,
                       token_stride=8, head_stride=8, planes=np.array([[0, 0], [0, 40]]),
                       buffer_nbytes=np.array([64]))


def test_empty_request_is_an_empty_plan(pair):
    plan = plan_transfer(*pair, [], [])
    assert plan.segments.shape == (0, 3) and plan.nbytes == 0


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
from kvtransfer.planner import TransferPlan, apply_plan, plan_transfer

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


def test_random_blocks_make_one_segment_per_block_and_layer_in_flashinfer():
    """FlashInfer blocks hold K then V: a block of a layer is one run, whether the layers are
    separate allocations or views of one (then each layer's K|V planes fold on their own)."""
    src, dst = _caches(KVLayout.vllm_flashinfer, num_layers=2, num_blocks=64, block_size=16,
                       num_kv_heads=2, head_dim=8)
    plan = plan_transfer(src, dst, [5, 1, 9], [2, 7, 4])
    assert len(plan.segments) == 3 * 2
    assert (plan.segments[:, 2] == 2 * 16 * 2 * 8 * 2).all()
    lay = src.layout
    rng = np.random.default_rng(0)
    apart = KVCache(lay, make_tensors(lay, rng, shared=False))
    assert len(plan_transfer(apart, apart, [5, 1, 9], [2, 7, 4]).segments) == 3 * 2


# vLLM CPU: per layer (num_blocks, num_kv_heads, block_size, 2 * head_dim), K|V in the last dim,
# every layer a view of one allocation. One block of one layer is one run of bytes.
CPU = dict(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=64)


def _cpu_caches(shared=True, **kw):
    lay = KVLayout("BHT(KD)", **{**CPU, **kw})
    rng = np.random.default_rng(0)
    return (KVCache(lay, make_tensors(lay, rng, shared)),
            KVCache(lay, make_tensors(lay, rng, shared)))


@pytest.mark.parametrize("shared", [True, False], ids=["one allocation", "per layer"])
def test_cpu_layout_random_blocks_are_one_segment_per_block_and_layer(shared):
    lay = KVLayout("BHT(KD)", **CPU)
    block_bytes = lay.num_kv_heads * lay.block_size * 2 * lay.head_bytes
    assert lay.block_stride == block_bytes
    rng = np.random.default_rng(1)
    n = 30  # 480 tokens
    sb, db = rng.choice(64, n, replace=False), rng.choice(64, n, replace=False)
    assert not np.any((np.diff(sb) == 1) & (np.diff(db) == 1))  # no run adjacent on both sides
    plan = run_transfer(lay, lay, sb, db, range(lay.num_layers), None, n * lay.block_size, rng,
                        shared=(shared, shared))  # checks the bytes against numpy
    assert len(plan.segments) == n * lay.num_layers  # was n x 16 tokens x 2 heads x L x K/V
    assert (plan.segments[:, 2] == block_bytes).all()
    # the same segments as planning each layer on its own
    src, dst = _cpu_caches(shared)
    plan = plan_transfer(src, dst, sb, db)
    per_layer = np.concatenate([plan_transfer(src, dst, sb, db, layers=li).segments
                                for li in range(lay.num_layers)])
    assert sorted(map(tuple, plan.segments.tolist())) == sorted(map(tuple, per_layer.tolist()))


def test_cpu_layout_sequential_blocks_are_one_segment_per_layer():
    src, dst = _cpu_caches()
    lay = src.layout
    plan = plan_transfer(src, dst, range(10, 40), range(30, 60))
    assert len(plan.segments) == lay.num_layers
    assert (plan.segments[:, 2] == 30 * lay.block_stride).all()
    # runs adjacent on both sides: one segment per (run, layer)
    plan = plan_transfer(src, dst, [3, 4, 5, 9, 10], [20, 21, 22, 40, 41])
    assert len(plan.segments) == 2 * lay.num_layers
    assert len(plan_transfer(src, dst, [3, 4], [7, 8], layers=range(1, 3)).segments) == 2


def test_cpu_layout_head_range_and_partial_block():
    """A head range of BHT(KD) is one run per (block, layer) (heads are outside tokens); a partial
    last block moves its tokens of each head."""
    src, _ = _cpu_caches(num_kv_heads=4)
    _, dst = _cpu_caches(num_kv_heads=2)
    plan = plan_transfer(src, dst, [5, 1, 9], [2, 7, 4], heads=(2, 2, 0))
    assert len(plan.segments) == 3 * CPU["num_layers"]
    tail = plan_transfer(src, dst, [5, 1], [2, 7], heads=(2, 2, 0), num_tokens=20)
    assert len(tail.segments) == (1 + 2) * CPU["num_layers"]  # block 5 whole; 4 tokens x 2 heads


def test_flash_and_cross_layer_counts_are_unchanged():
    """Layouts whose planes sit at one stride keep their counts: FlashAttention NHD moves one
    segment per (block run, layer, K/V); cross-layer one per block run, all layers."""
    n, L = 7, 4
    ids = ([5, 1, 9, 30, 17, 44, 2], [2, 7, 4, 11, 60, 33, 19])
    flash = _caches(KVLayout.vllm_flash, num_layers=L, num_blocks=64, block_size=16,
                    num_kv_heads=2, head_dim=8)
    assert len(plan_transfer(*flash, *ids).segments) == n * L * 2
    assert len(plan_transfer(*flash, range(3, 10), range(20, 27)).segments) == L * 2
    assert len(plan_transfer(*flash, *ids, layers=1).segments) == n * 2
    cross = _caches(KVLayout.vllm_cross_layer, num_layers=L, num_blocks=64, block_size=16,
                    num_kv_heads=2, head_dim=8)
    assert len(plan_transfer(*cross, *ids).segments) == n
    assert len(plan_transfer(*cross, range(3, 10), range(20, 27)).segments) == 1
    assert len(plan_transfer(*cross, *ids, layers=1).segments) == n
    sglang = KVLayout.sglang_mha(num_layers=L, num_tokens=64 * 16, page_size=16, num_kv_heads=2,
                                 head_dim=8)
    one = KVCache.allocate(sglang)
    assert len(plan_transfer(one, one, *ids).segments) == n * L * 2


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_all_layers_never_more_segments_than_layer_by_layer(data):
    """Planning every layer at once is at least as coalesced as planning them one by one."""
    L = data.draw(st.integers(1, 4), label="layers")
    H = data.draw(st.sampled_from([1, 2, 3]), label="heads")
    D = data.draw(st.integers(1, 4), label="head_dim")
    bs = data.draw(st.sampled_from([1, 2, 4]), label="block_size")
    kinds = data.draw(st.tuples(st.sampled_from(MHA_KINDS), st.sampled_from(MHA_KINDS)))
    nb = data.draw(st.integers(1, 8))
    lays = [build(k, num_layers=L, num_blocks=nb, block_size=bs, num_kv_heads=H, head_dim=D,
                  dtype="float16") for k in kinds]
    shared = data.draw(st.tuples(st.booleans(), st.booleans()))
    rng = np.random.default_rng(0)
    src, dst = (KVCache(lay, make_tensors(lay, rng, sh))
                for lay, sh in zip(lays, shared, strict=True))
    n = data.draw(st.integers(0, nb))
    sb, db = data.draw(block_table(nb, n)), data.draw(block_table(nb, n))
    whole = len(plan_transfer(src, dst, sb, db).segments)
    assert whole <= sum(len(plan_transfer(src, dst, sb, db, layers=li).segments)
                        for li in range(L))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_plane_range_moves_what_its_planes_move(data):
    """Plane ranges that do not start at a layer (the C++ API allows them) fold only chunks that
    are regular: the bytes equal moving each plane on its own."""
    L = data.draw(st.integers(1, 4))
    kind = data.draw(st.sampled_from(MHA_KINDS))
    lay = build(kind, num_layers=L, num_blocks=6, block_size=2, num_kv_heads=2, head_dim=3,
                dtype="float16")
    pb = data.draw(st.integers(0, 2 * L))
    pe = data.draw(st.integers(pb, 2 * L))
    sb, db = data.draw(block_table(6, 4)), data.draw(block_table(6, 4))
    shared = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    src = KVCache(lay, make_tensors(lay, rng, shared))
    outs = []
    for ranges in ([(pb, pe)], [(q, q + 1) for q in range(pb, pe)]):
        dst = KVCache(lay, make_tensors(lay, np.random.default_rng(7), shared))
        for b, e in ranges:
            segs, groups, nbytes = _core.plan_segments(
                src.descriptor().plane_set(), dst.descriptor().plane_set(),
                np.asarray(sb, dtype=np.int64), np.asarray(db, dtype=np.int64), b, e, 0, -1, 0, -1)
            assert nbytes == 4 * 2 * 2 * 3 * 2 * (e - b)
            apply_plan(TransferPlan(segs, groups, nbytes), buffers(src), buffers(dst))
        outs.append([v.copy() for v in buffers(dst)])
    for a, b in zip(*outs, strict=True):
        assert np.array_equal(a, b)


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


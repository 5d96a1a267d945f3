"""KVSender / KVReceiver over real endpoints: the decode cache after a transfer equals the
plain-numpy reference, for every preset, layer ranges and streaming, pull, heterogeneous TP and
mismatched block sizes; failed or cancelled requests report their blocks for recompute."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kv_reference import MHA_KINDS, actual, block_table, build, expected_after, make_tensors

import kvtransfer as kvt
from kvtransfer.layout import DTYPES
from kvtransfer.tp import head_sources, rank_heads


@pytest.fixture(scope="module")
def eps():
    with kvt.Endpoint("decode", timeout=5) as d, kvt.Endpoint("prefill", timeout=5) as p:
        yield d, p


def _run(eps, src_layout, dst_layout, sb, db, layers_batches, rng, *, pull=False,
         num_tokens=None, shared=(True, False)):
    d, p = eps
    src_t = make_tensors(src_layout, rng, shared[0])
    dst_t = make_tensors(dst_layout, rng, shared[1])
    rx = kvt.KVReceiver(d, kvt.KVCache(dst_layout, dst_t))
    tx = kvt.KVSender(p, kvt.KVCache(src_layout, src_t))
    tokens = num_tokens if num_tokens is not None else len(sb) * src_layout.block_size
    want = expected_after(src_layout, src_t, dst_layout, dst_t, sb, db,
                          range(src_layout.num_layers), None, tokens)
    rid = f"r{rng.integers(1 << 62)}"
    try:
        if pull:
            rx.fetch(rid, tx.offer(rid, sb), db, num_tokens=num_tokens)
            rx.wait(rid, timeout=10)
            tx.wait_fetched(rid, timeout=10)
        else:
            s = tx.stream(rid, sb, rx.expect(rid, db), num_tokens=num_tokens)
            for b, e in layers_batches:
                s.send_layers(range(b, e))
            s.close()
            rx.wait(rid, timeout=10)
            s.wait(10)
        for q, (w, g) in enumerate(zip(want, actual(dst_layout, dst_t), strict=True)):
            assert np.array_equal(w, g), f"plane {q} differs ({src_layout!r} -> {dst_layout!r})"
    finally:
        rx.close()
        tx.close()


def _batches(draw, L):
    cuts = sorted(set(draw(st.lists(st.integers(0, L), max_size=3))) | {0, L})
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_push_and_pull_match_numpy_reference_for_every_preset(eps, data):
    L = data.draw(st.integers(1, 3))
    H = data.draw(st.sampled_from([1, 2, 4]))
    D = data.draw(st.integers(1, 8))
    bs = data.draw(st.sampled_from([1, 4, 16]))
    dtype = data.draw(st.sampled_from(sorted(DTYPES)))
    kinds = data.draw(st.tuples(st.sampled_from(MHA_KINDS), st.sampled_from(MHA_KINDS)))
    nb_s, nb_d = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    n = data.draw(st.integers(0, min(nb_s, nb_d)))
    kw = dict(num_layers=L, block_size=bs, num_kv_heads=H, head_dim=D, dtype=dtype)
    src_layout = build(kinds[0], num_blocks=nb_s, **kw)
    dst_layout = build(kinds[1], num_blocks=nb_d, **kw)
    sb, db = data.draw(block_table(nb_s, n)), data.draw(block_table(nb_d, n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    _run(eps, src_layout, dst_layout, sb, db, _batches(data.draw, L), rng,
         pull=data.draw(st.booleans(), label="pull"),
         shared=data.draw(st.tuples(st.booleans(), st.booleans())))


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_mismatched_block_sizes_and_mla(eps, data):
    L = data.draw(st.integers(1, 2))
    small, factor = data.draw(st.sampled_from([1, 2, 4])), data.draw(st.sampled_from([2, 4]))
    bs_s, bs_d = (small, small * factor) if data.draw(st.booleans()) else (small * factor, small)
    nb_s, nb_d = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))
    tokens = data.draw(st.integers(0, min(nb_s * bs_s, nb_d * bs_d)))
    if data.draw(st.booleans(), label="mla"):
        mk = lambda nb, bs: kvt.KVLayout.mla(num_layers=L, num_blocks=nb, block_size=bs,  # noqa: E731
                                             kv_lora_rank=8, rope_dim=4)
    else:
        kind = data.draw(st.sampled_from(MHA_KINDS))
        mk = lambda nb, bs: build(kind, num_layers=L, num_blocks=nb, block_size=bs,  # noqa: E731
                                  num_kv_heads=2, head_dim=4, dtype="bfloat16")
    sb = data.draw(block_table(nb_s, -(-tokens // bs_s)))
    db = data.draw(block_table(nb_d, -(-tokens // bs_d)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    _run(eps, mk(nb_s, bs_s), mk(nb_d, bs_d), sb, db, [(0, L)], rng, num_tokens=tokens,
         pull=data.draw(st.booleans(), label="pull"))


@pytest.mark.parametrize("prefill_tp, decode_tp, heads", [
    (2, 4, 8), (4, 2, 8), (1, 8, 8), (2, 8, 4), (8, 2, 4), (1, 1, 4)])
@pytest.mark.parametrize("pull", [False, True])
def test_heterogeneous_tp_each_decode_rank_gets_exactly_its_heads(prefill_tp, decode_tp, heads,
                                                                  pull):
    L, nb, bs, D = 2, 6, 4, 8
    rng = np.random.default_rng(prefill_tp * 10 + decode_tp)
    full = rng.integers(0, 1 << 16, size=(L, 2, nb, bs, heads, D), dtype=np.uint16)

    def layout(tp):
        return kvt.KVLayout.vllm_flash(num_layers=L, num_blocks=nb, block_size=bs,
                                       num_kv_heads=max(1, heads // tp), head_dim=D,
                                       dtype="bfloat16")

    src_blocks, dst_blocks = [4, 0, 2], [1, 5, 3]
    pre = []
    for r in range(prefill_tp):
        hs = rank_heads(heads, prefill_tp, r)
        tensors = [np.ascontiguousarray(full[layer][:, :, :, hs.start:hs.stop])
                   for layer in range(L)]
        ep = kvt.Endpoint(f"prefill-{r}")
        pre.append((ep, kvt.KVSender(ep, kvt.KVCache(layout(prefill_tp), tensors), tp_rank=r,
                                     tp_size=prefill_tp, total_kv_heads=heads)))
    dec = []
    try:
        for r in range(decode_tp):
            ep = kvt.Endpoint(f"decode-{r}")
            tensors = [np.zeros((2, nb, bs, max(1, heads // decode_tp), D), np.uint16)
                       for _ in range(L)]
            rx = kvt.KVReceiver(ep, kvt.KVCache(layout(decode_tp), tensors), tp_rank=r,
                                tp_size=decode_tp, total_kv_heads=heads)
            dec.append((ep, rx, tensors))
        for r, (_, rx, _) in enumerate(dec):
            if pull:
                for src in {s.src_rank for s in head_sources(heads, prefill_tp, decode_tp, r)}:
                    rx.fetch("req", pre[src][1].offer("req", src_blocks), dst_blocks)
            else:
                ticket = rx.expect("req", dst_blocks)
                for _, tx in pre:
                    tx.send("req", src_blocks, ticket)
        for r, (_, rx, tensors) in enumerate(dec):
            rx.wait("req", timeout=10)
            hs = rank_heads(heads, decode_tp, r)
            for layer in range(L):
                want = np.zeros_like(tensors[layer])
                want[:, dst_blocks] = full[layer][:, src_blocks][:, :, :, hs.start:hs.stop]
                assert np.array_equal(tensors[layer], want), f"decode rank {r} layer {layer}"
    finally:
        for ep, *_ in pre + dec:
            ep.close()


def test_each_streamed_layer_is_complete_when_announced_before_later_layers_are_sent(eps):
    d, p = eps
    L = 6
    lay = kvt.KVLayout.vllm_flash(num_layers=L, num_blocks=32, block_size=16, num_kv_heads=4,
                                  head_dim=64, dtype="bfloat16")
    src, dst = kvt.KVCache.allocate(lay), kvt.KVCache.allocate(lay)
    for i in range(len(src.regions())):
        src.buffer_view(i)[:] = np.random.default_rng(i).integers(1, 256, src.buffer_view(i).size,
                                                                   dtype=np.uint8)
    rx, tx = kvt.KVReceiver(d, dst), kvt.KVSender(p, src)
    sb, db = [3, 1, 4, 15], [9, 2, 6, 5]
    try:
        s = tx.stream("layers", sb, rx.expect("layers", db))
        planes = [kvt.planner.plan_transfer(src, dst, sb, db, layers=layer) for layer in range(L)]
        for layer in range(L):
            s.send_layers(layer)
            rx.wait_layers("layers", layer + 1, timeout=5)
            for later, plan in enumerate(planes):
                for g in plan.groups:
                    sv, dv = src.buffer_view(g.src_buffer), dst.buffer_view(g.dst_buffer)
                    for so, do, n in g.segments.tolist():
                        same = np.array_equal(sv[so:so + n], dv[do:do + n])
                        assert same == (later <= layer), f"layer {later} after sending {layer}"
        s.close()
        rx.wait("layers", timeout=5)
        assert rx.finished() == []  # wait() reported it
    finally:
        rx.close()
        tx.close()


def test_torch_tensors_move_like_numpy(eps):
    torch = pytest.importorskip("torch")
    d, p = eps
    L, nb = 2, 8
    mk = lambda: [torch.zeros(2, nb, 16, 2, 32, dtype=torch.bfloat16) for _ in range(L)]  # noqa: E731
    lay = kvt.KVLayout.vllm_flash(num_layers=L, num_blocks=nb, block_size=16, num_kv_heads=2,
                                  head_dim=32, dtype="bfloat16")
    src, dst = mk(), mk()
    for t in src:
        t.copy_(torch.randn(t.shape).to(torch.bfloat16))
    rx, tx = kvt.KVReceiver(d, kvt.KVCache(lay, dst)), kvt.KVSender(p, kvt.KVCache(lay, src))
    try:
        tx.send("torch", [0, 5, 7], rx.expect("torch", [1, 2, 3])).wait(5)
        rx.wait("torch", 5)
        for layer in range(L):
            assert torch.equal(dst[layer][:, [1, 2, 3]], src[layer][:, [0, 5, 7]])
            assert not dst[layer][:, [0, 4, 5, 6, 7]].any()
    finally:
        rx.close()
        tx.close()


def _simple(d, p, **rx_kw):
    lay = kvt.KVLayout.vllm_flash(num_layers=2, num_blocks=16, block_size=16, num_kv_heads=2,
                                  head_dim=64, dtype="float16")
    rx = kvt.KVReceiver(d, kvt.KVCache.allocate(lay), **rx_kw)
    tx = kvt.KVSender(p, kvt.KVCache.allocate(lay))
    return lay, rx, tx


def test_a_layout_mismatch_names_both_layouts(eps):
    d, p = eps
    _, rx, tx = _simple(d, p)
    other = kvt.KVLayout.vllm_flash(num_layers=3, num_blocks=16, block_size=16, num_kv_heads=2,
                                    head_dim=64, dtype="float16")
    tx2 = kvt.KVSender(p, kvt.KVCache.allocate(other))
    try:
        with pytest.raises(kvt.InvalidRequestError, match="num_layers=3.*num_layers=2|num_layers"):
            tx2.send("mismatch", [0], rx.expect("mismatch", [1]))
    finally:
        for x in (rx, tx, tx2):
            x.close()


def test_a_request_that_never_completes_fails_at_its_deadline_with_its_blocks(eps):
    d, p = eps
    _, rx, tx = _simple(d, p)
    try:
        ticket = rx.expect("late", [4, 5, 6], timeout=0.3)
        s = tx.stream("late", [0, 1, 2], ticket)
        s.send_layers(0)  # layer 1 never comes
        t0 = time.monotonic()
        with pytest.raises(kvt.RequestFailed) as exc:
            rx.wait("late", timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert exc.value.failed_blocks == [4, 5, 6]
        assert isinstance(exc.value, kvt.TransportError)
    finally:
        rx.close()
        tx.close()


def test_cancel_refuses_the_request_and_its_late_bytes_never_land(eps):
    d, p = eps
    d2 = kvt.Endpoint("decode-slow", faults="arrival_delay_ms=50")
    lay, rx, _ = _simple(d2, p)
    tx = kvt.KVSender(kvt.Endpoint("prefill-delayed", faults="delay_ms=200"),
                      kvt.KVCache.allocate(lay))
    try:
        for i in range(len(tx.cache.regions())):
            tx.cache.buffer_view(i)[:] = 7
        s = tx.send("gone", [0, 1, 2, 3], rx.expect("gone", [8, 9, 10, 11]))
        rx.cancel("gone")
        with pytest.raises(kvt.KVTransferError):
            s.wait(5)
        time.sleep(0.3)
        for i in range(len(rx.cache.regions())):
            assert not rx.cache.buffer_view(i).any(), "a cancelled request's bytes landed"
        with pytest.raises(kvt.InvalidRequestError, match="not expected"):
            rx.wait("gone", 1)
    finally:
        rx.close()
        tx.close()
        tx.ep.close()
        d2.close()


def test_a_killed_sender_fails_the_request_not_the_receiver(eps):
    d, _ = eps
    p2 = kvt.Endpoint("prefill-doomed", faults="delay_ms=300")
    lay, rx, _ = _simple(d, p2)
    tx = kvt.KVSender(p2, kvt.KVCache.allocate(lay))
    try:
        tx.send("orphan", [0, 1], rx.expect("orphan", [2, 3]))
        time.sleep(0.05)
        p2.close()  # the initiator goes away with the request in flight
        with pytest.raises(kvt.RequestFailed) as exc:
            rx.wait("orphan", timeout=5)
        assert exc.value.failed_blocks == [2, 3]
        assert rx.failed() == {} and rx.finished() == []
    finally:
        rx.close()

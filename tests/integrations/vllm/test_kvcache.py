"""The vLLM connector's KVLayout derivation from vLLM's KV tensors (torch only, no vLLM):
the CPU backend's per-layer tensors become one region whose whole blocks move intact, and any
other shape is refused with a clear error."""

import pytest

torch = pytest.importorskip("torch")

import kvtransfer as kvt  # noqa: E402
from kvtransfer.integrations.vllm.kvcache import (  # noqa: E402
    cache_from_kv_caches,
    layout_from_kv_caches,
)
from kvtransfer.planner import apply_plan, plan_transfer  # noqa: E402

L, NB, H, BS, D = 4, 64, 2, 32, 64


def cpu_caches(dtype=torch.float32, fill=False, nb=NB):
    """As vLLM CPU allocates them: one buffer, per layer a [nb, H, BS, 2D] view."""
    per_layer = nb * H * BS * 2 * D
    buf = torch.zeros(L * per_layer, dtype=dtype)
    if fill:
        buf.copy_(torch.randn(buf.shape).to(dtype))
    return buf, {f"model.layers.{i}.self_attn.attn": buf[i * per_layer:(i + 1) * per_layer]
                 .view(nb, H, BS, 2 * D) for i in range(L)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_tensors_make_one_region_and_whole_blocks_move_intact(dtype):
    sbuf, src = cpu_caches(dtype, fill=True)
    dbuf, dst = cpu_caches(dtype)
    layout = layout_from_kv_caches(src, NB, BS)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (L, H, D)
    assert layout.dtype == str(dtype).removeprefix("torch.")
    s, d = cache_from_kv_caches(src, NB, BS), cache_from_kv_caches(dst, NB, BS)
    assert len(s.regions()) == 1 and s.nbytes == sbuf.numel() * sbuf.element_size()

    sb, db = [3, 4, 5, 9], [40, 7, 8, 63]
    plan = plan_transfer(s, d, sb, db)
    assert plan.nbytes == L * len(sb) * H * BS * 2 * D * sbuf.element_size()
    apply_plan(plan, [s.buffer_view(0)], [d.buffer_view(0)])
    sv, dv = sbuf.view(L, NB, -1), dbuf.view(L, NB, -1)
    assert torch.equal(sv[:, sb], dv[:, db])  # every byte of every block, K and V alike
    untouched = sorted(set(range(NB)) - set(db))
    assert not dv[:, untouched].any()


def test_servers_with_other_pool_sizes_are_compatible_and_descriptors_round_trip():
    a = cache_from_kv_caches(cpu_caches()[1], NB, BS)
    b = cache_from_kv_caches(cpu_caches(nb=2 * NB)[1], 2 * NB, BS)
    desc = kvt.CacheDescriptor.from_bytes(a.descriptor().to_bytes())
    assert desc == a.descriptor()
    b.layout.check_compatible(desc.layout)
    other = cache_from_kv_caches(cpu_caches(torch.bfloat16)[1], NB, BS)
    with pytest.raises(kvt.InvalidRequestError, match="dtype"):
        other.layout.check_compatible(desc.layout)


@pytest.mark.parametrize("case, match", [
    ("flash", "unsupported vLLM KV-cache tensor"),
    ("block_size", "block_size=16"),
    ("odd_last", "unsupported"),
    ("non_contiguous", "unsupported"),
    ("mixed", "differ"),
    ("empty", "no KV-cache tensors"),
])
def test_unsupported_tensors_are_refused_with_the_shape_and_what_is_supported(case, match):
    _, caches = cpu_caches()
    if case == "flash":  # GPU flash-attn's [2, num_blocks, block_size, H, D]
        caches = {k: torch.zeros(2, NB, BS, H, D) for k in caches}
    elif case == "block_size":
        with pytest.raises(ValueError, match=match):
            layout_from_kv_caches(caches, NB, 16)
        return
    elif case == "odd_last":
        caches = {k: torch.zeros(NB, H, BS, 2 * D + 1) for k in caches}
    elif case == "non_contiguous":
        caches = {k: torch.zeros(NB, BS, H, 2 * D).transpose(1, 2) for k in caches}
    elif case == "mixed":
        first = next(iter(caches))
        caches[first] = caches[first].to(torch.bfloat16)
    elif case == "empty":
        caches = {}
    with pytest.raises(ValueError, match=match) as exc:
        layout_from_kv_caches(caches, NB, BS)
    if case in ("flash", "odd_last", "non_contiguous"):
        assert "supported: vLLM CPU" in str(exc.value)
        assert str(tuple(next(iter(caches.values())).shape)) in str(exc.value)


def test_the_kv_layer_calls_the_connector_polls_with():
    """KVSender.fetched: a non-blocking wait_fetched, True once; KVReceiver.fetch that cannot
    reach the prefill raises and leaves no request behind (so the connector's own load error is
    the only report, and a retry is not refused as "already expected")."""
    import time

    src = cache_from_kv_caches(cpu_caches(fill=True)[1], NB, BS)
    dst = cache_from_kv_caches(cpu_caches()[1], NB, BS)
    with kvt.Endpoint("prefill", timeout=3) as p, kvt.Endpoint("decode", timeout=3) as d:
        tx, rx = kvt.KVSender(p, src), kvt.KVReceiver(d, dst)
        ticket = tx.offer("req", [1, 2])
        assert not tx.fetched("req")
        rx.fetch("req", ticket, [3, 4])
        rx.wait("req", timeout=5)
        deadline = time.monotonic() + 5
        while not tx.fetched("req"):
            assert time.monotonic() < deadline, "the pulled note never came"
            time.sleep(0.005)
        assert not tx.fetched("req")  # reported once
        orphan = tx.offer("orphan", [5])
        tx.close()
        rx.close()
    with kvt.Endpoint("decode-2", timeout=3) as d2:
        rx2 = kvt.KVReceiver(d2, dst)
        with pytest.raises(kvt.TransportError):
            rx2.fetch("orphan", orphan, [6])
        with pytest.raises(kvt.InvalidRequestError, match="not expected"):
            rx2.wait("orphan", timeout=0.1)
        assert rx2.failed() == {} and rx2.finished() == []
        rx2.close()

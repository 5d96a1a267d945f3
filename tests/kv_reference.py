"""Test helpers: KV caches filled with random bits, and the plain-numpy reference of a transfer.

The reference never uses the layout's plane table or strides: it indexes the tensors the way a
serving framework does (``kv[layer][part, block, token, head]`` for vLLM FlashAttention, ...), so
a planner that agrees with it agrees with the frameworks.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from kvtransfer.cache import KVCache
from kvtransfer.layout import NUMPY_STORAGE, KVLayout

# The raw-bits dtype used to compare values (floats may be NaN).
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def make_tensors(layout: KVLayout, rng: np.random.Generator, shared: bool) -> list[np.ndarray]:
    """The layout's tensors, random bits, with exactly the layout's strides: views of one
    allocation (shared=True, like vLLM CPU) or one allocation each."""
    dtype = np.dtype(NUMPY_STORAGE[layout.dtype])
    strides = tuple(s * layout.itemsize for s in layout.tensor_strides)
    n = layout.tensor_nbytes
    big = rng.integers(0, 256, size=n * layout.num_tensors, dtype=np.uint8) if shared else None
    out = []
    for i in range(layout.num_tensors):
        buf = big if shared else rng.integers(0, 256, size=n, dtype=np.uint8)
        out.append(np.ndarray(layout.tensor_shape, dtype=dtype, buffer=buf,
                              offset=i * n if shared else 0, strides=strides))
    return out


def plane_view(layout: KVLayout, tensors: list[np.ndarray], layer: int, part: int) -> np.ndarray:
    """(num_blocks, block_size, num_kv_heads, head_dim) raw bits of one layer's K or V, indexed
    the framework's way for each preset."""
    kind, L = layout.kind, layout.num_layers
    if kind == "vllm_flash":
        v = tensors[layer][part]
    elif kind == "vllm_flashinfer":
        v = tensors[layer][:, part]
    elif kind == "vllm_cross_layer":
        v = tensors[0][:, layer, part]
    elif kind == "sglang_mha":
        t = tensors[part * L + layer]
        v = t.reshape(layout.num_blocks, layout.block_size, *t.shape[1:])
    elif kind == "mla":
        v = tensors[layer][:, :, None, :]
    elif layout.dims == "BHT(KD)":  # vLLM CPU: K and V concatenated in the last dimension
        t = tensors[layer]
        v = t.reshape(*t.shape[:3], 2, layout.head_dim)[:, :, :, part].transpose(0, 2, 1, 3)
    else:
        v = _generic_view(layout, tensors, layer, part)
    return v.view(_BITS[layout.itemsize])


def _generic_view(layout: KVLayout, tensors: list[np.ndarray], layer: int,
                  part: int) -> np.ndarray:
    """For custom layouts whose dims have no parentheses: index by letter."""
    dims = layout.dims
    assert "(" not in dims, dims
    t = tensors[layout.tensor_index(layer, part)]
    index = []
    for c in dims:
        index.append(layer if c == "L" else part if c == "K" else slice(None))
    v = t[tuple(index)]
    rest = [c for c in dims if c not in "LK"]
    if "H" not in rest:
        v = v[..., None]
        rest.append("H")
    return v.transpose([rest.index(c) for c in "BTHD"])


def expected_after(src_layout: KVLayout, src: list[np.ndarray], dst_layout: KVLayout,
                   dst: list[np.ndarray], src_blocks, dst_blocks, layers: range,
                   heads: tuple[int, int, int] | None, num_tokens: int) -> list[np.ndarray]:
    """Per (layer, part) of dst, its (blocks, tokens, heads, dim) array after the transfer."""
    sb = np.asarray(src_blocks, dtype=np.int64)
    db = np.asarray(dst_blocks, dtype=np.int64)
    p = np.arange(num_tokens)
    s_blk, s_tok = sb[p // src_layout.block_size], p % src_layout.block_size
    d_blk, d_tok = db[p // dst_layout.block_size], p % dst_layout.block_size
    if heads is None:
        hs, nh, hd = 0, src_layout.num_kv_heads, 0
    else:
        hs, nh, hd = heads
    out = []
    for layer in range(dst_layout.num_layers):
        for part in range(dst_layout.kv_parts):
            want = plane_view(dst_layout, dst, layer, part).copy()
            if layer in layers:
                got = plane_view(src_layout, src, layer, part)
                want[d_blk, d_tok, hd:hd + nh] = got[s_blk, s_tok, hs:hs + nh]
            out.append(want)
    return out


def actual(layout: KVLayout, tensors: list[np.ndarray]) -> list[np.ndarray]:
    return [plane_view(layout, tensors, layer, part)
            for layer in range(layout.num_layers) for part in range(layout.kv_parts)]


def buffers(cache: KVCache) -> list[np.ndarray]:
    return [cache.buffer_view(i) for i in range(len(cache.regions()))]


MHA_KINDS = ["flash_nhd", "flash_hnd", "flashinfer_nhd", "flashinfer_hnd", "cross_nhd",
             "cross_hnd", "sglang", "cpu", "custom"]


def build(kind: str, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
          head_dim: int, dtype: str, order: str = "BKHTD") -> KVLayout:
    kw = dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
              num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    if kind.startswith("flash_"):
        return KVLayout.vllm_flash(**kw, kv_order=kind[-3:].upper())
    if kind.startswith("flashinfer_"):
        return KVLayout.vllm_flashinfer(**kw, kv_order=kind[-3:].upper())
    if kind.startswith("cross_"):
        return KVLayout.vllm_cross_layer(**kw, kv_order=kind[-3:].upper())
    if kind == "sglang":
        return KVLayout.sglang_mha(num_layers=num_layers, num_tokens=num_blocks * block_size,
                                   page_size=block_size, num_kv_heads=num_kv_heads,
                                   head_dim=head_dim, dtype=dtype)
    if kind == "cpu":  # vLLM CPU: per layer (num_blocks, heads, block_size, 2 * head_dim)
        return KVLayout("BHT(KD)", **kw)
    assert kind == "custom"
    return KVLayout("KBTHD", order=order, **kw)


@st.composite
def block_table(draw, num_blocks: int, n: int) -> list[int]:
    """n distinct ids: random, sequential, or runs of sequential ids."""
    mode = draw(st.sampled_from(["random", "sequential", "runs"]))
    if mode == "sequential":
        start = draw(st.integers(0, num_blocks - n))
        return list(range(start, start + n))
    perm = draw(st.permutations(range(num_blocks)))
    if mode == "random":
        return list(perm[:n])
    out: list[int] = []  # take ids in order from the permutation, stretched into runs
    used = set()
    for b in perm:
        while len(out) < n and b < num_blocks and b not in used:
            out.append(b)
            used.add(b)
            b += 1
        if len(out) == n:
            break
    return out

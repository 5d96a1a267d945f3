"""vLLM's KV-cache tensors as a kvtransfer :class:`~kvtransfer.KVLayout` (no vLLM import).

The layout is derived from the tensors vLLM hands to ``register_kv_caches`` (shape, strides,
dtype, device), not from a backend name, and checked against the engine's ``num_blocks`` and
``block_size``. Supported today:

- vLLM CPU (``cpu_attn``): per layer ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``,
  contiguous, all layers views of one buffer. Described as ``KVLayout("BHT(KD)", ...)``. Inside
  a (block, head) page vLLM stores K in a kernel-specific order then V, so the token/K/V
  positions this layout names are not where vLLM keeps them: only *whole* blocks between two
  caches of this same layout are meaningful, and that is all the connector moves (equal block
  sizes on both sides, never a token slice; one block of one layer is one contiguous run).

Anything else raises ``ValueError`` naming the shape and what is supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvtransfer import KVCache, KVLayout

SUPPORTED = ("vLLM CPU: per layer [num_blocks, num_kv_heads, block_size, 2*head_size], "
             "contiguous, on the host")


def layout_from_kv_caches(kv_caches: Mapping[str, Any], num_blocks: int,
                          block_size: int) -> KVLayout:
    """The KVLayout of vLLM's per-layer KV tensors (``{layer name: tensor}``, in layer order)."""
    if not kv_caches:
        raise ValueError("vLLM registered no KV-cache tensors")
    name, first = next(iter(kv_caches.items()))
    shape = tuple(int(n) for n in first.shape)
    for other, t in kv_caches.items():
        if tuple(t.shape) != shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"KV-cache tensors differ: {name} is {shape} {first.dtype} on "
                             f"{first.device}, {other} is {tuple(t.shape)} {t.dtype} on "
                             f"{t.device}")
    if first.device.type != "cpu":
        raise ValueError(f"{name} is on {first.device}: the vLLM connector moves host memory "
                         f"only for now (supported: {SUPPORTED})")
    if (len(shape) != 4 or shape[0] != num_blocks or shape[2] != block_size
            or shape[3] % 2 or not first.is_contiguous()):
        raise ValueError(
            f"unsupported vLLM KV-cache tensor {name}: shape {shape}, strides "
            f"{tuple(first.stride())}, with num_blocks={num_blocks}, block_size={block_size} "
            f"(supported: {SUPPORTED})")
    return KVLayout("BHT(KD)", num_layers=len(kv_caches), num_blocks=num_blocks,
                    block_size=block_size, num_kv_heads=shape[1], head_dim=shape[3] // 2,
                    dtype=first.dtype)


def cache_from_kv_caches(kv_caches: Mapping[str, Any], num_blocks: int,
                         block_size: int) -> KVCache:
    """A KVCache over vLLM's tensors (views of one buffer become one region)."""
    return KVCache(layout_from_kv_caches(kv_caches, num_blocks, block_size),
                   list(kv_caches.values()))

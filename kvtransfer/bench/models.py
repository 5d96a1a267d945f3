"""Model-shaped workloads: the KV bytes a real model produces per token, moved the way a paged
cache holds them (one segment per layer, K/V part and block), scaled down to this machine."""

from __future__ import annotations

from dataclasses import dataclass

from .harness import Workload

BLOCK_TOKENS = 16
DEFAULT_CAP_BYTES = 1 << 30  # per side; the reason is printed with the result


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    kv_heads: int  # 0 for MLA
    head_dim: int  # for MLA: kv_lora_rank + rope_dim
    dtype_bytes: int = 2

    @property
    def parts(self) -> int:
        return 1 if self.kv_heads == 0 else 2  # MLA: one latent; MHA/GQA: K and V

    @property
    def bytes_per_token(self) -> int:
        return self.parts * self.layers * max(1, self.kv_heads) * self.head_dim * self.dtype_bytes

    @property
    def segment_bytes(self) -> int:
        """One block of one layer's K (or V, or latent)."""
        return BLOCK_TOKENS * max(1, self.kv_heads) * self.head_dim * self.dtype_bytes


MODELS = {
    m.name: m for m in (
        ModelShape("llama-3.1-8b", 32, 8, 128),
        ModelShape("llama-3.1-70b", 80, 8, 128),
        ModelShape("qwen2.5-32b", 64, 8, 128),
        ModelShape("deepseek-v3", 61, 0, 512 + 64),
    )
}


def model_workload(model: str, prompt_tokens: int, cap_bytes: int = DEFAULT_CAP_BYTES,
                   reps: int = 5) -> tuple[Workload, str]:
    """The workload of one prompt's KV cache, and a note saying how it was scaled."""
    shape = MODELS[model]
    full = prompt_tokens * shape.bytes_per_token
    tokens = prompt_tokens
    note = ""
    if full > cap_bytes:
        tokens = max(BLOCK_TOKENS, cap_bytes // shape.bytes_per_token // BLOCK_TOKENS
                     * BLOCK_TOKENS)
        note = (f"{prompt_tokens} tokens = {full / 2**30:.1f} GiB; scaled to {tokens} tokens "
                f"({tokens * shape.bytes_per_token / 2**30:.2f} GiB) to fit this machine")
    blocks = -(-tokens // BLOCK_TOKENS)
    w = Workload(shape.segment_bytes, blocks * shape.layers * shape.parts, "random", reps=reps,
                 name=f"{model}@{prompt_tokens}")
    return w, note

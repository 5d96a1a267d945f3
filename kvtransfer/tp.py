"""Heterogeneous tensor parallelism: which prefill ranks hold which KV heads of a decode rank.

Heads are sharded the way vLLM shards them: with ``tp <= num_kv_heads`` rank ``r`` holds heads
``[r * n, (r + 1) * n)`` with ``n = num_kv_heads // tp``; with ``tp > num_kv_heads`` every head is
replicated on ``tp // num_kv_heads`` consecutive ranks and rank ``r`` holds head
``r // (tp // num_kv_heads)``. An MLA latent has no head split: describe it with
``num_kv_heads=1`` and every rank holds it whole.

:func:`head_sources` lists, for one decode rank, the prefill ranks to read its heads from; when
prefill replicates a head, decode ranks are spread over the replicas. Pass a slice to
``plan_transfer(..., heads=slice)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequestError


@dataclass(frozen=True, order=True)
class HeadSlice:
    """Heads ``[src_head, src_head + num_heads)`` of prefill rank ``src_rank`` (local indices)
    land at ``[dst_head, dst_head + num_heads)`` of the decode rank (local indices)."""

    src_rank: int
    src_head: int
    dst_head: int
    num_heads: int


def _check(num_kv_heads: int, tp: int, what: str) -> None:
    if num_kv_heads <= 0 or tp <= 0:
        raise InvalidRequestError(
            f"{what}: num_kv_heads={num_kv_heads} and tp={tp} must be positive")
    if tp <= num_kv_heads and num_kv_heads % tp:
        raise InvalidRequestError(
            f"{what}: {num_kv_heads} KV heads cannot be split evenly over tp={tp}")
    if tp > num_kv_heads and tp % num_kv_heads:
        raise InvalidRequestError(
            f"{what}: tp={tp} is not a multiple of the {num_kv_heads} KV heads to replicate")


def heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """KV heads each rank holds (1 when heads are replicated)."""
    _check(num_kv_heads, tp, "heads_per_rank")
    return max(1, num_kv_heads // tp)


def rank_heads(num_kv_heads: int, tp: int, rank: int) -> range:
    """The global KV head ids rank ``rank`` of a ``tp``-way group holds."""
    _check(num_kv_heads, tp, "rank_heads")
    if not 0 <= rank < tp:
        raise InvalidRequestError(f"rank {rank} is outside tp={tp}")
    if tp <= num_kv_heads:
        n = num_kv_heads // tp
        return range(rank * n, (rank + 1) * n)
    head = rank // (tp // num_kv_heads)
    return range(head, head + 1)


def head_sources(num_kv_heads: int, prefill_tp: int, decode_tp: int,
                 decode_rank: int) -> list[HeadSlice]:
    """Where decode rank ``decode_rank`` gets each of its heads: one HeadSlice per prefill rank
    it reads from, in head order; together they cover its heads exactly once."""
    _check(num_kv_heads, prefill_tp, "prefill")
    wanted = rank_heads(num_kv_heads, decode_tp, decode_rank)
    per_src = max(1, num_kv_heads // prefill_tp)
    replicas = max(1, prefill_tp // num_kv_heads)
    out: list[HeadSlice] = []
    for head in wanted:
        group = head // per_src  # prefill ranks group*replicas + [0, replicas) hold this head
        src_rank = group * replicas + decode_rank % replicas
        src_head = head - group * per_src
        dst_head = head - wanted.start
        last = out[-1] if out else None
        if (last is not None and last.src_rank == src_rank
                and last.src_head + last.num_heads == src_head
                and last.dst_head + last.num_heads == dst_head):
            out[-1] = HeadSlice(src_rank, last.src_head, last.dst_head, last.num_heads + 1)
        else:
            out.append(HeadSlice(src_rank, src_head, dst_head, 1))
    return out


def head_targets(num_kv_heads: int, prefill_tp: int, decode_tp: int,
                 prefill_rank: int) -> list[tuple[int, HeadSlice]]:
    """What prefill rank ``prefill_rank`` sends: (decode rank, HeadSlice) pairs, the inverse of
    :func:`head_sources`."""
    if not 0 <= prefill_rank < prefill_tp:
        raise InvalidRequestError(f"prefill rank {prefill_rank} is outside tp={prefill_tp}")
    return [(d, s) for d in range(decode_tp)
            for s in head_sources(num_kv_heads, prefill_tp, decode_tp, d)
            if s.src_rank == prefill_rank]


def total_heads(layout, tp_size: int, total_kv_heads: int | None = None) -> int:
    """The model's KV head count as the TP mapping sees it: 1 for MLA (one latent, copied whole
    to every rank), else ``total_kv_heads`` or, by default, the layout's per-rank heads times
    ``tp_size`` (pass ``total_kv_heads`` when heads are replicated, tp > heads)."""
    if getattr(layout, "kind", "") == "mla":
        return 1
    return int(total_kv_heads) if total_kv_heads else layout.num_kv_heads * tp_size


def slices_between(num_kv_heads: int, prefill_tp: int, prefill_rank: int, decode_tp: int,
                   decode_rank: int) -> tuple[list[HeadSlice], int]:
    """(what prefill rank sends to decode rank, how many prefill ranks feed that decode rank)."""
    sources = head_sources(num_kv_heads, prefill_tp, decode_tp, decode_rank)
    mine = [s for s in sources if s.src_rank == prefill_rank]
    return mine, len({s.src_rank for s in sources})

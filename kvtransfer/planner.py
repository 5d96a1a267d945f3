"""Block tables -> coalesced ``(src_off, dst_off, len)`` segments, grouped by buffer pair.

Both sides are described as buffers and planes (see :mod:`kvtransfer.cache`). The C++ planner
walks the request's tokens once per distinct geometry (not per block in Python), merges runs
that are adjacent on both sides (a sequential block table becomes one segment per plane; a
cross-layer layout moves all layers of a block run as one segment) and replicates the pattern
over planes by adding each plane's offsets. Offsets are relative to each side's buffer, so a
group's segments go straight to ``ep.write(peer, src_region[g.src_buffer],
dst_region_id[g.dst_buffer], g.segments)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from . import _core
from .cache import CacheDescriptor, KVCache
from .errors import InvalidRequestError
from .tp import HeadSlice


class PlanGroup(NamedTuple):
    """The segments between one source buffer and one destination buffer."""

    src_buffer: int
    dst_buffer: int
    segments: np.ndarray  # int64 [N, 3] = (src_off, dst_off, len), offsets inside the buffers

    @property
    def nbytes(self) -> int:
        return int(self.segments[:, 2].sum())


class TransferPlan:
    """The result of :func:`plan_transfer`: ``groups`` (one per buffer pair, each one
    ``ep.write``), ``segments`` (all of them, int64 [N, 3], group after group), ``group_table``
    (int64 [G, 4] = (src_buffer, dst_buffer, first row, end row)) and ``nbytes``."""

    def __init__(self, segments: np.ndarray, groups: np.ndarray, nbytes: int):
        self.segments = segments
        self.group_table = groups
        self.nbytes = int(nbytes)
        self._groups: list[PlanGroup] | None = None

    @property
    def groups(self) -> list[PlanGroup]:
        if self._groups is None:
            segs = self.segments
            self._groups = [PlanGroup(s, d, segs[b:e]) for s, d, b, e in self.group_table.tolist()]
        return self._groups

    def __iter__(self) -> Iterator[PlanGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.segments)

    def __repr__(self) -> str:
        return (f"TransferPlan({len(self.segments)} segments in {len(self.group_table)} "
                f"group(s), {self.nbytes} bytes)")


def _describe(side: Any, name: str) -> CacheDescriptor:
    if isinstance(side, CacheDescriptor):
        return side
    if isinstance(side, KVCache):
        return side.descriptor()
    raise InvalidRequestError(
        f"{name} must be a KVCache or CacheDescriptor, got {type(side).__name__}")


def _heads(heads: Any) -> tuple[int, int, int]:
    if heads is None:
        return 0, -1, 0
    if isinstance(heads, HeadSlice):
        return heads.src_head, heads.num_heads, heads.dst_head
    try:
        src_head, num_heads, dst_head = (int(v) for v in heads)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(
            f"heads must be None, a tp.HeadSlice or (src_head, num_heads, dst_head), got {heads!r}"
        ) from e
    if num_heads < 0:
        raise InvalidRequestError(f"heads {heads!r}: num_heads must not be negative")
    return src_head, num_heads, dst_head


def plan_transfer(src: KVCache | CacheDescriptor, dst: KVCache | CacheDescriptor,
                  src_blocks: Any, dst_blocks: Any, *, layers: Any = None, heads: Any = None,
                  num_tokens: int | None = None) -> TransferPlan:
    """Plans moving a request's blocks from ``src`` to ``dst``.

    - ``src_blocks`` / ``dst_blocks``: block ids in token order (sequence or int64 array).
    - ``layers``: None (all), an int, a step-1 range or (begin, end).
    - ``heads``: None (all heads; both sides must hold the same count), a
      :class:`kvtransfer.tp.HeadSlice`, or ``(src_head, num_heads, dst_head)``: source heads
      ``[src_head, src_head + num_heads)`` land at ``[dst_head, ...)`` on the destination.
    - ``num_tokens``: token slots to move from slot 0 of the first block; by default every
      slot (equal block sizes: the lists must be equally long) or, with different block sizes,
      the smaller side's capacity. Each list must hold exactly ceil(num_tokens / block_size) ids.

    Raises InvalidRequestError for incompatible layouts (naming both), block ids out of range,
    mismatched list lengths, head or layer ranges outside a side.
    """
    s, d = _describe(src, "src"), _describe(dst, "dst")
    s.layout.check_compatible(d.layout)
    plane_begin, plane_end = s.layout.layer_planes(layers)
    src_head, num_heads, dst_head = _heads(heads)
    segs, groups, nbytes = _core.plan_segments(
        s.plane_set(), d.plane_set(), np.asarray(src_blocks, dtype=np.int64).reshape(-1),
        np.asarray(dst_blocks, dtype=np.int64).reshape(-1), plane_begin, plane_end, src_head,
        num_heads, dst_head, -1 if num_tokens is None else int(num_tokens))
    return TransferPlan(segs, groups, nbytes)


def apply_plan(plan: TransferPlan, src_buffers: list[np.ndarray],
               dst_buffers: list[np.ndarray]) -> None:
    """Copies a plan's bytes between host buffers (uint8 arrays, one per buffer index) without a
    network: the reference a transport must agree with, and the test oracle's other half."""
    for g in plan.groups:
        segs = g.segments
        if not len(segs):
            continue
        src, dst = src_buffers[g.src_buffer], dst_buffers[g.dst_buffer]
        if len(segs) <= 256:
            for so, do, n in segs.tolist():
                dst[do:do + n] = src[so:so + n]
            continue
        lens = segs[:, 2]
        total = int(lens.sum())
        # Byte k of segment i sits at start_i + (k - first byte index of segment i).
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        within = np.arange(total, dtype=np.int64) - starts
        dst[np.repeat(segs[:, 1], lens) + within] = src[np.repeat(segs[:, 0], lens) + within]

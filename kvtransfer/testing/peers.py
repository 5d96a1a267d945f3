"""Bodies of the child processes the suites run as real peers (spawned, so importable).

Each takes the parent's end of a Pipe first and ``ep_kwargs``: the keyword arguments of
kvtransfer.Endpoint that select the transport under test.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import kvtransfer as kvt


def pattern(seed: int, nbytes: int) -> np.ndarray:
    """Deterministic bytes that differ per seed, so stale data never verifies."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def block_segments(src_blocks, dst_blocks, block_bytes: int) -> np.ndarray:
    """(src_off, dst_off, len) rows moving whole blocks."""
    src = np.asarray(src_blocks, dtype=np.int64)
    dst = np.asarray(dst_blocks, dtype=np.int64)
    return np.stack([src * block_bytes, dst * block_bytes,
                     np.full(len(src), block_bytes, dtype=np.int64)], axis=1)


def run_target(conn, ep_kwargs: dict[str, Any], nbytes: int, n_expected: int,
               timeout: float = 20.0, listen: str = "127.0.0.1:0") -> None:
    """Registers nbytes for remote writes and reads, sends (info, region id), then for each
    message (payload, seed, block_bytes, dst_blocks) from the parent waits for that notification
    and checks the blocks hold pattern(seed) in table order; reports each result back."""
    with kvt.Endpoint("decode-proc", listen=listen, timeout=timeout, **ep_kwargs) as ep:
        buf = np.zeros(nbytes, np.uint8)
        region = ep.register(buf, remote_write=True, remote_read=True)
        conn.send((ep.info(), region.id))
        for _ in range(n_expected):
            payload, seed, block_bytes, dst_blocks = conn.recv()
            try:
                ep.wait_notification(payload, timeout=timeout)
            except kvt.KVTransferError as e:
                conn.send(("error", type(e).__name__, str(e), time.monotonic()))
                continue
            expected = pattern(seed, len(dst_blocks) * block_bytes).reshape(-1, block_bytes)
            got = buf.reshape(-1, block_bytes)[np.asarray(dst_blocks)]
            conn.send(("ok", bool((got == expected).all()), ep.stats()["inbound_done"]))
        conn.recv()  # the parent says when to stop


def run_initiator(conn, ep_kwargs: dict[str, Any], info: bytes, region_id: int,
                  block_bytes: int, n_blocks: int, dst_blocks, payload: bytes, seed: int,
                  repeat: int = 1, timeout: float = 20.0) -> None:
    """Writes pattern(seed) block i -> dst_blocks[i] `repeat` times (the last one notifies
    `payload`); reports each result."""
    with kvt.Endpoint("prefill-proc", timeout=timeout, **ep_kwargs) as ep:
        src = pattern(seed, n_blocks * block_bytes)
        region = ep.register(src)
        peer = ep.connect(info)
        segs = block_segments(np.arange(n_blocks), dst_blocks, block_bytes)
        conn.send("connected")
        for i in range(repeat):
            t0 = time.perf_counter()
            x = ep.write(peer, region, region_id, segs,
                         notify=payload if i == repeat - 1 else None)
            try:
                x.wait(timeout)
                conn.send(("done", time.perf_counter() - t0))
            except kvt.KVTransferError as e:
                conn.send(("error", type(e).__name__, str(e), time.monotonic()))
        conn.recv()

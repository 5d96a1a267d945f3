"""Completion contract: every byte lands, the notification comes exactly once and only after
the data, for writes and reads, for every segment shape a KV cache produces."""

from __future__ import annotations

import mmap
import threading
import time

import numpy as np
import pytest

import kvtransfer as kvt
from kvtransfer.testing.peers import block_segments, pattern
from kvtransfer.testing.plugin import require


def _pair(endpoint, nbytes: int, **kw):
    target, initiator = endpoint("decode", **kw), endpoint("prefill", **kw)
    dst = np.zeros(nbytes, np.uint8)
    src = pattern(1, nbytes)
    rd = target.register(dst, remote_write=True, remote_read=True)
    rs = initiator.register(src)
    return target, initiator, initiator.connect(target.info()), rs, rd, src, dst


def test_notification_arrives_exactly_once_and_after_all_data(endpoint):
    n, chunk, pieces = 100, 256 << 10, 32
    target, initiator, peer, rs, rd, src, dst = _pair(endpoint, n * chunk)
    piece = chunk // pieces
    for i in range(n):
        order = np.random.default_rng(i).permutation(pieces) * piece + i * chunk
        segs = np.stack([order, order, np.full(pieces, piece)], axis=1)
        initiator.write(peer, rs, rd.id, segs, notify=b"t%d" % i)
    for i in range(n):
        target.wait_notification(b"t%d" % i, timeout=10)
        lo, hi = i * chunk, (i + 1) * chunk
        assert np.array_equal(dst[lo:hi], src[lo:hi]), f"notified before transfer {i} landed"
    assert target.notifications() == []
    with pytest.raises(kvt.TimeoutError):
        target.wait_notification(b"t0", timeout=0.1)


def test_a_spinning_waiter_gets_the_same_data_and_completions(endpoint):
    """wait_notification(spin=) may read inbound data on the waiter's own thread (TCP, cma):
    small writes and a large one still land whole, notify once, and complete at the initiator."""
    bs, n = 64 << 10, 40
    target, initiator, peer, rs, rd, src, dst = _pair(endpoint, 8 << 20)
    seen: list[bytes] = []

    def wait_all() -> None:
        for tag in [b"s%d" % i for i in range(n)] + [b"big"]:
            seen.append(target.wait_notification(tag, timeout=10, spin=10).payload)

    waiter = threading.Thread(target=wait_all)
    waiter.start()
    for i in range(n):
        time.sleep(0.001)  # the waiter is spinning by now
        initiator.write(peer, rs, rd.id, [[i * bs, i * bs, bs]], notify=b"s%d" % i).wait(10)
    initiator.write(peer, rs, rd.id, [[0, 0, 8 << 20]], notify=b"big").wait(10)
    waiter.join(20)
    assert seen == [b"s%d" % i for i in range(n)] + [b"big"]
    assert np.array_equal(dst, src)


def test_write_then_read_back_round_trips(endpoint, caps):
    require(caps, "rdma_read")
    bs, n = 32 << 10, 64
    target, initiator, peer, rs, rd, src, dst = _pair(endpoint, bs * n)
    perm = np.random.default_rng(5).permutation(n)
    initiator.write(peer, rs, rd.id, block_segments(range(n), perm, bs)).wait(10)
    back = np.zeros_like(src)
    rb = initiator.register(back)
    initiator.read(peer, rb, rd.id, block_segments(perm, range(n), bs), notify=b"read").wait(10)
    assert target.wait_notification(b"read", timeout=5).payload == b"read"
    assert np.array_equal(back, src)


def test_zero_length_and_one_byte_segments(endpoint):
    target, initiator, peer, rs, rd, src, dst = _pair(endpoint, 4096)
    segs = [[0, 0, 0], [1, 3, 1], [4095, 4095, 1], [10, 10, 0], [2, 100, 1]]
    initiator.write(peer, rs, rd.id, segs, notify=b"tiny").wait(5)
    target.wait_notification(b"tiny", timeout=5)
    expect = np.zeros(4096, np.uint8)
    expect[3], expect[4095], expect[100] = src[1], src[4095], src[2]
    assert np.array_equal(dst, expect)
    initiator.write(peer, rs, rd.id, np.zeros((0, 3), np.int64), notify=b"none").wait(5)
    target.wait_notification(b"none", timeout=5)


def test_unaligned_offsets_and_lengths(endpoint):
    target, initiator, peer, rs, rd, src, dst = _pair(endpoint, 1 << 20)
    rng = np.random.default_rng(3)
    n = 500
    lens = rng.integers(1, 777, n)
    dst_off = np.cumsum(np.concatenate([[13], lens[:-1] + 3]))
    src_off = rng.integers(0, (1 << 20) - 800, n)
    initiator.write(peer, rs, rd.id, np.stack([src_off, dst_off, lens], axis=1)).wait(10)
    for s, d, ln in zip(src_off, dst_off, lens, strict=True):
        assert np.array_equal(dst[d:d + ln], src[s:s + ln])


def test_offsets_past_4_gib_in_a_sparse_region(endpoint):
    size = (4 << 30) + (64 << 20)
    try:
        big = mmap.mmap(-1, size)  # anonymous: only the pages written are ever backed
    except OSError as e:
        pytest.skip(f"cannot map a sparse {size} byte region here: {e}")
    view = np.frombuffer(big, np.uint8)
    target, initiator = endpoint("decode"), endpoint("prefill")
    rd = target.register(view, remote_write=True, remote_read=True)
    src = pattern(9, 1 << 20)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    far = (4 << 30) + (7 << 20) + 5  # past 2**32, unaligned
    initiator.write(peer, rs, rd.id, [[0, far, 1 << 20]], notify=b"far").wait(10)
    target.wait_notification(b"far", timeout=5)
    assert np.array_equal(view[far:far + (1 << 20)], src)
    del view, rd


def test_one_transfer_of_a_million_segments(endpoint):
    n, seg = 1_000_000, 8
    target, initiator, peer, rs, rd, src, dst = _pair(endpoint, n * seg)
    perm = np.random.default_rng(4).permutation(n).astype(np.int64)
    segs = np.stack([np.arange(n, dtype=np.int64) * seg, perm * seg,
                     np.full(n, seg, np.int64)], axis=1)
    initiator.write(peer, rs, rd.id, segs, notify=b"million", timeout=60).wait(60)
    target.wait_notification(b"million", timeout=10)
    assert np.array_equal(dst.reshape(n, seg)[perm], src.reshape(n, seg))


def test_many_concurrent_transfers(endpoint):
    bs, n = 16 << 10, 256
    target, initiator, peer, rs, rd, src, dst = _pair(endpoint, bs * n)
    xs = [initiator.write(peer, rs, rd.id, [[i * bs, i * bs, bs]], notify=b"c%d" % i)
          for i in range(n)]
    for i, x in enumerate(xs):
        x.wait(10)
        target.wait_notification(b"c%d" % i, timeout=5)
    assert np.array_equal(dst, src)


def test_several_initiators_into_one_target(endpoint):
    bs, per, k = 64 << 10, 64, 4
    target = endpoint("decode")
    dst = np.zeros(bs * per * k, np.uint8)
    rd = target.register(dst, remote_write=True)
    tables = np.random.default_rng(2).permutation(per * k).reshape(k, per)
    errors: list = []

    def initiate(i: int) -> None:
        try:
            ep = endpoint(f"prefill-{i}")
            rs = ep.register(pattern(100 + i, bs * per))
            peer = ep.connect(target.info())
            for r in range(3):
                ep.write(peer, rs, rd.id, block_segments(range(per), tables[i], bs),
                         notify=b"i%d-%d" % (i, r)).wait(10)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=initiate, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for i in range(k):
        for r in range(3):
            target.wait_notification(b"i%d-%d" % (i, r), timeout=5)
        got = dst.reshape(-1, bs)[tables[i]]
        assert np.array_equal(got, pattern(100 + i, bs * per).reshape(per, bs))


@pytest.mark.parametrize("faults", ["reorder=1", "reorder=1,delay_ms=2,arrival_delay_ms=0.2"])
def test_contract_holds_under_reordering_and_delays(endpoint, faults):
    """EFA's SRD delivers out of order: the suite proves completion is counted, not ordered."""
    bs, n, per = 8 << 10, 256, 16
    target, initiator, peer, rs, rd, src, dst = _pair(endpoint, bs * n, faults=faults)
    for t in range(n // per):
        blocks = np.arange(t * per, (t + 1) * per)
        initiator.write(peer, rs, rd.id, block_segments(blocks, blocks, bs), notify=b"r%d" % t)
    for t in range(n // per):
        target.wait_notification(b"r%d" % t, timeout=10)
        lo, hi = t * per * bs, (t + 1) * per * bs
        assert np.array_equal(dst[lo:hi], src[lo:hi])

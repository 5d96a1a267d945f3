"""Endpoint API on loopback: write, read, notifications, registration of every buffer kind."""

from __future__ import annotations

import time

import numpy as np
import pytest

import kvtransfer as kvt
from kvtransfer.testing.peers import block_segments


def test_write_lands_permuted_blocks_and_notifies_once(pair):
    target, initiator = pair
    bs, n = 64 << 10, 256
    dst = np.zeros(bs * n, np.uint8)
    src = np.random.default_rng(1).integers(0, 256, bs * n, dtype=np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    perm = np.random.default_rng(2).permutation(n)
    x = initiator.write(peer, rs, rd.id, block_segments(np.arange(n), perm, bs), notify=b"req-42")
    assert x.wait(5).status is kvt.Status.DONE
    note = target.wait_notification(b"req-42", timeout=5)
    assert note.peer == "prefill" and note.payload == b"req-42"
    assert isinstance(note, kvt.Notification) and note == ("prefill", b"req-42", None)
    assert (dst.reshape(n, bs)[perm] == src.reshape(n, bs)).all()
    assert target.notifications() == []  # exactly once
    with pytest.raises(kvt.TimeoutError):
        target.wait_notification(b"req-42", timeout=0.2)


def test_read_pulls_blocks_and_notifies_the_target(pair):
    target, initiator = pair
    bs, n = 4096, 100
    remote = np.random.default_rng(3).integers(0, 256, bs * n, dtype=np.uint8)
    rr = target.register(remote, remote_read=True)
    local = np.zeros_like(remote)
    rl = initiator.register(local)
    peer = initiator.connect(target.address)
    order = np.random.default_rng(4).permutation(n)
    segs = block_segments(order, np.arange(n), bs)
    initiator.read(peer, rl, rr.id, segs, notify=b"pulled").wait()
    assert (local.reshape(n, bs) == remote.reshape(n, bs)[order]).all()
    assert target.wait_notification(b"pulled", timeout=5).peer == "prefill"


def test_ten_thousand_small_segments_in_one_transfer(pair):
    target, initiator = pair
    n, seg = 10_000, 24
    dst = np.zeros(n * 64, np.uint8)
    src = np.random.default_rng(5).integers(0, 256, n * seg, dtype=np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    dst_off = np.random.default_rng(6).permutation(n) * 64 + 7  # unaligned
    segs = np.stack([np.arange(n) * seg, dst_off, np.full(n, seg)], axis=1)
    initiator.write(peer, rs, rd.id, segs, notify=b"many").wait()
    target.wait_notification(b"many")
    got = dst[dst_off[:, None] + np.arange(seg)]
    assert (got == src.reshape(n, seg)).all()


def test_zero_length_segments_and_empty_transfer_complete(pair):
    target, initiator = pair
    dst = np.zeros(16, np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(np.ones(16, np.uint8))
    peer = initiator.connect(target.info())
    initiator.write(peer, rs, rd.id, np.zeros((0, 3), np.int64), notify=b"empty").wait()
    target.wait_notification(b"empty")
    initiator.write(peer, rs, rd.id, [[0, 0, 0], [3, 5, 1]], notify=b"one").wait()
    target.wait_notification(b"one")
    assert dst.tolist() == [0] * 5 + [1] + [0] * 10


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "address", "torch"])
def test_register_accepts_every_buffer_kind(pair, kind):
    target, initiator = pair
    if kind == "torch":
        torch = pytest.importorskip("torch")
        dst = torch.zeros(4096, dtype=torch.uint8)
        view = dst.numpy()
    elif kind == "bytearray":
        dst = bytearray(4096)
        view = np.frombuffer(dst, np.uint8)
    elif kind == "memoryview":
        backing = bytearray(4096)
        dst = memoryview(backing)
        view = np.frombuffer(backing, np.uint8)
    else:
        backing = np.zeros(4096, np.uint8)
        dst = (backing.ctypes.data, backing.nbytes)
        view = backing
    rd = target.register(dst, remote_write=True)
    assert rd.nbytes == 4096
    rs = initiator.register(np.full(4096, 9, np.uint8))
    peer = initiator.connect(target.info())
    initiator.write(peer, rs, rd.id, [[0, 0, 4096]]).wait()
    assert (view == 9).all()


def test_peer_regions_lists_what_the_peer_exposes_now(pair):
    target, initiator = pair
    a = target.register(np.zeros(100, np.uint8), remote_write=True)
    target.register(np.zeros(50, np.uint8))  # local only: not exposed
    peer = initiator.connect(target.info())
    assert peer.regions() == {a.id: 100}
    b = target.register(np.zeros(200, np.uint8), remote_read=True)
    assert peer.regions() == {a.id: 100, b.id: 200}
    a.close()
    assert peer.regions() == {b.id: 200}


def test_region_registered_after_connect_is_found_on_first_write(pair):
    target, initiator = pair
    peer = initiator.connect(target.info())
    dst = np.zeros(8, np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(np.arange(8, dtype=np.uint8))
    initiator.write(peer, rs, rd.id, [[0, 0, 8]]).wait()
    assert dst.tolist() == list(range(8))


def test_stats_count_bytes_transfers_and_latency(pair):
    target, initiator = pair
    rd = target.register(np.zeros(1 << 20, np.uint8), remote_write=True)
    rs = initiator.register(np.ones(1 << 20, np.uint8))
    peer = initiator.connect(target.info())
    for _ in range(3):
        initiator.write(peer, rs, rd.id, [[0, 0, 1 << 20]]).wait()
    s = initiator.stats()
    assert s["bytes_written"] == 3 << 20 and s["transfers_done"] == 3
    assert s["latency_samples"] == 3 and 0 < s["latency_p50_s"] <= s["latency_p99_s"]
    assert target.stats()["inbound_done"] == 3


def test_many_concurrent_transfers_all_complete(pair):
    target, initiator = pair
    bs, n = 8192, 64
    dst = np.zeros(bs * n, np.uint8)
    src = np.random.default_rng(8).integers(0, 256, bs * n, dtype=np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    xs = [initiator.write(peer, rs, rd.id, [[i * bs, i * bs, bs]], notify=b"n%d" % i)
          for i in range(n)]
    for i, x in enumerate(xs):
        x.wait()
        target.wait_notification(b"n%d" % i)
    assert (dst == src).all()


def test_closed_endpoint_refuses_work_with_a_clear_error():
    ep = kvt.Endpoint("x")
    ep.close()
    with pytest.raises(kvt.InvalidRequestError, match="closed"):
        ep.register(np.zeros(4, np.uint8))


def test_a_spinning_wait_returns_the_notification_and_still_times_out(pair):
    """spin= polls instead of sleeping; it changes when the waiter notices, never what it gets:
    the notification after its data, failures and timeouts as for a sleeping wait."""
    target, initiator = pair
    dst = np.zeros(64 << 10, np.uint8)
    src = np.random.default_rng(3).integers(0, 256, dst.size, dtype=np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    for i in range(50):
        initiator.write(peer, rs, rd.id, [[0, 0, dst.size]], notify=b"spin-%d" % i)
        assert target.wait_notification(b"spin-%d" % i, timeout=5, spin=5).payload == b"spin-%d" % i
        assert (dst == src).all()
    t0 = time.monotonic()
    with pytest.raises(kvt.TimeoutError):
        target.wait_notification(b"never", timeout=0.2, spin=10)  # spins no longer than timeout
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(kvt.InvalidRequestError, match="spin must be >= 0 seconds, got -1"):
        target.wait_notification(b"never", timeout=0.1, spin=-1)
    with pytest.raises(kvt.InvalidRequestError, match="payload must be bytes, got str"):
        target.wait_notification("spin-0", timeout=0.1)


def test_segments_and_payloads_in_any_integer_or_bytes_form_are_accepted(pair):
    target, initiator = pair
    dst = np.zeros(4 << 10, np.uint8)
    src = np.arange(4 << 10, dtype=np.uint32).astype(np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    misaligned = np.frombuffer(b"\0" + np.array([[0, 3584, 256]], np.int64).tobytes(), np.int64,
                               offset=1).reshape(1, 3)
    forms = [[(0, 0, 1024)], np.array([[1024, 1024, 1024]], np.int32),
             np.array([[0, 2048, 1024], [1024, 3072, 1024]], np.int64)[::-1],
             np.array([[0, 3072, 256]], ">i8"),  # big-endian
             np.asfortranarray(np.array([[0, 3328, 256]], np.int64)), misaligned]
    notifies = [bytearray(b"form0"), memoryview(b"form1")] + [b"form%d" % i for i in range(2, 6)]
    for i, (segs, notify) in enumerate(zip(forms, notifies, strict=True)):
        initiator.write(peer, rs, np.int64(rd.id), segs, notify=notify).wait()
        note = target.wait_notification(bytearray(b"form%d" % i), timeout=5)
        assert note.payload == b"form%d" % i
    assert (dst[:2048] == src[:2048]).all()
    assert (dst[2048:3072] == src[:1024]).all()
    assert (dst[3072:3840] == np.tile(src[:256], 3)).all() and (dst[3840:] == src[1792:2048]).all()


@pytest.mark.parametrize("bad, match", [
    (dict(segments=[(0, 0)]), r"shape \[N, 3\].*got \(1, 2\)"),
    (dict(segments=np.zeros(3, np.int64)), r"shape \[N, 3\].*got \(3,\)"),
    (dict(segments=[("a", 0, 16)]), "segments must be integers"),
    (dict(remote_region=1.5), "remote_region has the wrong type: float"),
    (dict(remote_region=-1), "remote_region -1 is not a region id"),
    (dict(notify="text"), "notify must be bytes, got str"),
    (dict(notify=5), "notify must be bytes, got int"),
    (dict(timeout="1"), "timeout has the wrong type: str"),
])
def test_malformed_transfer_arguments_are_refused_with_what_was_wrong(pair, bad, match):
    target, initiator = pair
    dst = np.zeros(4096, np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(np.ones(4096, np.uint8))
    peer = initiator.connect(target.info())
    args = {"remote_region": rd.id, "segments": [(0, 0, 16)], **bad}
    with pytest.raises(kvt.InvalidRequestError, match=match):
        initiator.write(peer, rs, args.pop("remote_region"), args.pop("segments"), **args)
    assert not dst.any() and target.notifications() == []

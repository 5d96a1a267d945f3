"""The completion contract under injected faults: reordered segments (as EFA's SRD delivers),
delayed posts and arrivals, and a data link dropped in the middle of a transfer."""

from __future__ import annotations

import time

import numpy as np
import pytest

import kvtransfer as kvt
from kvtransfer.testing.peers import block_segments


def _linked(faults: str, nbytes: int, timeout: float = 5.0):
    target = kvt.Endpoint("decode", timeout=timeout, faults=faults)
    initiator = kvt.Endpoint("prefill", timeout=timeout, faults=faults, connections=3)
    dst = np.zeros(nbytes, np.uint8)
    src = np.random.default_rng(0).integers(1, 256, nbytes, dtype=np.uint8)
    rd = target.register(dst, remote_write=True, remote_read=True)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    return target, initiator, peer, rs, rd, src, dst


@pytest.mark.parametrize("faults", ["reorder=1", "reorder=1,delay_ms=3,arrival_delay_ms=0.2"])
def test_notifications_follow_data_under_reordering_and_delay(faults):
    bs, n, per = 16 << 10, 512, 32
    target, initiator, peer, rs, rd, src, dst = _linked(faults, bs * n)
    try:
        xs = []
        for t in range(n // per):
            blocks = np.arange(t * per, (t + 1) * per)
            xs.append(initiator.write(peer, rs, rd.id, block_segments(blocks, blocks, bs),
                                      notify=b"t%d" % t))
        for t in range(n // per):
            target.wait_notification(b"t%d" % t, timeout=10)
            lo, hi = t * per * bs, (t + 1) * per * bs
            assert np.array_equal(dst[lo:hi], src[lo:hi]), f"transfer {t} notified before its data"
        assert all(x.wait(10).status is kvt.Status.DONE for x in xs)
    finally:
        initiator.close()
        target.close()


def test_a_dropped_link_fails_the_transfer_on_both_sides_and_never_reports_it_done():
    bs, n = 1 << 20, 64
    target, initiator, peer, rs, rd, src, dst = _linked(f"drop_after_bytes={8 << 20}", bs * n)
    try:
        t0 = time.monotonic()
        x = initiator.write(peer, rs, rd.id, block_segments(range(n), range(n), bs),
                            notify=b"cut")
        with pytest.raises(kvt.TransportError, match="dropped"):
            x.wait(10)
        with pytest.raises(kvt.TransportError):
            target.wait_notification(b"cut", timeout=10)
        assert time.monotonic() - t0 < 2.0
        assert x.status is kvt.Status.ERROR
    finally:
        initiator.close()
        target.close()


def test_a_bad_fault_spec_is_an_invalid_request():
    with pytest.raises(kvt.InvalidRequestError, match="unknown key 'jitter'"):
        kvt.Endpoint("x", faults="jitter=3")

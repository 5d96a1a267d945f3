"""What must be refused, with memory untouched: bad keys, out-of-bounds segments, unknown and
deregistered regions, deregistration under transfers in flight."""

from __future__ import annotations

import numpy as np
import pytest

import kvtransfer as kvt
from kvtransfer.testing.peers import block_segments, pattern


def test_a_wrong_remote_key_is_refused_and_memory_untouched(endpoint):
    target = endpoint("decode")
    initiator = endpoint("prefill", faults="corrupt_key=1")
    dst = np.zeros(1 << 16, np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(pattern(1, 1 << 16))
    peer = initiator.connect(target.info())
    x = initiator.write(peer, rs, rd.id, [[0, 0, 1 << 16]], notify=b"forged")
    with pytest.raises(kvt.KVTransferError):
        x.wait(10)
    assert x.status is kvt.Status.ERROR
    assert not dst.any(), "a write with a wrong key touched memory"
    with pytest.raises(kvt.KVTransferError):
        target.wait_notification(b"forged", timeout=5)


@pytest.mark.parametrize("segment", [[0, 0, 4097], [0, 4090, 7], [-1, 0, 1], [0, 2**63 - 1, 1]])
def test_out_of_bounds_segments_are_refused_before_sending(endpoint, segment):
    target, initiator = endpoint("decode"), endpoint("prefill")
    dst = np.zeros(4096, np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(np.ones(4096, np.uint8))
    peer = initiator.connect(target.info())
    with pytest.raises(kvt.InvalidRequestError):
        initiator.write(peer, rs, rd.id, [segment], notify=b"oob")
    assert not dst.any()
    assert target.notifications() == []


def test_unknown_and_deregistered_regions_are_refused(endpoint):
    target, initiator = endpoint("decode"), endpoint("prefill")
    dst = np.zeros(4096, np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(np.ones(4096, np.uint8))
    peer = initiator.connect(target.info())
    with pytest.raises(kvt.InvalidRequestError):
        initiator.write(peer, rs, rd.id + 1000, [[0, 0, 8]])
    rd.close()
    with pytest.raises(kvt.InvalidRequestError):
        initiator.write(peer, rs, rd.id, [[0, 0, 8]]).wait(5)
    assert not dst.any()


def test_deregistering_with_transfers_in_flight_fails_or_drains_them(endpoint):
    bs, n = 1 << 20, 64
    target, initiator = endpoint("decode"), endpoint("prefill")
    rd = target.register(np.zeros(bs * n, np.uint8), remote_write=True)
    rs = initiator.register(pattern(2, bs * n))
    peer = initiator.connect(target.info())
    xs = [initiator.write(peer, rs, rd.id, block_segments(range(n), range(n), bs),
                          notify=b"d%d" % i) for i in range(3)]
    rd.close(timeout=10)
    for i, x in enumerate(xs):
        try:
            x.wait(10)
            target.wait_notification(b"d%d" % i, timeout=5)  # drained before removal
        except kvt.KVTransferError:
            assert x.status is kvt.Status.ERROR
            with pytest.raises(kvt.KVTransferError):
                target.wait_notification(b"d%d" % i, timeout=5)


def test_a_local_region_closed_under_a_transfer_waits_for_it(endpoint):
    """Local memory stays registered until the transfer using it ends (close drains)."""
    bs, n = 1 << 20, 128
    target, initiator = endpoint("decode"), endpoint("prefill")
    dst = np.zeros(bs * n, np.uint8)
    rd = target.register(dst, remote_write=True)
    src = pattern(3, bs * n)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    x = initiator.write(peer, rs, rd.id, block_segments(range(n), range(n), bs))
    rs.close(timeout=10)
    assert x.done()
    x.wait(1)
    assert np.array_equal(dst, src)

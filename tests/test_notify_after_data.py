"""The contract's core promise: when a notification arrives, every byte of its transfer is
already in the target's memory. Many transfers, striped over several connections, checked on
arrival of each notification, so a race would show."""

from __future__ import annotations

import numpy as np

import kvtransfer as kvt


def test_every_notification_finds_its_transfer_complete():
    n, chunk = 200, 512 << 10
    with kvt.Endpoint("decode", timeout=10) as d, kvt.Endpoint("prefill", connections=4) as p:
        dst = np.zeros(n * chunk, np.uint8)
        rd = d.register(dst, remote_write=True)
        src = np.random.default_rng(0).integers(1, 256, n * chunk, dtype=np.uint8)
        rs = p.register(src)
        peer = p.connect(d.info())
        # Each transfer: its chunk in 64 scattered pieces, so frames spread over connections.
        piece = chunk // 64
        xs = []
        for i in range(n):
            order = np.random.default_rng(i).permutation(64)
            segs = np.stack([i * chunk + order * piece, i * chunk + order * piece,
                             np.full(64, piece)], axis=1)
            xs.append(p.write(peer, rs, rd.id, segs, notify=b"t%d" % i))
        incomplete = []
        for i in range(n):
            d.wait_notification(b"t%d" % i, timeout=10)
            lo, hi = i * chunk, (i + 1) * chunk
            if not np.array_equal(dst[lo:hi], src[lo:hi]):
                incomplete.append(i)
        assert incomplete == []
        for x in xs:
            assert x.wait(10).status is kvt.Status.DONE

"""No leaks: connect/transfer/close cycles leave descriptors and memory where they were."""

from __future__ import annotations

import os
import resource

import numpy as np


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_ten_thousand_connect_transfer_close_cycles_leak_nothing(endpoint):
    cycles, warmup = 10_000, 500
    target = endpoint("decode")
    dst = np.zeros(4096, np.uint8)
    rd = target.register(dst, remote_write=True)
    initiator = endpoint("prefill", connections=1)
    src = initiator.register(np.ones(4096, np.uint8))
    info = target.info()
    fds = rss = 0.0
    for i in range(cycles):
        if i == warmup:
            fds, rss = _fds(), _rss_mib()
        peer = initiator.connect(info)
        initiator.write(peer, src, rd.id, [[i % 4000, i % 4000, 64]], notify=b"x").wait(5)
        target.wait_notification(b"x", timeout=5)
        peer.close()
    fd_growth, rss_growth = _fds() - fds, _rss_mib() - rss
    assert fd_growth <= 4, f"{fd_growth} descriptors leaked over {cycles - warmup} cycles"
    assert rss_growth < 32, f"RSS grew {rss_growth:.1f} MiB over {cycles - warmup} cycles"
    assert initiator.stats()["transfers_done"] == cycles

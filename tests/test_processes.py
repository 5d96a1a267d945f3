"""Real processes on loopback: bulk transfers verified byte for byte, several initiators into
one target, and peers killed mid-transfer."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

import kvtransfer as kvt
from kvtransfer.testing import peers

TCP: dict = {"transport": "tcp"}

MiB = 1 << 20


def test_256_mib_between_two_processes_verified(spawn):
    bs, n = 64 << 10, 4096  # 256 MiB of 64 KiB blocks, scattered
    tproc, tconn = spawn(peers.run_target, TCP, bs * n, 1)
    info, rid = tconn.recv()
    table = np.random.default_rng(11).permutation(n)
    iproc, iconn = spawn(peers.run_initiator, TCP, info, rid, bs, n, table, b"bulk", 7)
    assert iconn.recv() == "connected"
    tconn.send((b"bulk", 7, bs, table))
    done = iconn.recv()
    assert done[0] == "done", done
    status, verified, _ = tconn.recv()
    assert status == "ok" and verified
    for c in (iconn, tconn):
        c.send("stop")


def test_four_initiators_write_into_one_target_at_once(spawn):
    bs, per = 256 << 10, 64
    tproc, tconn = spawn(peers.run_target, TCP, bs * per * 4, 4)
    info, rid = tconn.recv()
    tables = np.random.default_rng(3).permutation(per * 4).reshape(4, per)
    conns = []
    for i in range(4):
        _, c = spawn(peers.run_initiator, TCP, info, rid, bs, per, tables[i], b"init-%d" % i,
                     100 + i, 3)
        conns.append(c)
    for c in conns:
        assert c.recv() == "connected"
    for i in range(4):
        tconn.send((b"init-%d" % i, 100 + i, bs, tables[i]))
    for c in conns:
        for _ in range(3):
            assert c.recv()[0] == "done"
    for _ in range(4):
        status, verified, _ = tconn.recv()
        assert status == "ok" and verified
    for c in [tconn, *conns]:
        c.send("stop")


def test_killed_target_turns_pending_transfers_to_error_quickly(spawn):
    tproc, tconn = spawn(peers.run_target, TCP, 512 * MiB, 1, 30.0)
    info, rid = tconn.recv()
    with kvt.Endpoint("prefill", timeout=30.0) as ep:
        src = ep.register(np.ones(512 * MiB, np.uint8))
        peer = ep.connect(info)
        segs = np.array([[i * MiB, i * MiB, MiB] for i in range(512)], np.int64)
        xs = [ep.write(peer, src, rid, segs) for _ in range(4)]
        time.sleep(0.05)
        os.kill(tproc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        for x in xs:
            try:
                x.wait(10)
            except kvt.TransportError:
                pass
            assert x.status is kvt.Status.ERROR or x is xs[0]
        assert time.monotonic() - t0 < 1.0  # far inside the 30 s deadline: the socket closed
        assert not peer.alive
        assert any(x.status is kvt.Status.ERROR for x in xs)


def test_killed_initiator_fails_the_targets_notification(spawn):
    """The initiator dies with its transfer half written: the target's wait for that
    notification raises TransportError at once instead of hanging or reporting success."""
    with kvt.Endpoint("decode", timeout=30.0) as ep:
        dst = np.zeros(1024 * MiB, np.uint8)
        rd = ep.register(dst, remote_write=True)
        iproc, iconn = spawn(peers.run_initiator, TCP, ep.info(), rd.id, MiB, 1024, np.arange(1024),
                             b"doomed", 5, 1, 30.0)
        assert iconn.recv() == "connected"
        deadline = time.monotonic() + 10
        while not dst[:MiB].any():  # wait until the first bytes have landed
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(iproc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        try:
            ep.wait_notification(b"doomed", timeout=10)
            landed = True
        except kvt.TransportError as e:
            landed = False
            assert "failed" in str(e)
        elapsed = time.monotonic() - t0
        if landed:  # it finished before the kill took effect: then every byte must be there
            assert (dst != 0).mean() > 0.99
        else:
            assert elapsed < 1.0
            assert ep.stats()["inbound_failed"] == 1


def test_a_transfer_past_its_deadline_fails_on_both_sides(spawn):
    """A frozen target (SIGSTOP) fails the transfer at its deadline, not never."""
    tproc, tconn = spawn(peers.run_target, TCP, 64 * MiB, 1, 2.0)
    info, rid = tconn.recv()
    with kvt.Endpoint("prefill", timeout=1.0) as ep:
        src = ep.register(np.ones(64 * MiB, np.uint8))
        peer = ep.connect(info)
        os.kill(tproc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            x = ep.write(peer, src, rid, [[0, 0, 64 * MiB]], notify=b"late")
            try:
                x.wait(5)
                raise AssertionError("a frozen target cannot acknowledge")
            except kvt.TimeoutError:
                pass
            assert 0.9 < time.monotonic() - t0 < 3.0
        finally:
            os.kill(tproc.pid, signal.SIGCONT)
        tconn.send((b"late", 0, MiB, np.arange(64)))
        result = tconn.recv()
        assert result[0] == "error" and result[1] in ("TransportError", "TimeoutError"), result

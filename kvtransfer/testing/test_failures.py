"""Failure is visible on both sides and bounded in time: killed peers, frozen peers, deadlines,
cancel, and reconnecting after a peer restarts."""

from __future__ import annotations

import os
import signal
import socket
import time

import numpy as np
import pytest

import kvtransfer as kvt
from kvtransfer.testing import peers
from kvtransfer.testing.peers import block_segments

MiB = 1 << 20


def test_killed_target_is_an_error_at_the_initiator_within_100_ms(spawn, ep_kwargs):
    tproc, tconn = spawn(peers.run_target, ep_kwargs, 256 * MiB, 1, 30.0)
    info, rid = tconn.recv()
    with kvt.Endpoint("prefill", timeout=30.0, **ep_kwargs) as ep:
        src = ep.register(np.ones(256 * MiB, np.uint8))
        peer = ep.connect(info)
        xs = [ep.write(peer, src, rid, block_segments(range(256), range(256), MiB))
              for _ in range(8)]
        time.sleep(0.05)
        os.kill(tproc.pid, signal.SIGKILL)
        tproc.join(5)
        t_dead = time.monotonic()
        for x in xs:
            try:
                x.wait(5)
            except kvt.TransportError:
                pass
        elapsed = time.monotonic() - t_dead
        assert elapsed < 0.1, f"initiator learned of the dead target after {elapsed:.3f} s"
        assert xs[-1].status is kvt.Status.ERROR
        assert not peer.alive


def test_killed_initiator_is_a_failure_event_at_the_target_within_100_ms(spawn, ep_kwargs):
    with kvt.Endpoint("decode", timeout=30.0, **ep_kwargs) as ep:
        dst = np.zeros(1024 * MiB, np.uint8)
        rd = ep.register(dst, remote_write=True)
        iproc, iconn = spawn(peers.run_initiator, ep_kwargs, ep.info(), rd.id, MiB, 1024,
                             np.arange(1024), b"doomed", 5, 1, 30.0)
        assert iconn.recv() == "connected"
        deadline = time.monotonic() + 10
        while not dst[:MiB].any():  # the transfer is under way
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        os.kill(iproc.pid, signal.SIGKILL)
        iproc.join(5)
        t_dead = time.monotonic()
        try:
            ep.wait_notification(b"doomed", timeout=10)
            assert (dst != 0).mean() > 0.99, "notified with blocks missing"
        except kvt.TransportError:
            elapsed = time.monotonic() - t_dead
            assert elapsed < 0.1, f"target learned of the dead initiator after {elapsed:.3f} s"
            assert ep.stats()["inbound_failed"] == 1


def test_frozen_target_fails_on_both_sides_at_the_deadline_and_late_data_never_succeeds(
        spawn, ep_kwargs):
    tproc, tconn = spawn(peers.run_target, ep_kwargs, 64 * MiB, 1, 2.0)
    info, rid = tconn.recv()
    with kvt.Endpoint("prefill", timeout=1.0, **ep_kwargs) as ep:
        src = ep.register(np.ones(64 * MiB, np.uint8))
        peer = ep.connect(info)
        os.kill(tproc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            x = ep.write(peer, src, rid, [[0, 0, 64 * MiB]], notify=b"late")
            with pytest.raises(kvt.TimeoutError):
                x.wait(5)
            assert 0.9 < time.monotonic() - t0 < 1.5
            time.sleep(0.5)  # the target stays frozen past the deadline
        finally:
            os.kill(tproc.pid, signal.SIGCONT)
        tconn.send((b"late", 0, MiB, np.arange(64)))
        status = tconn.recv()
        assert status[0] == "error", "data that arrived after the deadline completed a transfer"
        assert x.status is kvt.Status.ERROR


def test_frozen_initiator_fails_the_target_at_its_deadline(endpoint):
    """An initiator that stops sending mid-transfer: the target's notification raises once
    the transfer's deadline passes (the initiator side is simulated by delaying its data)."""
    target = endpoint("decode")
    initiator = endpoint("prefill", timeout=0.5, faults="delay_ms=1500")
    rd = target.register(np.zeros(MiB, np.uint8), remote_write=True)
    rs = initiator.register(np.ones(MiB, np.uint8))
    peer = initiator.connect(target.info())
    t0 = time.monotonic()
    x = initiator.write(peer, rs, rd.id, [[0, 0, MiB]], notify=b"stalled")
    with pytest.raises(kvt.KVTransferError):
        target.wait_notification(b"stalled", timeout=5)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(kvt.TimeoutError):
        x.wait(5)
    time.sleep(1.2)  # the delayed data lands now: it must not revive anything
    assert target.notifications() == []


def test_a_transfer_wait_times_out_but_the_transfer_still_ends(endpoint):
    target = endpoint("decode")
    initiator = endpoint("prefill", faults="delay_ms=300")
    rd = target.register(np.zeros(4096, np.uint8), remote_write=True)
    rs = initiator.register(np.ones(4096, np.uint8))
    peer = initiator.connect(target.info())
    x = initiator.write(peer, rs, rd.id, [[0, 0, 4096]])
    with pytest.raises(kvt.TimeoutError):
        x.wait(0.05)
    assert x.status is kvt.Status.PENDING
    assert x.wait(5).status is kvt.Status.DONE


def test_cancel_fails_the_transfer_on_both_sides(endpoint):
    target = endpoint("decode")
    initiator = endpoint("prefill", faults="delay_ms=500")
    rd = target.register(np.zeros(4096, np.uint8), remote_write=True)
    rs = initiator.register(np.ones(4096, np.uint8))
    peer = initiator.connect(target.info())
    x = initiator.write(peer, rs, rd.id, [[0, 0, 4096]], notify=b"cancelled")
    time.sleep(0.05)
    assert x.cancel() is True
    assert x.status is kvt.Status.ERROR and "cancelled" in str(x.error)
    with pytest.raises(kvt.TransportError, match="cancelled"):
        target.wait_notification(b"cancelled", timeout=5)
    assert x.cancel() is False


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_reconnect_after_the_peer_restarts(spawn, ep_kwargs):
    listen = f"127.0.0.1:{_free_port()}"
    with kvt.Endpoint("prefill", timeout=5.0, **ep_kwargs) as ep:
        src = ep.register(peers.pattern(4, 4 * MiB))
        for life in range(2):
            tproc, tconn = spawn(peers.run_target, ep_kwargs, 4 * MiB, 1, 10.0, listen)
            info, rid = tconn.recv()
            peer = ep.connect(listen)
            ep.write(peer, src, rid, block_segments(range(4), range(4), MiB),
                     notify=b"life-%d" % life).wait(10)
            tconn.send((b"life-%d" % life, 4, MiB, np.arange(4)))
            assert tconn.recv()[:2] == ("ok", True)
            tproc.kill()
            tproc.join(5)
            deadline = time.monotonic() + 5
            while peer.alive:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(kvt.TransportError):
                ep.write(peer, src, rid, [[0, 0, 1]])

"""A waiter that sleeps (wait_notification without spin, notifications(timeout)) reads inbound
data itself on TCP and cma, sleeping in poll() on the connections between reads, so that a small
transfer wakes one thread, the waiter, not a transport thread and then the waiter. It must get
everything a waiter sleeping on the queue gets: every notification, pushed by any thread, from
connections opened after it fell asleep; and it leaves bulk traffic to the transport's threads.
Handing the connections to a waiter and back wakes none of the connection threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import kvtransfer as kvt
from kvtransfer import transports

MiB = 1 << 20
TRANSPORTS = [t for t in ("tcp", "cma") if t in transports.available()]


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


@contextlib.contextmanager
def _pair(transport: str, nbytes: int = 16 * MiB, **initiator_kw):
    """A decode (target) and a prefill (initiator) endpoint, connected, with a region each."""
    with kvt.Endpoint("decode", transport=transport, timeout=5.0) as target, \
            kvt.Endpoint("prefill", transport=transport, timeout=5.0, **initiator_kw) as initiator:
        dst = np.zeros(nbytes, np.uint8)
        src = np.random.default_rng(11).integers(0, 256, nbytes, dtype=np.uint8)
        rd = target.register(dst, remote_write=True, remote_read=True)
        rs = initiator.register(src)
        yield target, initiator, rs, rd, src, dst


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    """Runs fn() in a thread; the dict gets its result or exception, and its CPU and wall time."""
    out: dict = {}

    def run() -> None:
        cpu, wall = time.thread_time(), time.monotonic()
        try:
            out["result"] = fn()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out["error"] = e
        out["cpu_s"], out["wall_s"] = time.thread_time() - cpu, time.monotonic() - wall

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _write_each(initiator, peer, rs, rd, tags: list[bytes], pause_s: float) -> None:
    """One 64 KiB write per tag, source block i to destination block i, each notifying its tag
    and waited for, ``pause_s`` apart (the waiter is back in its wait by then)."""
    for i, tag in enumerate(tags):
        time.sleep(pause_s)
        off = i * 65536
        initiator.write(peer, rs, rd.id, [[off, off, 65536]], notify=tag).wait(5)


def test_a_sleeping_waiter_reads_small_writes_itself(transport):
    with _pair(transport) as (target, initiator, rs, rd, src, dst):
        peer = initiator.connect(target.info())
        tags = [b"s%d" % i for i in range(40)]
        waiter, out = _in_thread(lambda: [target.wait_notification(t, timeout=5).payload
                                          for t in tags])
        _write_each(initiator, peer, rs, rd, tags, 0.002)  # the waiter is asleep again
        waiter.join(10)
        assert out.get("result") == tags, out.get("error")
        assert (dst[:40 * 65536] == src[:40 * 65536]).all()
        stats = target.stats()
        assert stats["sleep_reads"] >= 20, "most writes must be read by the sleeping waiter"
        assert stats["spin_reads"] == 0
        # Its ACKs are sent for it: every initiator sees DONE.
        assert initiator.stats()["transfers_done"] == 40


def _inbound_thread_switches(transport: str) -> tuple[int, int]:
    """(threads, context switches so far) of this process's inbound connection threads."""
    threads = switches = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != f"kvt-{transport}-in":
                continue
            status = (task / "status").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        threads += 1
        switches += sum(int(line.split()[1]) for line in status.splitlines()
                        if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))
    return threads, switches


def _connections_with_their_threads() -> tuple[int, int]:
    """(inbound connections, of which watched by their own thread) in this process. Each
    connection's thread sleeps in an epoll set of its kick (an eventfd) and, unless waiters took
    the connection, its socket; /proc shows what each epoll set holds."""
    connections = watched = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                held = [os.readlink(f"/proc/self/fd/{line.split()[1]}") for line in info
                        if line.startswith("tfd:")]
        except (FileNotFoundError, ProcessLookupError):  # closed meanwhile
            continue
        if held.count("anon_inode:[eventfd]") != 1:  # not a connection thread's set
            continue
        connections += 1
        watched += any(h.startswith("socket:") for h in held)
    return connections, watched


@pytest.mark.parametrize("spin", [5.0, 0.0], ids=["spinning", "sleeping"])
def test_spinning_waiters_take_only_the_connections_that_carry_frames(transport, spin):
    # A decode host is connected to many prefill peers, most of them quiet at any moment. Taking
    # every connection from its thread at each wait's start and giving it back at its end cost
    # two system calls per connection per wait: with 16 idle peers a spinning wait's p90 went
    # from ~50 us to ~180 us. Only connections that carried frames lately are taken now. A
    # sleeping waiter takes them all: it sleeps on the sockets it took, and one that a thread
    # reads would wake it again and again.
    with _pair(transport) as (target, initiator, rs, rd, src, dst), \
            contextlib.ExitStack() as idle_peers:
        peer = initiator.connect(target.info())
        for i in range(6):
            idle = idle_peers.enter_context(kvt.Endpoint(f"idle{i}", transport=transport))
            idle.connect(target.info())
        for i in range(3):  # the active peer's connection carries frames: it is hot
            waiter, out = _in_thread(lambda i=i: target.wait_notification(b"h%d" % i, timeout=5,
                                                                           spin=spin))
            time.sleep(0.01)
            initiator.write(peer, rs, rd.id, [[0, 0, 4096]], notify=b"h%d" % i).wait(5)
            waiter.join(10)
            assert "error" not in out, out.get("error")
        time.sleep(0.05)  # the last wait's end, handed off, is done
        connections, watched = _connections_with_their_threads()
        assert connections >= 7 and watched == connections, "at rest, threads watch all"

        waiter, out = _in_thread(lambda: target.wait_notification(b"late", timeout=5, spin=spin))
        time.sleep(0.05)
        _, watched_while_waiting = _connections_with_their_threads()
        initiator.write(peer, rs, rd.id, [[0, 0, 65536]], notify=b"late").wait(5)
        waiter.join(10)
        assert "error" not in out, out.get("error")
        assert (dst[:65536] == src[:65536]).all()
        if spin:  # the idle peers' connections (and the active one's unused second) stayed
            assert connections - 2 <= watched_while_waiting < connections, watched_while_waiting
        else:
            assert watched_while_waiting == 0
        time.sleep(0.05)
        assert _connections_with_their_threads() == (connections, connections), "given back"


def test_a_frame_on_a_connection_no_waiter_read_lately_reaches_a_waiter(transport):
    # Left with its thread, which reads it (one wake-up); the waiter reads it from then on.
    with _pair(transport) as (target, initiator, rs, rd, src, dst):
        peer = initiator.connect(target.info())
        for spin in (5.0, 0.0, 5.0):
            before = target.stats()
            tags = [b"c%g-%d" % (spin, i) for i in range(10)]
            waiter, out = _in_thread(lambda ts=tags, s=spin: [
                target.wait_notification(t, timeout=5, spin=s).payload for t in ts])
            _write_each(initiator, peer, rs, rd, tags, 0.003)
            waiter.join(10)
            assert out.get("result") == tags, out.get("error")
            assert (dst[:10 * 65536] == src[:10 * 65536]).all()
            after = target.stats()
            reads = sum(after[k] - before[k] for k in ("spin_reads", "sleep_reads"))
            assert reads >= 8, f"the waiter read {reads} of 10 writes itself"


@pytest.mark.parametrize("spin", [5.0, 0.0], ids=["spinning", "sleeping"])
def test_waiters_starting_and_ending_wake_no_connection_thread(transport, spin):
    # On 2 cores each such wake-up (two per connection per wait, as it once was) lands, as often
    # as not, in the middle of the next transfer it was meant to speed up.
    with _pair(transport) as (target, initiator, rs, rd, src, dst):
        peer = initiator.connect(target.info())
        initiator.write(peer, rs, rd.id, [[0, 0, 4096]], notify=b"warm").wait(5)
        target.wait_notification(b"warm", timeout=5)
        tags = [b"w%d" % i for i in range(50)]
        time.sleep(0.05)
        threads, before = _inbound_thread_switches(transport)
        assert threads >= 1, "the inbound connection threads are named for ps and top"
        def wait_each() -> list:
            got = []
            for t in tags:
                got.append(target.wait_notification(t, timeout=5, spin=spin))
                time.sleep(0.001)  # its end, handed off, runs before the next wait starts
            return got

        waiter, out = _in_thread(wait_each)
        _write_each(initiator, peer, rs, rd, tags, 0.003)  # the waiter reads by then
        waiter.join(10)
        time.sleep(0.05)  # the waits' ends, handed off, are done
        _, after = _inbound_thread_switches(transport)
        assert out.get("result") and [n.payload for n in out["result"]] == tags, out.get("error")
        assert (dst[:50 * 65536] == src[:50 * 65536]).all()
        assert after - before < 10, f"{after - before} context switches of connection threads"


def test_a_connection_opened_while_a_waiter_sleeps_is_read_at_once(transport):
    with _pair(transport) as (target, initiator, rs, rd, src, dst):
        waiter, out = _in_thread(lambda: target.wait_notification(b"late", timeout=5))
        time.sleep(0.05)  # asleep, with no connection to watch yet
        peer = initiator.connect(target.info())
        t0 = time.monotonic()
        initiator.write(peer, rs, rd.id, [[0, 0, 65536]], notify=b"late").wait(5)
        waiter.join(10)
        assert "error" not in out, out.get("error")
        assert time.monotonic() - t0 < 2.0, "the sleeper must watch the new connection"
        assert (dst[:65536] == src[:65536]).all()


def test_a_notification_pushed_by_another_thread_wakes_a_sleeping_waiter(transport):
    # The initiator stalls before posting its data (delay_ms), then cancels: the abort comes on
    # the control connection, whose thread fails the inbound transfer while the waiter sleeps on
    # the data connections, which stay silent.
    with _pair(transport, 8 * MiB, faults="delay_ms=3000") as (target, initiator, rs, rd, src, dst):
        peer = initiator.connect(target.info())
        waiter, out = _in_thread(lambda: target.wait_notification(b"stalled", timeout=5))
        x = initiator.write(peer, rs, rd.id, [[0, 0, 4 * MiB]], notify=b"stalled")
        time.sleep(0.1)
        t0 = time.monotonic()
        assert x.cancel()
        waiter.join(10)
        assert isinstance(out.get("error"), kvt.TransportError), out
        assert "aborted" in str(out["error"])
        assert time.monotonic() - t0 < 2.0, "the failure must wake the sleeper, not its timeout"


@pytest.mark.parametrize("idle_peers", [0, 6])
def test_a_sleeping_waiter_leaves_bulk_traffic_to_the_transport_threads(transport, idle_peers):
    # 64 MiB in frames or copies too large for a waiter: it steps aside and sleeps on its queue
    # instead of waking for every frame only to hand it on (it would burn a core doing that).
    # With idle peers it sleeps on the epoll set of all the connections instead of on each.
    with _pair(transport, 64 * MiB) as (target, initiator, rs, rd, src, dst), \
            contextlib.ExitStack() as idle:
        peer = initiator.connect(target.info())
        for i in range(idle_peers):
            idle.enter_context(kvt.Endpoint(f"idle{i}", transport=transport)).connect(target.info())
        for rep in range(3):
            waiter, out = _in_thread(lambda r=rep: target.wait_notification(b"bulk%d" % r,
                                                                             timeout=10))
            time.sleep(0.01)
            initiator.write(peer, rs, rd.id, [[0, 0, 64 * MiB]], notify=b"bulk%d" % rep).wait(10)
            waiter.join(10)
            assert "error" not in out, out.get("error")
            assert out["cpu_s"] < 0.25 * out["wall_s"] + 0.002, out
        assert (dst == src).all()


def test_one_waiter_sleeps_in_the_transport_and_the_others_on_the_queue(transport):
    with _pair(transport) as (target, initiator, rs, rd, src, dst):
        peer = initiator.connect(target.info())
        waiters = [_in_thread(lambda i=i: target.wait_notification(b"w%d" % i, timeout=5))
                   for i in range(4)]
        time.sleep(0.05)
        for i in reversed(range(4)):
            initiator.write(peer, rs, rd.id, [[i * 4096, i * 4096, 4096]],
                            notify=b"w%d" % i).wait(5)
            time.sleep(0.005)
        for t, out in waiters:
            t.join(10)
            assert "error" not in out, out.get("error")
        assert sorted(out["result"].payload for _, out in waiters) == [b"w%d" % i for i in range(4)]
        assert target.stats()["sleep_reads"] > 0


def test_notifications_with_a_timeout_read_as_a_sleeping_waiter(transport):
    # The KV layer's NoteRouter pumps this way.
    with _pair(transport) as (target, initiator, rs, rd, src, dst):
        peer = initiator.connect(target.info())

        def pump() -> list[bytes]:
            got: list[bytes] = []
            deadline = time.monotonic() + 5
            while len(got) < 10 and time.monotonic() < deadline:
                got.extend(n.payload for n in target.notifications(timeout=0.5))
            return got

        pumper, out = _in_thread(pump)
        for i in range(10):
            time.sleep(0.005)  # the pump is asleep again by now
            initiator.write(peer, rs, rd.id, [[0, 0, 65536]], notify=b"p%d" % i).wait(5)
        pumper.join(10)
        assert out.get("result") == [b"p%d" % i for i in range(10)], out
        assert target.stats()["sleep_reads"] >= 5


def test_reads_are_served_while_a_waiter_sleeps(transport):
    # On TCP a read request is the connection thread's to serve (its reply may block): the
    # sleeper hands it back and steps aside, and the next wait reads again.
    with _pair(transport) as (target, initiator, rs, rd, src, dst):
        peer = initiator.connect(target.info())
        dst[:] = src
        back = np.zeros(4 * MiB, np.uint8)
        rb = initiator.register(back)
        for i in range(5):
            waiter, out = _in_thread(lambda i=i: target.wait_notification(b"r%d" % i, timeout=5))
            time.sleep(0.005)
            for j in range(8):
                off = (i * 8 + j) * 65536
                initiator.read(peer, rb, rd.id, [[off, off, 65536]]).wait(5)
            initiator.write(peer, rs, rd.id, [[0, 0, 4096]], notify=b"r%d" % i).wait(5)
            waiter.join(10)
            assert "error" not in out, out.get("error")
        assert (back[:40 * 65536] == src[:40 * 65536]).all()

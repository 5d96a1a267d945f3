"""TCP transport: a waiter that spins (wait_notification(spin=...)) reads queued frames itself
instead of waking a transport thread. Whatever it meets, the outcome is the one a waiter that
does not spin gets: the same bytes, the same completions, the same errors. (A waiter that
sleeps reads too, between sleeps in poll(): tests/transport/test_waiter_readers.py.) And how a
transfer is spread over the connections."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import threading
import time

import numpy as np
import pytest
import raw_client as rc

import kvtransfer as kvt

MiB = 1 << 20


@pytest.fixture
def linked():
    target = kvt.Endpoint("decode", transport="tcp", timeout=5.0)
    initiator = kvt.Endpoint("prefill", transport="tcp", timeout=5.0)
    dst = np.zeros(16 * MiB, np.uint8)
    src = np.random.default_rng(7).integers(0, 256, 16 * MiB, dtype=np.uint8)
    rd = target.register(dst, remote_write=True, remote_read=True)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    yield target, initiator, peer, rs, rd, src, dst
    initiator.close()
    target.close()


def test_a_spinning_waiter_reads_small_writes_itself_and_every_initiator_sees_done(linked):
    target, initiator, peer, rs, rd, src, dst = linked
    seen: list[bytes] = []

    def wait_all() -> None:
        for i in range(50):
            seen.append(target.wait_notification(b"n%d" % i, timeout=5, spin=5).payload)

    waiter = threading.Thread(target=wait_all)
    waiter.start()
    for i in range(50):
        time.sleep(0.002)  # the waiter is spinning by now
        off = i * 65536
        initiator.write(peer, rs, rd.id, [[off, off, 65536]], notify=b"n%d" % i).wait(5)
    waiter.join(10)
    assert seen == [b"n%d" % i for i in range(50)]
    assert (dst[:50 * 65536] == src[:50 * 65536]).all()
    # Frames read by the waiter, their ACKs owed by it and sent for it: every write is done.
    assert target.stats()["spin_reads"] > 0
    assert initiator.stats()["transfers_done"] == 50


def _spin_for(target, tags: list[bytes], seen: list[bytes]) -> threading.Thread:
    def wait_all() -> None:
        for tag in tags:
            seen.append(target.wait_notification(tag, timeout=5, spin=5).payload)

    t = threading.Thread(target=wait_all)
    t.start()
    return t


def test_a_spinning_waiter_reads_heads_longer_than_its_first_look(linked):
    # A 4 KiB notification (the limit) and 256 segments in one frame: heads of ~4 KiB each, where
    # the waiter first peeks 1 KiB. It must look again, further, and land them itself.
    target, initiator, peer, rs, rd, src, dst = linked
    reads_before = target.stats()["spin_reads"]
    tags = [bytes([65 + i]) * 4096 for i in range(3)]
    seen: list[bytes] = []
    waiter = _spin_for(target, tags, seen)
    segs = np.array([[i * 512, (1000 + i) * 512, 256] for i in range(256)], np.int64)
    for i, tag in enumerate(tags):
        time.sleep(0.002)
        initiator.write(peer, rs, rd.id, segs + [i * 64, i * 64, 0], notify=tag).wait(5)
    waiter.join(10)
    assert seen == tags
    for i in range(3):
        for s, d, n in (segs + [i * 64, i * 64, 0])[[0, 127, 255]]:
            assert (dst[d:d + n] == src[s:s + n]).all()
    assert target.stats()["spin_reads"] - reads_before >= 3


def test_a_burst_of_queued_writes_is_taken_in_order_by_a_spinning_waiter(linked):
    # Many small notified writes posted back to back: the socket holds several BEGIN + write
    # pairs at once, and the waiter's reads may end anywhere among them.
    target, initiator, peer, rs, rd, src, dst = linked
    tags = [b"burst-%d" % i for i in range(64)]
    seen: list[bytes] = []
    waiter = _spin_for(target, tags, seen)
    time.sleep(0.01)
    xs = [initiator.write(peer, rs, rd.id, [[i * 4096, i * 4096, 1000 + i]], notify=tag)
          for i, tag in enumerate(tags)]
    for x in xs:
        x.wait(5)
    waiter.join(10)
    assert seen == tags
    for i in range(64):
        assert (dst[i * 4096:i * 4096 + 1000 + i] == src[i * 4096:i * 4096 + 1000 + i]).all()


def _begin_frame(slot: int, notify: bytes) -> bytes:
    """A BEGIN frame for a one-unit write (docs/wire-format.md): body, then its crc32c."""
    body = struct.pack("<QIIB", slot, 1, 5000, 1) + rc.lp(notify) + struct.pack("<Q", 0)
    return (rc.data_frame(rc.D_BEGIN, slot, payload=body, flags=1)
            + struct.pack("<I", kvt._core.crc32c(body)))


def test_a_run_of_begin_frames_longer_than_a_waiters_largest_look_is_taken_in_parts(linked):
    # Eight BEGIN frames with 4000-byte notifications queued ahead of their writes: ~32 KiB of
    # heads, twice the most a spinning waiter peeks at once (16 KiB). It takes them over several
    # looks, loses none, and lands every write after them.
    target, initiator, peer, rs, rd, src, dst = linked
    ctrl, welcome = rc.connect(target.address)
    d = rc.open_data(welcome)
    key = welcome["regions"][rd.id]["key"]
    tags = [bytes([97 + i]) * 4000 for i in range(8)]
    begins = b"".join(_begin_frame(100 + i, tag) for i, tag in enumerate(tags))
    writes = b"".join(rc.data_frame(rc.D_WRITE, 100 + i, rd.id, key, [(i * 64, 16)],
                                    bytes([i + 1]) * 16) for i in range(8))
    reads_before = target.stats()["spin_reads"]
    seen: list[bytes] = []
    waiter = _spin_for(target, tags, seen)
    time.sleep(0.05)
    d.sendall(begins + writes)
    waiter.join(10)
    d.close()
    ctrl.close()
    assert seen == tags
    for i in range(8):
        assert (dst[i * 64:i * 64 + 16] == i + 1).all()
    assert target.stats()["spin_reads"] > reads_before  # the waiter read them, not a thread


def _raw_writes(rd_id: int, key: int, first_slot: int, tags: list[bytes], size: int) -> bytes:
    """BEGIN + write frames of `size` bytes, one pair per tag: write i fills dst[i*size:] with
    the byte i + 1."""
    return b"".join(_begin_frame(first_slot + i, tag)
                    + rc.data_frame(rc.D_WRITE, first_slot + i, rd_id, key, [(i * size, size)],
                                    bytes([i + 1]) * size) for i, tag in enumerate(tags))


def _notifications_within(target, want: set[bytes], seconds: float) -> set[bytes]:
    """The payloads of `want` that arrive within `seconds`, looked for without waiting in the
    endpoint (no waiter reads meanwhile: only the transport's own threads do)."""
    got: set[bytes] = set()
    deadline = time.monotonic() + seconds
    while got != want and time.monotonic() < deadline:
        got |= {n.payload for n in target.notifications()} & want
        time.sleep(0.005)
    return got


def test_frames_that_came_with_the_one_a_waiter_took_are_served_after_it_returns(linked):
    # Eight notified writes in one send: a spinning waiter takes them off the socket in one
    # receive, lands the first (its own) and returns. Nothing more comes on that connection, and
    # nobody waits: the transport's thread must still serve the other seven.
    target, initiator, peer, rs, rd, src, dst = linked
    ctrl, welcome = rc.connect(target.address)
    d = rc.open_data(welcome)
    tags = [b"staged-%d" % i for i in range(8)]
    burst = _raw_writes(rd.id, welcome["regions"][rd.id]["key"], 200, tags, 1000)
    reads_before = target.stats()["spin_reads"]
    send = threading.Timer(0.05, d.sendall, args=(burst,))
    send.start()
    target.wait_notification(tags[0], timeout=5, spin=5)
    send.join()
    assert _notifications_within(target, set(tags[1:]), 3.0) == set(tags[1:])
    for i in range(8):
        assert (dst[i * 1000:(i + 1) * 1000] == i + 1).all()
    assert target.stats()["spin_reads"] > reads_before  # the waiter took the burst
    d.close()
    ctrl.close()


@pytest.mark.parametrize("cut", ["inside the write's header", "inside a payload larger than a "
                                 "waiter takes in one receive"])
def test_a_frame_cut_anywhere_by_a_pause_is_read_whole(linked, cut):
    # The sender pauses mid-frame for 20 ms, far longer than a spinning waiter keeps to a frame
    # it has begun (200 us): whoever reads on, the waiter or the connection's thread, starts
    # where the other stopped.
    target, initiator, peer, rs, rd, src, dst = linked
    ctrl, welcome = rc.connect(target.address)
    d = rc.open_data(welcome)
    size = 200 << 10
    frames = _raw_writes(rd.id, welcome["regions"][rd.id]["key"], 300, [b"cut"], size)
    begin = len(_begin_frame(300, b"cut"))
    at = begin + 20 if cut.startswith("inside the write") else len(frames) - size // 2

    def send() -> None:
        d.sendall(frames[:at])
        time.sleep(0.02)
        d.sendall(frames[at:])

    sender = threading.Timer(0.05, send)
    sender.start()
    target.wait_notification(b"cut", timeout=5, spin=5)
    sender.join()
    assert (dst[:size] == 1).all() and (dst[size:size + 4096] == 0).all()
    d.close()
    ctrl.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_writes_cut_at_random_places_with_random_pauses_all_land_whole(linked, seed):
    # 24 notified writes of 1 B to 400 KiB (some small enough for the waiter to take, some
    # left to the connection thread), sent as one stream cut into random pieces (a few
    # bytes to 100 KiB) with pauses of up to 2 ms between them: a spinning waiter and the
    # connection's thread take turns at the stream wherever the cuts fall, and each write lands
    # whole, in order, once.
    target, initiator, peer, rs, rd, src, dst = linked
    rng = np.random.default_rng(seed)
    ctrl, welcome = rc.connect(target.address)
    d = rc.open_data(welcome)
    key = welcome["regions"][rd.id]["key"]
    sizes = [int(x) for x in rng.integers(1, 400 << 10, 24)]
    offsets = np.cumsum([0] + sizes[:-1])
    tags = [b"cut-%d-%d" % (seed, i) for i in range(24)]
    stream = b"".join(_begin_frame(400 + i, tag)
                      + rc.data_frame(rc.D_WRITE, 400 + i, rd.id, key, [(int(offsets[i]), n)],
                                      bytes([i + 1]) * n)
                      for i, (tag, n) in enumerate(zip(tags, sizes, strict=True)))

    def send() -> None:
        at = 0
        while at < len(stream):
            n = int(rng.integers(1, 64)) if rng.random() < 0.3 else int(rng.integers(1, 100 << 10))
            d.sendall(stream[at:at + n])
            at += n
            time.sleep(float(rng.uniform(0, 0.002)))

    seen: list[bytes] = []
    waiter = _spin_for(target, tags, seen)
    sender = threading.Thread(target=send)
    sender.start()
    sender.join(20)
    waiter.join(20)
    assert seen == tags
    for i, n in enumerate(sizes):
        assert (dst[offsets[i]:offsets[i] + n] == i + 1).all(), i
    d.close()
    ctrl.close()


def test_a_waiter_that_met_bulk_traffic_takes_small_writes_itself_again(linked):
    # A 4 MiB write (the connection's thread's to read) and then small ones: the waiter leaves
    # the bulk to the thread, and reads the small ones after it itself again.
    target, initiator, peer, rs, rd, src, dst = linked
    tags = [b"bulk"] + [b"small-%d" % i for i in range(20)]
    seen: list[bytes] = []
    waiter = _spin_for(target, tags, seen)
    time.sleep(0.01)
    initiator.write(peer, rs, rd.id, [[0, 0, 4 * MiB]], notify=b"bulk").wait(5)
    reads_before = target.stats()["spin_reads"]
    for i in range(20):
        time.sleep(0.002)
        off = 4 * MiB + i * 65536
        initiator.write(peer, rs, rd.id, [[off, off, 65536]], notify=tags[i + 1]).wait(5)
    waiter.join(10)
    assert seen == tags
    assert (dst[:4 * MiB + 20 * 65536] == src[:4 * MiB + 20 * 65536]).all()
    assert target.stats()["spin_reads"] - reads_before >= 10


def test_reads_served_while_a_waiter_spins(linked):
    target, initiator, peer, rs, rd, src, dst = linked
    dst[:] = src
    back = np.zeros(4 * MiB, np.uint8)
    rb = initiator.register(back)
    errors: list[BaseException] = []

    def spin() -> None:
        try:
            target.wait_notification(b"after-reads", timeout=10, spin=10)
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            errors.append(e)

    t = threading.Thread(target=spin)
    t.start()
    for i in range(20):
        initiator.read(peer, rb, rd.id, [[i * 65536, i * 65536, 65536]]).wait(5)
    initiator.read(peer, rb, rd.id, [[0, 0, 4 * MiB]]).wait(5)
    assert (back == src[:4 * MiB]).all()
    initiator.write(peer, rs, rd.id, [[0, 0, 4096]], notify=b"after-reads").wait(5)
    t.join(10)
    assert not t.is_alive() and not errors, errors


def test_after_a_spin_ends_sleeping_waiters_get_data_again(linked):
    target, initiator, peer, rs, rd, src, dst = linked
    with pytest.raises(kvt.TimeoutError):
        target.wait_notification(b"never", timeout=0.2, spin=0.2)
    # Spins briefly, then sleeps: the transport threads must read what comes after the spin.
    x = initiator.write(peer, rs, rd.id, [[0, 0, 65536]], notify=b"late")
    time.sleep(0.05)
    target.wait_notification(b"late", timeout=5)
    x.wait(5)
    y = threading.Timer(0.1, lambda: initiator.write(peer, rs, rd.id, [[0, 0, 65536]],
                                                     notify=b"later"))
    y.start()
    target.wait_notification(b"later", timeout=5, spin=0.01)
    y.join()
    assert (dst[:65536] == src[:65536]).all()


def test_a_peer_dying_mid_frame_neither_hangs_a_spinning_waiter_nor_disturbs_others(linked):
    target, initiator, peer, rs, rd, src, dst = linked
    guarded = np.zeros(4096, np.uint8)
    rg = target.register(guarded, remote_write=True)
    ctrl, welcome = rc.connect(target.address)
    d = rc.open_data(welcome)
    frame = rc.data_frame(rc.D_WRITE, 77, rg.id, welcome["regions"][rg.id]["key"], [(0, 64)],
                          b"x" * 64)
    d.sendall(frame[:-56])  # 8 of its 64 payload bytes; the rest never comes
    t0 = time.monotonic()
    with pytest.raises(kvt.TimeoutError):
        target.wait_notification(b"never-sent", timeout=0.5, spin=0.5)
    assert time.monotonic() - t0 < 2
    d.close()
    ctrl.close()
    x = initiator.write(peer, rs, rd.id, [[0, 0, 65536]], notify=b"still-fine")
    target.wait_notification(b"still-fine", timeout=5, spin=5)
    x.wait(5)
    assert (guarded[8:] == 0).all()


def test_a_frame_announcing_bytes_never_sent_never_blocks_a_spinning_waiter(linked):
    # A BEGIN frame claiming segments (it has none) and a write frame whose segment list
    # never comes: the waiter must not wait for either; its timeout holds.
    target, initiator, peer, rs, rd, src, dst = linked
    for frame in (rc.data_frame(rc.D_BEGIN, 5, descs=[(0, 8)] * 9, flags=1),
                  rc.data_frame(rc.D_WRITE, 6, rd.id, 0, [(0, 8)] * 9, b"x" * 72)):
        ctrl, welcome = rc.connect(target.address)
        d = rc.open_data(welcome)
        # The header and half a segment, sent once the waiter spins (so that it reads them).
        send = threading.Timer(0.05, d.sendall, args=(frame[:rc.DATA_HEADER_SIZE + 8],))
        send.start()
        # A waiter stuck reading the missing bytes is freed after 3 s by ending the connection,
        # so that the failure shows as time, not as a hung test.
        unstick = threading.Timer(3.0, d.shutdown, args=(socket.SHUT_RDWR,))
        unstick.start()
        t0 = time.monotonic()
        with pytest.raises(kvt.TimeoutError):
            target.wait_notification(b"never-sent", timeout=0.3, spin=0.3)
        assert time.monotonic() - t0 < 1.5
        unstick.cancel()
        send.join()
        d.close()
        ctrl.close()
    x = initiator.write(peer, rs, rd.id, [[0, 0, 65536]], notify=b"still-fine")
    target.wait_notification(b"still-fine", timeout=5, spin=5)
    x.wait(5)


def test_hostile_frames_met_by_a_spinning_waiter_are_refused_as_usual(linked):
    target, initiator, peer, rs, rd, src, dst = linked
    guarded = np.zeros(4096, np.uint8)
    rg = target.register(guarded, remote_write=True)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            with contextlib.suppress(kvt.TimeoutError):
                target.wait_notification(b"never", timeout=0.05, spin=0.05)

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.05)

    def attack(make_frame) -> None:
        rc.attack_data(target.address, make_frame)

    g = rg.id
    attack(lambda r: rc.data_frame(rc.D_WRITE, 1, g, r[g]["key"] ^ 1, [(0, 4)], b"evil"))
    attack(lambda r: rc.data_frame(rc.D_WRITE, 2, g, r[g]["key"], [(4094, 4)], b"evil"))
    attack(lambda r: rc.data_frame(rc.D_WRITE, 3, g, r[g]["key"], [(0, 4)], b"evil",
                                   corrupt_crc=True))
    attack(lambda r: rc.data_frame(rc.D_BEGIN, 4, payload=b"\x04" + b"\x00" * 28, flags=1)
           + b"bad!")
    time.sleep(0.3)
    # A legitimate peer is undisturbed, and its notification reaches the spinning loop's peers.
    x = initiator.write(peer, rs, rd.id, [[0, 0, 65536]], notify=b"legit")
    target.wait_notification(b"legit", timeout=5, spin=5)
    x.wait(5)
    stop.set()
    t.join(5)
    assert (guarded == 0).all(), "hostile frames must not touch memory"
    text = " ".join(map(str, target.errors()))
    for fragment in ["wrong key", "outside region", "crc32c"]:
        assert fragment in text, fragment


TCP_INFO_LEN = 232
TCPI_BYTES_RECEIVED = 128  # u64 tcpi_bytes_received in struct tcp_info (Linux >= 4.1)


def _bytes_received_per_socket() -> dict[int, int]:
    """The kernel's count of bytes received on each TCP socket this process holds."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
            try:
                if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
                    out[fd] = struct.unpack_from("<Q", info, TCPI_BYTES_RECEIVED)[0]
            finally:
                s.close()
    return out


def _sockets_that_received(nbytes: int, connections: int) -> list[int]:
    """Writes ``nbytes`` over a fresh pair with ``connections`` data connections; returns what
    each socket that took a share of it (1/8 or more) received."""
    with kvt.Endpoint("decode", transport="tcp", connections=connections) as target, \
            kvt.Endpoint("prefill", transport="tcp", connections=connections) as initiator:
        dst = np.zeros(nbytes, np.uint8)
        src = np.random.default_rng(3).integers(0, 256, nbytes, dtype=np.uint8)
        rd = target.register(dst, remote_write=True)
        rs = initiator.register(src)
        peer = initiator.connect(target.info())
        # 64 KiB blocks in reverse order, as a paged cache's block table scatters them.
        blocks = nbytes // 65536
        segs = [[i * 65536, (blocks - 1 - i) * 65536, 65536] for i in range(blocks)]
        before = _bytes_received_per_socket()
        initiator.write(peer, rs, rd.id, segs, notify=b"layer").wait(5)
        target.wait_notification(b"layer", timeout=5)
        after = _bytes_received_per_socket()
        assert (dst.reshape(blocks, -1)[::-1] == src.reshape(blocks, -1)).all()
    got = [after[fd] - before.get(fd, 0) for fd in after]
    return sorted(n for n in got if n >= nbytes // 8)


@pytest.mark.parametrize("connections", [2, 4])
def test_a_transfer_larger_than_a_waiters_frame_moves_over_every_connection(connections):
    # One 1 MiB layer: on one connection it moves at one stream's speed (~2.7 GB/s here against
    # ~5 over two), so it is cut into one frame per connection.
    shares = _sockets_that_received(1 << 20, connections)
    assert len(shares) == connections, shares
    assert sum(shares) >= 1 << 20


def test_a_transfer_a_waiter_can_read_whole_stays_on_one_connection():
    # 256 KiB: one frame, which a waiting thread reads itself (one wake-up, not one per frame).
    shares = _sockets_that_received(256 << 10, 2)
    assert len(shares) == 1 and shares[0] >= 256 << 10, shares

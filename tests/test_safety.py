"""Bad input gets a clear, typed error and loses nothing: invalid segments, unknown or
deregistered regions, hostile raw-socket peers, wrong keys and bounds."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

import numpy as np
import pytest
import raw_client as rc

import kvtransfer as kvt
from kvtransfer.testing.peers import block_segments


@pytest.fixture
def linked(pair):
    target, initiator = pair
    dst = np.zeros(4096, np.uint8)
    rd = target.register(dst, remote_write=True)
    rs = initiator.register(np.ones(4096, np.uint8))
    peer = initiator.connect(target.info())
    return target, initiator, peer, rs, rd, dst


@pytest.mark.parametrize("segments, match", [
    ([[-1, 0, 10]], "negative"),
    ([[0, -5, 10]], "negative"),
    ([[0, 0, -1]], "negative"),
    ([[0, 0, 4097]], "out of bounds"),
    ([[4000, 0, 100]], "out of bounds"),
    ([[0, 4095, 2]], "out of bounds"),
    ([[0, 2**62, 2**62]], "out of bounds"),
    ([[2**63 - 1, 0, 2**63 - 1]], "out of bounds"),
    ([[0, 0]], "shape"),
])
def test_invalid_segments_raise_before_anything_is_sent(linked, segments, match):
    target, initiator, peer, rs, rd, dst = linked
    with pytest.raises(kvt.InvalidRequestError, match=match):
        initiator.write(peer, rs, rd.id, np.array(segments, dtype=np.int64), notify=b"bad")
    assert (dst == 0).all()
    assert target.notifications() == []


def test_unknown_and_deregistered_regions_are_invalid_requests(linked):
    target, initiator, peer, rs, rd, dst = linked
    with pytest.raises(kvt.InvalidRequestError, match="exposes no region 999"):
        initiator.write(peer, rs, 999, [[0, 0, 1]])
    rd.close()
    # Refused at write() once the target's region update arrived, or by the target's ACK.
    with pytest.raises(kvt.InvalidRequestError, match=f"region {rd.id}"):
        initiator.write(peer, rs, rd.id, [[0, 0, 1]]).wait()
    rs.close()
    with pytest.raises(kvt.InvalidRequestError, match="not registered"):
        initiator.write(peer, rs, 1, [[0, 0, 1]])


def test_write_to_a_region_without_remote_write_is_refused(pair):
    target, initiator = pair
    ro = target.register(np.zeros(64, np.uint8), remote_read=True)
    rs = initiator.register(np.ones(64, np.uint8))
    peer = initiator.connect(target.info())
    with pytest.raises(kvt.InvalidRequestError, match="does not accept remote writes"):
        initiator.write(peer, rs, ro.id, [[0, 0, 64]])


def test_read_only_memory_cannot_be_a_remote_write_target(pair):
    target, _ = pair
    with pytest.raises(kvt.InvalidRequestError, match="read-only"):
        target.register(b"immutable", remote_write=True)


def test_oversized_notification_is_refused(linked):
    target, initiator, peer, rs, rd, dst = linked
    with pytest.raises(kvt.InvalidRequestError, match="notification payload"):
        initiator.write(peer, rs, rd.id, [[0, 0, 1]], notify=b"x" * 5000)


def test_segments_of_the_wrong_shape_or_type_are_rejected(linked):
    target, initiator, peer, rs, rd, dst = linked
    with pytest.raises(kvt.InvalidRequestError):
        initiator.write(peer, rs, rd.id, np.zeros((2, 4), np.int64))
    with pytest.raises(kvt.InvalidRequestError):
        initiator.write("not a peer", rs, rd.id, [[0, 0, 1]])


def _legit_traffic(target, rid: int, stop: threading.Event, errors: list):
    """A well-behaved initiator writing and verifying in a loop until stopped."""
    try:
        with kvt.Endpoint("legit") as ep:
            src = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
            rs = ep.register(src)
            peer = ep.connect(target.info())
            i = 0
            while not stop.is_set():
                ep.write(peer, rs, rid, [[0, 0, 1 << 20]], notify=b"legit-%d" % i).wait(5)
                target.wait_notification(b"legit-%d" % i, timeout=5)
                i += 1
            errors.append(("count", i))
    except Exception as e:  # noqa: BLE001 - reported to the test thread
        errors.append(e)


def test_hostile_raw_clients_do_not_disturb_a_legit_transfer(pair):
    target, _ = pair
    victim = np.zeros(1 << 20, np.uint8)
    guarded = np.zeros(4096, np.uint8)
    rv = target.register(victim, remote_write=True)
    rg = target.register(guarded, remote_write=True, remote_read=True)
    stop, results = threading.Event(), []
    t = threading.Thread(target=_legit_traffic, args=(target, rv.id, stop, results))
    t.start()
    host, port = target.address.rsplit(":", 1)

    def raw(data: bytes) -> None:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            with contextlib.suppress(OSError):  # the endpoint may have closed on us already
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                s.recv(1024)

    raw(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 4)          # garbage
    raw(rc.control_frame(rc.HELLO, b"\x01\x00")[:10])                  # truncated header
    raw(struct.pack("<IHHII", rc.CONTROL_MAGIC, 1, 1, 1 << 30, 0))     # oversized length
    raw(rc.control_frame(rc.HELLO, b"\x01\x00\xff\xff\xff\xff"))       # length field lies
    raw(rc.control_frame(rc.BEGIN, b"\x00" * 8))                       # no handshake first
    bad = bytearray(rc.control_frame(rc.HELLO, b"\x01\x00" + rc.lp(b"x") + rc.lp(b"n")))
    bad[-1] ^= 0xFF
    raw(bytes(bad))                                                    # crc mismatch

    # Data connections: a wrong key, out-of-bounds offsets, a corrupt header, a lying length,
    # a read of memory not exposed for reads. A violation ends that peer's session, so each
    # attack handshakes anew.
    def attack(make_frame) -> None:
        rc.attack_data(target.address, make_frame)

    g, v = rg.id, rv.id
    attack(lambda r: rc.data_frame(rc.D_WRITE, 1, g, r[g]["key"] ^ 1, [(0, 4)], b"evil"))
    attack(lambda r: rc.data_frame(rc.D_WRITE, 2, g, r[g]["key"], [(4094, 4)], b"evil"))
    attack(lambda r: rc.data_frame(rc.D_WRITE, 3, g, r[g]["key"], [(2**64 - 2, 4)], b"evil"))
    attack(lambda r: rc.data_frame(rc.D_WRITE, 4, g, r[g]["key"], [(0, 4)], b"evil",
                                   corrupt_crc=True))
    attack(lambda r: rc.data_frame(rc.D_WRITE, 5, g, r[g]["key"], [(0, 4)], b"evil" * 2))
    attack(lambda r: rc.data_frame(rc.D_WRITE, 6, 12345, 0, [(0, 4)], b"evil"))
    attack(lambda r: rc.data_frame(rc.D_READREQ, 7, v, r[v]["key"], [(0, 4)]))
    # BEGIN frames riding on the data connection: without their crc, and with a wrong one.
    attack(lambda r: rc.data_frame(rc.D_BEGIN, 8, payload=b"\x08" + b"\x00" * 28))
    attack(lambda r: rc.data_frame(rc.D_BEGIN, 9, payload=b"\x09" + b"\x00" * 28, flags=1)
           + b"bad!")
    time.sleep(0.3)
    stop.set()
    t.join(30)
    assert results and results[-1][0] == "count" and results[-1][1] > 0, results
    assert (guarded == 0).all(), "hostile frames must not touch memory"
    assert (victim == np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)).all()
    errors = target.errors()
    assert errors and all(isinstance(e, kvt.ProtocolError) for e in errors)
    text = " ".join(map(str, errors))
    for fragment in ["bad magic", "wrong key", "outside region", "crc32c", "over the limit",
                     "did not start with HELLO", "segments sum to", "without its crc32c",
                     "begin frame of transfer 9 fails its crc32c"]:
        assert fragment in text, fragment


def test_unauthenticated_data_connection_is_dropped(pair):
    target, _ = pair
    host, port = target.address.rsplit(":", 1)
    ctrl, welcome = rc.connect(target.address)
    welcome["token"] ^= 0xDEADBEEF
    d = rc.open_data(welcome)
    d.settimeout(5)
    assert d.recv(16) == b""  # closed on us
    ctrl.close()
    assert any("unknown session token" in str(e) for e in target.errors())


def test_deregistering_a_target_region_mid_transfer_fails_that_transfer_on_both_sides(pair):
    """Deregistration fails transfers in flight: the initiator's ends in ERROR and the target's
    notification raises, so partly written memory is never reported as complete."""
    target, initiator = pair
    bs, n = 1 << 20, 128
    rd = target.register(np.zeros(bs * n, np.uint8), remote_write=True)
    rs = initiator.register(np.ones(bs * n, np.uint8))
    peer = initiator.connect(target.info())
    x = initiator.write(peer, rs, rd.id, block_segments(range(n), range(n), bs), notify=b"gone")
    rd.close(timeout=10)
    try:
        x.wait(10)
    except kvt.InvalidRequestError as e:
        assert "deregistered" in str(e)
        with pytest.raises(kvt.TransportError, match="deregistered"):
            target.wait_notification(b"gone", timeout=5)
    else:  # the whole transfer landed before the region went away
        assert target.wait_notification(b"gone", timeout=5).payload == b"gone"


def test_deregistration_waits_for_a_frame_still_landing_in_the_region(pair):
    """A write frame whose payload is still arriving holds its region: close() cannot return
    (and let the buffer be freed) while bytes are yet to land in it."""
    target, _ = pair
    n = 1 << 20
    dst = np.zeros(n, np.uint8)
    rd = target.register(dst, remote_write=True)
    ctrl, welcome = rc.connect(target.address)
    key = welcome["regions"][rd.id]["key"]
    ctrl.sendall(rc.control_frame(rc.BEGIN, struct.pack("<QII", 9, 1, 60_000) + b"\x01"
                                  + rc.lp(b"landing")))
    frame = rc.data_frame(rc.D_WRITE, 9, rd.id, key, [(0, n)], b"\x07" * n)
    d = rc.open_data(welcome)
    half = rc.DATA_HEADER_SIZE + 16 + n // 2
    d.sendall(frame[:half])
    deadline = time.monotonic() + 5
    while dst[n // 2 - 1] != 7 and time.monotonic() < deadline:  # the first half has landed
        time.sleep(0.01)
    with pytest.raises(kvt.TimeoutError, match="still used"):
        rd.close(timeout=0.3)
    d.sendall(frame[half:])
    assert target.wait_notification(b"landing", timeout=5).payload == b"landing"
    assert (dst == 7).all()
    d.close()
    ctrl.close()


def test_checksummed_transfers_verify_payload_both_ways(pair):
    target, initiator = pair
    bs, n = 64 << 10, 32
    dst = np.zeros(bs * n, np.uint8)
    src = np.random.default_rng(9).integers(0, 256, bs * n, dtype=np.uint8)
    rd = target.register(dst, remote_write=True, remote_read=True)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    perm = np.random.default_rng(1).permutation(n)
    initiator.write(peer, rs, rd.id, block_segments(range(n), perm, bs), notify=b"c",
                    checksum=True).wait()
    target.wait_notification(b"c")
    back = np.zeros_like(src)
    initiator.read(peer, initiator.register(back), rd.id, block_segments(perm, range(n), bs),
                   checksum=True).wait()
    assert (back == src).all()


def test_a_flipped_payload_byte_is_a_protocol_error_naming_the_transfer(pair):
    """A peer whose payload does not match its crc32c: the target fails that transfer (its
    notification raises ProtocolError) instead of decoding it as complete."""
    target, _ = pair
    guarded = np.zeros(64, np.uint8)
    rg = target.register(guarded, remote_write=True)
    ctrl, welcome = rc.connect(target.address)
    key = welcome["regions"][rg.id]["key"]
    slot = 77
    begin = struct.pack("<QII", slot, 1, 5000) + b"\x01" + rc.lp(b"flipped")
    ctrl.sendall(rc.control_frame(rc.BEGIN, begin))
    payload = bytes(range(16))
    crc = kvt._core.crc32c(payload)
    frame = bytearray(rc.data_frame(rc.D_WRITE, slot, rg.id, key, [(0, 16)], payload, flags=1))
    frame[-3] ^= 0x40  # flip one payload bit in flight
    d = rc.open_data(welcome)
    d.sendall(bytes(frame) + struct.pack("<I", crc))
    with pytest.raises(kvt.ProtocolError, match="flipped.*crc32c"):
        target.wait_notification(b"flipped", timeout=5)
    mtype, body = rc.recv_control(ctrl)
    assert mtype == 7 and struct.unpack_from("<QI", body) == (slot, 5)  # ACK carrying the error
    d.close()
    ctrl.close()


def test_corrupted_data_arriving_before_its_begin_still_fails_the_transfer_at_once(pair):
    """Units may overtake their BEGIN (different connections): a refusal recorded first is
    reported when the BEGIN comes, not at the deadline."""
    target, _ = pair
    rg = target.register(np.zeros(64, np.uint8), remote_write=True)
    ctrl, welcome = rc.connect(target.address)
    key = welcome["regions"][rg.id]["key"]
    payload = bytes(range(16))
    frame = rc.data_frame(rc.D_WRITE, 5, rg.id, key, [(0, 16)], payload, flags=1)
    d = rc.open_data(welcome)
    d.sendall(frame + struct.pack("<I", kvt._core.crc32c(payload) ^ 1))
    time.sleep(0.2)
    ctrl.sendall(rc.control_frame(rc.BEGIN, struct.pack("<QII", 5, 1, 60_000) + b"\x01"
                                  + rc.lp(b"overtaken")))
    t0 = time.monotonic()
    with pytest.raises(kvt.ProtocolError, match="crc32c"):
        target.wait_notification(b"overtaken", timeout=10)
    assert time.monotonic() - t0 < 2, "reported at the deadline instead of at once"
    d.close()
    ctrl.close()


def test_checksummed_frame_to_a_vanished_region_is_skipped_whole(pair):
    """Discarding a frame for a deregistered region also skips its crc trailer, so the next
    frame on the connection still parses."""
    target, _ = pair
    live = np.zeros(16, np.uint8)
    rl = target.register(live, remote_write=True)
    ctrl, welcome = rc.connect(target.address)
    payload = bytes(range(16))
    crc = struct.pack("<I", kvt._core.crc32c(payload))
    d = rc.open_data(welcome)
    d.sendall(rc.data_frame(rc.D_WRITE, 1, 999, 0, [(0, 16)], payload, flags=1) + crc)
    d.sendall(rc.data_frame(rc.D_WRITE, 2, rl.id, welcome["regions"][rl.id]["key"], [(0, 16)],
                            payload, flags=1) + crc)
    ctrl.sendall(rc.control_frame(rc.BEGIN, struct.pack("<QII", 2, 1, 5000) + b"\x01"
                                  + rc.lp(b"second")))
    target.wait_notification(b"second", timeout=5)
    assert bytes(live) == payload
    d.close()
    ctrl.close()

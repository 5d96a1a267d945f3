"""The wire codec through the real C++ decoders (kvtransfer._core): every frame and message of
docs/wire-format.md round-trips against an independent Python encoder, and every malformed,
truncated, oversized or corrupted input is a ProtocolError (or InvalidRequestError for a blob
that is not an info blob at all), never a crash or a silently wrong value."""

from __future__ import annotations

import os
import socket
import struct
import threading

import numpy as np
import pytest
import raw_client as rc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvtransfer as kvt
from kvtransfer import _core

V = _core.PROTOCOL_VERSION
(HELLO, CHALLENGE, AUTH, WELCOME, ERROR, BEGIN, ACK, ABORT, NOTIFY, REGIONS_REQ,
 REGIONS) = range(1, 12)
MAX_CONTROL_BODY = 16 << 20
DECODER_ERRORS = (kvt.ProtocolError, kvt.InvalidRequestError)


def lp(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def region_entry(rid: int, key: int, nbytes: int, base: int, flags: int,
                 rkey: bytes = b"") -> bytes:
    return struct.pack("<IQQQB", rid, key, nbytes, base, flags) + lp(rkey)


# One valid body per message type (built by hand from docs/wire-format.md) and its fields as
# decode_message returns them.
BODIES = {
    HELLO: (struct.pack("<H", V) + lp(b"prefill-0") + lp(b"N" * 16),
            {"version": V, "name": b"prefill-0", "nonce": b"N" * 16}),
    CHALLENGE: (struct.pack("<H", V) + lp(b"decode-0") + lp(b"M" * 16) + b"\x01" + lp(b"P" * 32),
                {"version": V, "name": b"decode-0", "nonce": b"M" * 16, "auth_required": True,
                 "proof": b"P" * 32}),
    AUTH: (lp(b"p" * 32), {"proof": b"p" * 32}),
    WELCOME: (struct.pack("<Q", 42) + lp(b"tcp") + lp(b"127.0.0.1:5000") + struct.pack("<I", 2)
              + region_entry(1, 0x1122334455667788, 4096, 0x7F0000000000, 1)
              + region_entry(9, 5, 1 << 40, 0, 3, b"rkey"),
              {"token": 42, "transport": b"tcp", "address": b"127.0.0.1:5000", "regions": {
                  1: {"key": 0x1122334455667788, "nbytes": 4096, "base": 0x7F0000000000,
                      "remote_write": True, "remote_read": False, "rkey": b""},
                  9: {"key": 5, "nbytes": 1 << 40, "base": 0, "remote_write": True,
                      "remote_read": True, "rkey": b"rkey"}}}),
    ERROR: (struct.pack("<I", 5) + lp(b"incompatible protocol version"),
            {"code": 5, "message": b"incompatible protocol version"}),
    BEGIN: (struct.pack("<QIIB", 7, 3, 5000, 1) + lp(b"req-42"),
            {"slot": 7, "units": 3, "deadline_ms": 5000, "has_notify": True, "notify": b"req-42"}),
    ACK: (struct.pack("<QI", 7, 2) + lp(b"peer refused"),
          {"slot": 7, "code": 2, "message": b"peer refused"}),
    ABORT: (struct.pack("<Q", 7) + lp(b"deadline passed"),
            {"slot": 7, "reason": b"deadline passed"}),
    NOTIFY: (struct.pack("<Q", 8) + lp(b"req-7"), {"slot": 8, "payload": b"req-7"}),
    REGIONS_REQ: (b"", {}),
    REGIONS: (struct.pack("<I", 1) + region_entry(3, 1, 2, 3, 2),
              {"regions": {3: {"key": 1, "nbytes": 2, "base": 3, "remote_write": False,
                               "remote_read": True, "rkey": b""}}}),
}


def py_frame(mtype: int, body: bytes, version: int = V) -> bytes:
    """A control frame: its crc32c covers the header (crc field zero), then the body."""
    header = struct.pack("<IHHI", rc.CONTROL_MAGIC, version, mtype, len(body))
    return header + struct.pack("<I", crc32c_ref(header + bytes(4) + body)) + body


def crc32c_ref(data: bytes, crc: int = 0) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected), independent of the C++ one."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# -- crc32c -------------------------------------------------------------------------------------

def test_crc32c_known_values_and_extension():
    assert _core.crc32c(b"") == 0
    assert _core.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert _core.crc32c(bytes(32)) == 0x8A9136AA     # RFC 3720 B.4
    assert _core.crc32c(b"\xff" * 32) == 0x62A8AB43
    data = os.urandom(10_000)
    for cut in (0, 1, 7, 8, 9, 4096, 9999):
        assert _core.crc32c(data[cut:], _core.crc32c(data[:cut])) == _core.crc32c(data)


@given(st.binary(max_size=300))
def test_crc32c_matches_the_bitwise_reference(data):
    assert _core.crc32c(data) == crc32c_ref(data)


def test_crc32c_takes_any_contiguous_buffer():
    data = os.urandom(200_000)  # over the size where it releases the GIL
    want = _core.crc32c(data)
    assert _core.crc32c(bytearray(data)) == want
    assert _core.crc32c(memoryview(data)) == want
    assert _core.crc32c(np.frombuffer(data, dtype=np.uint8)) == want
    assert _core.crc32c(np.frombuffer(data, dtype=np.uint32)) == want
    with pytest.raises(kvt.InvalidRequestError, match="contiguous"):
        _core.crc32c(np.frombuffer(data, dtype=np.uint8)[::2])
    with pytest.raises(kvt.InvalidRequestError):
        _core.crc32c("text")


# -- control frames -----------------------------------------------------------------------------

@pytest.mark.parametrize("mtype", sorted(BODIES))
def test_control_frames_round_trip_against_the_reference_encoder(mtype):
    body, fields = BODIES[mtype]
    frame = _core.encode_control(mtype, body)
    assert frame == py_frame(mtype, body)  # byte for byte what the doc says
    assert _core.decode_control(frame) == (mtype, V, body)
    assert _core.decode_message(mtype, body) == fields


@pytest.mark.parametrize("mtype", sorted(BODIES))
def test_appended_fields_are_ignored_by_every_body_decoder(mtype):
    """Forward compatibility: a newer minor version may append fields; old decoders skip them."""
    body, fields = BODIES[mtype]
    assert _core.decode_message(mtype, body + b"\x00future-field\xff") == fields


@pytest.mark.parametrize("mtype", sorted(t for t in BODIES if BODIES[t][0]))
def test_every_truncation_of_a_body_is_a_protocol_error(mtype):
    body, _ = BODIES[mtype]
    for cut in range(len(body)):
        with pytest.raises(kvt.ProtocolError, match="truncated|claims"):
            _core.decode_message(mtype, body[:cut])


def test_header_rejections_name_the_problem():
    body, _ = BODIES[BEGIN]
    good = py_frame(BEGIN, body)
    with pytest.raises(kvt.ProtocolError, match="bad magic"):
        _core.decode_control(b"GET / HTTP/1.1\r\n" + body)
    for t in (0, 12, 0xFFFF):
        with pytest.raises(kvt.ProtocolError, match=f"unknown type {t}"):
            _core.decode_control(good[:6] + struct.pack("<H", t) + good[8:])
    with pytest.raises(kvt.ProtocolError, match="over the limit"):
        _core.decode_control(good[:8] + struct.pack("<I", MAX_CONTROL_BODY + 1) + good[12:])
    with pytest.raises(kvt.ProtocolError, match="truncated"):
        _core.decode_control(good[:15])
    with pytest.raises(kvt.ProtocolError, match="bytes follow"):
        _core.decode_control(good[:-1])
    with pytest.raises(kvt.ProtocolError, match="bytes follow"):
        _core.decode_control(good + b"x")
    # The version is the caller's to judge (the handshake answers it naming both versions).
    assert _core.decode_control(py_frame(BEGIN, body, version=V + 1))[1] == V + 1


def test_every_flipped_bit_of_a_control_frame_is_detected():
    body, _ = BODIES[WELCOME]
    frame = bytearray(py_frame(WELCOME, body))
    for i in range(len(frame)):  # header fields included: the crc covers them too
        for bit in (0, 1, 7):
            bad = bytearray(frame)
            bad[i] ^= 1 << bit
            with pytest.raises(kvt.ProtocolError):
                _core.decode_control(bytes(bad))


@pytest.mark.parametrize("mtype, body, match", [
    (HELLO, struct.pack("<H", V) + lp(b"n" * 257) + lp(b""), "over the limit of 256"),
    (HELLO, struct.pack("<H", V) + lp(b"n") + lp(b"x" * 65), "over the limit of 64"),
    (HELLO, struct.pack("<HI", V, 0xFFFFFFFF), "4294967295 bytes, over the limit"),
    (AUTH, lp(b"p" * 65), "over the limit of 64"),
    (BEGIN, struct.pack("<QIIB", 1, 1, 1, 1) + lp(b"x" * 4097), "over the limit of 4096"),
    (NOTIFY, struct.pack("<Q", 1) + lp(b"x" * 4097), "over the limit of 4096"),
    (ERROR, struct.pack("<I", 1) + lp(b"m" * (64 * 1024 + 1)), "over the limit of 65536"),
    (REGIONS, struct.pack("<I", 0xFFFFFFFF), "claims 4294967295 entries"),
    (REGIONS, struct.pack("<I", 2) + region_entry(1, 1, 1, 1, 1), "claims 2 entries"),
    (WELCOME, struct.pack("<Q", 1) + lp(b"tcp") + lp(b"a:1") + struct.pack("<I", 1 << 20),
     "entries in 0 bytes"),
    (REGIONS, struct.pack("<I", 1) + struct.pack("<IQQQB", 1, 1, 1, 1, 1) + struct.pack("<I", 1025),
     "over the limit of 1024"),
])
def test_lengths_and_counts_over_their_caps_are_refused_before_allocating(mtype, body, match):
    with pytest.raises(kvt.ProtocolError, match=match):
        _core.decode_message(mtype, body)


def test_unknown_message_type_is_refused():
    with pytest.raises(kvt.ProtocolError, match="unknown type 99"):
        _core.decode_message(99, b"")
    with pytest.raises(kvt.InvalidRequestError):
        _core.encode_control(99, b"")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 13), st.binary(max_size=200))
def test_random_bodies_decode_or_raise_protocol_error(mtype, body):
    try:
        _core.decode_message(mtype, body)
    except kvt.ProtocolError:
        pass


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=120))
def test_random_frames_decode_or_raise_protocol_error(data):
    try:
        mtype, _, body = _core.decode_control(data)
    except kvt.ProtocolError:
        return
    try:
        _core.decode_message(mtype, body)
    except kvt.ProtocolError:
        pass


# -- the frames a live endpoint sends -----------------------------------------------------------

def test_a_live_endpoints_hello_and_welcome_decode_as_documented():
    with kvt.Endpoint("decode-7") as d:
        region = d.register(np.zeros(4096, np.uint8), remote_write=True)
        host, port = d.address.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=5)
        try:
            s.sendall(py_frame(HELLO, BODIES[HELLO][0]))
            mtype, body = rc.recv_control(s)
            challenge = _core.decode_message(mtype, body)
            assert mtype == CHALLENGE and challenge["version"] == V
            assert challenge["name"] == b"decode-7" and not challenge["auth_required"]
            assert len(challenge["nonce"]) == 16
            s.sendall(py_frame(AUTH, lp(b"")))
            mtype, body = rc.recv_control(s)
            welcome = _core.decode_message(mtype, body)
        finally:
            s.close()
        assert mtype == WELCOME and welcome["transport"] == b"tcp"
        assert welcome["regions"][region.id]["nbytes"] == 4096
        assert welcome["regions"][region.id]["remote_write"]

    # And the HELLO an endpoint sends when it connects.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got: list = []

    def serve():
        c, _ = srv.accept()
        header = rc.recv_exact(c, 16)
        got.append(header + rc.recv_exact(c, struct.unpack_from("<I", header, 8)[0]))
        c.close()

    t = threading.Thread(target=serve)
    t.start()
    with kvt.Endpoint("prefill-3") as p, pytest.raises(kvt.KVTransferError):
        p.connect(f"127.0.0.1:{srv.getsockname()[1]}", timeout=2)
    t.join(5)
    srv.close()
    mtype, version, body = _core.decode_control(got[0])
    hello = _core.decode_message(mtype, body)
    assert (mtype, version) == (HELLO, V)
    assert hello["version"] == V and hello["name"] == b"prefill-3" and len(hello["nonce"]) == 16


# -- endpoint info ------------------------------------------------------------------------------

def py_info(name: bytes, address: bytes, transport: bytes, regions, version: int = V) -> bytes:
    return (struct.pack("<IH", 0x4954564B, version) + lp(name) + lp(address) + lp(transport)
            + struct.pack("<I", len(regions))
            + b"".join(struct.pack("<IQ", rid, n) for rid, n in regions))


def test_endpoint_info_round_trips_and_matches_a_live_endpoint():
    blob = _core.encode_info("d", "127.0.0.1:1", "tcp", [(1, 4096), (2, 1 << 40)])
    assert blob == py_info(b"d", b"127.0.0.1:1", b"tcp", [(1, 4096), (2, 1 << 40)])
    assert _core.decode_info(blob) == {"name": b"d", "address": b"127.0.0.1:1",
                                       "transport": b"tcp", "regions": [(1, 4096), (2, 1 << 40)]}
    with kvt.Endpoint("decode-9") as d:
        r = d.register(np.zeros(100, np.uint8), remote_write=True)
        info = _core.decode_info(d.info())
        assert info["name"] == b"decode-9" and info["address"].decode() == d.address
        assert (r.id, 100) in info["regions"]


def test_endpoint_info_rejections():
    good = py_info(b"d", b"127.0.0.1:1", b"tcp", [(1, 2)])
    with pytest.raises(kvt.InvalidRequestError, match="not a kvtransfer endpoint info"):
        _core.decode_info(b"127.0.0.1:5555")
    with pytest.raises(kvt.ProtocolError, match=f"version {V + 1}.*version {V}"):
        _core.decode_info(py_info(b"d", b"a:1", b"tcp", [], version=V + 1))
    for cut in range(4, len(good)):
        with pytest.raises(kvt.ProtocolError):
            _core.decode_info(good[:cut])
    huge = py_info(b"d", b"a:1", b"tcp", [])[:-4] + struct.pack("<I", 0xFFFFFFFF)
    with pytest.raises(kvt.ProtocolError, match="region count"):
        _core.decode_info(huge)
    with pytest.raises(kvt.ProtocolError, match="over the limit"):
        _core.decode_info(struct.pack("<IHI", 0x4954564B, V, 0xFFFFFFF0))
    assert _core.decode_info(good + b"appended")["regions"] == [(1, 2)]  # forward compatible


def test_connect_with_a_damaged_info_blob_is_a_clean_error():
    with kvt.Endpoint("d") as d, kvt.Endpoint("p") as p:
        info = d.info()
        with pytest.raises(kvt.ProtocolError):
            p.connect(info[:-3] if len(info) > 10 else info[:8])
        with pytest.raises(kvt.ProtocolError):
            p.connect(info[:4] + struct.pack("<H", V + 1) + info[6:])


@settings(max_examples=300)
@given(st.binary(max_size=100))
def test_random_info_blobs_decode_or_raise(data):
    for blob in (data, struct.pack("<IH", 0x4954564B, V) + data):
        try:
            _core.decode_info(blob)
        except DECODER_ERRORS:
            pass


# -- data frames --------------------------------------------------------------------------------

def test_data_frames_round_trip_against_the_reference_encoder():
    descs = [(0, 4096), (8192, 100), (2**63, 1)]
    raw = _core.encode_data_frame(rc.D_WRITE, slot=9, region=3, key=0xDEADBEEF, frame=2,
                                  payload=4197, descs=descs)
    ref = rc.data_frame(rc.D_WRITE, 9, region=3, key=0xDEADBEEF, descs=descs, frame=2)
    assert raw[:20] == ref[:20] and raw[24:40] == ref[24:40] and raw[48:] == ref[48:]
    got = _core.decode_data_frame(raw)
    assert got == {"type": rc.D_WRITE, "flags": 0, "region": 3, "frame": 2, "slot": 9,
                   "key": 0xDEADBEEF, "payload": 4197, "descs": descs}
    flagged = _core.encode_data_frame(rc.D_WRITE, slot=1, payload=10, flags=1, descs=[(0, 10)])
    assert flagged[7] == 1 and _core.decode_data_frame(flagged)["flags"] == 1
    hello = rc.data_frame(rc.D_HELLO, 0x1234)
    assert hello == _core.encode_data_frame(rc.D_HELLO, slot=0x1234)
    assert _core.decode_data_frame(hello)["slot"] == 0x1234


def test_every_flipped_bit_of_a_data_frame_is_detected():
    raw = _core.encode_data_frame(rc.D_WRITE, slot=9, region=3, key=7, payload=8,
                                  descs=[(0, 4), (16, 4)])
    for i in range(len(raw)):
        for bit in (0, 3, 7):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            with pytest.raises(kvt.ProtocolError):
                _core.decode_data_frame(bytes(bad))


@pytest.mark.parametrize("patch, match", [
    ((0, struct.pack("<I", rc.CONTROL_MAGIC)), "bad magic"),
    ((4, struct.pack("<H", V + 1)), f"version {V + 1}"),
    ((6, b"\x00"), "unknown type 0"),
    ((6, b"\x07"), "unknown type 7"),
    ((7, b"\x02"), "unknown flags"),
    ((8, struct.pack("<I", 1001)), "over the limit of 1000"),
    ((8, struct.pack("<I", 0xFFFFFFFF)), "over the limit of 1000"),
])
def test_data_header_rejections(patch, match):
    raw = bytearray(_core.encode_data_frame(rc.D_WRITE, slot=1, payload=1, descs=[(0, 1)]))
    at, value = patch
    raw[at:at + len(value)] = value
    with pytest.raises(kvt.ProtocolError, match=match):
        _core.decode_data_frame(bytes(raw))


def test_data_frame_length_must_match_its_descriptor_count():
    raw = _core.encode_data_frame(rc.D_WRITE, slot=1, payload=2, descs=[(0, 1), (1, 1)])
    with pytest.raises(kvt.ProtocolError, match="truncated"):
        _core.decode_data_frame(raw[:47])
    with pytest.raises(kvt.ProtocolError, match="2 descriptors"):
        _core.decode_data_frame(raw[:-1])
    with pytest.raises(kvt.InvalidRequestError, match="too many"):
        _core.encode_data_frame(rc.D_WRITE, slot=1, descs=[(0, 1)] * 1001)


@settings(max_examples=300)
@given(st.binary(min_size=48, max_size=48 + 16 * 3))
def test_random_data_frames_decode_or_raise(data):
    try:
        _core.decode_data_frame(data)
    except kvt.ProtocolError:
        pass


# -- the seed corpus is what the encoders produce ----------------------------------------------

CORPUS = os.path.join(os.path.dirname(__file__), "fuzz_corpus")


@pytest.mark.parametrize("name, decode", [
    ("hello", lambda b: _core.decode_message(*_core.decode_control(b)[::2])),
    ("welcome", lambda b: _core.decode_message(*_core.decode_control(b)[::2])),
    ("regions", lambda b: _core.decode_message(*_core.decode_control(b)[::2])),
])
def test_control_seeds_decode(name, decode):
    with open(os.path.join(CORPUS, "control", name), "rb") as f:
        assert decode(f.read())


def test_every_seed_decodes_or_raises_a_typed_error():
    """Replays the whole fuzz seed corpus through the Python-reachable decoders."""
    decoders = {
        "control": lambda b: _core.decode_message(*_core.decode_control(b)[::2]),
        "data_frame": lambda b: _core.decode_data_frame(b[:48 + 16 * (
            struct.unpack_from("<I", b, 8)[0] if len(b) >= 12 else 0)]),
        "endpoint_info": _core.decode_info,
        "kv_file": _core.decode_kv_header,
        "ticket": lambda b: (_core.decode_note(b[1:]) if b[0] & 1 else _core.decode_ticket(b[1:])),
    }
    seen = 0
    for harness, decode in decoders.items():
        folder = os.path.join(CORPUS, harness)
        if harness == "ticket" and not hasattr(_core, "decode_ticket"):
            continue
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            try:
                decode(data)
            except DECODER_ERRORS:
                pass
            seen += 1
    assert seen > 40

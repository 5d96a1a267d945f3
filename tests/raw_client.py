"""A minimal kvtransfer protocol client in pure Python, for hostile-peer tests: it speaks the
wire format of docs/wire-format.md byte by byte, so tests can send what no real peer would."""

from __future__ import annotations

import contextlib
import os
import socket
import struct

from kvtransfer import _core

CONTROL_MAGIC = 0x4354564B
DATA_MAGIC = 0x4454564B
HELLO, CHALLENGE, AUTH, WELCOME, ERROR = 1, 2, 3, 4, 5
BEGIN = 6
D_HELLO, D_WRITE, D_READREQ, D_BEGIN = 1, 2, 3, 6
DATA_HEADER = "<IHBBIIIIQQQ"
DATA_HEADER_SIZE = struct.calcsize(DATA_HEADER)


def lp(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def control_frame(mtype: int, body: bytes, version: int = _core.PROTOCOL_VERSION) -> bytes:
    # The crc32c covers the header (crc field zero), then the body.
    crc = _core.crc32c(struct.pack("<IHHII", CONTROL_MAGIC, version, mtype, len(body), 0) + body)
    return struct.pack("<IHHII", CONTROL_MAGIC, version, mtype, len(body), crc) + body


def data_frame(ftype: int, slot: int, region: int = 0, key: int = 0, descs=(), payload: bytes = b"",
               frame: int = 0, corrupt_crc: bool = False, flags: int = 0) -> bytes:
    rawd = b"".join(struct.pack("<QQ", off, ln) for off, ln in descs)
    hdr = bytearray(struct.pack(DATA_HEADER, DATA_MAGIC, _core.PROTOCOL_VERSION, ftype, flags,
                                len(descs), region, frame, 0, slot, key, len(payload)))
    crc = _core.crc32c(bytes(hdr) + rawd)
    struct.pack_into("<I", hdr, 20, crc ^ (1 if corrupt_crc else 0))
    return bytes(hdr) + rawd + payload


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def recv_control(s: socket.socket) -> tuple[int, bytes]:
    _, _, mtype, length, _ = struct.unpack("<IHHII", recv_exact(s, 16))
    return mtype, recv_exact(s, length)


class Reader:
    def __init__(self, b: bytes):
        self.b, self.i = b, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.b, self.i)
        self.i += struct.calcsize(fmt)
        return v[0]

    def bytes(self) -> bytes:
        n = self.take("<I")
        v = self.b[self.i:self.i + n]
        self.i += n
        return v


def connect(address: str, version: int = _core.PROTOCOL_VERSION):
    """Handshakes as a peer with no auth token; returns (control socket, welcome dict)."""
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(control_frame(HELLO, struct.pack("<H", version) + lp(b"raw") + lp(os.urandom(16)),
                            version=version))
    mtype, body = recv_control(s)
    if mtype == ERROR:
        r = Reader(body)
        return s, {"error": (r.take("<I"), r.bytes().decode())}
    assert mtype == CHALLENGE
    s.sendall(control_frame(AUTH, lp(b"")))
    mtype, body = recv_control(s)
    assert mtype == WELCOME, mtype
    r = Reader(body)
    token = r.take("<Q")
    transport = r.bytes().decode()
    data_address = r.bytes().decode()
    regions = {}
    for _ in range(r.take("<I")):
        rid, key, nbytes, _base, flags = (r.take("<I"), r.take("<Q"), r.take("<Q"), r.take("<Q"),
                                          r.take("<B"))
        r.bytes()
        regions[rid] = {"key": key, "nbytes": nbytes, "flags": flags}
    return s, {"token": token, "transport": transport, "data": data_address, "regions": regions}


def open_data(welcome: dict) -> socket.socket:
    host, port = welcome["data"].rsplit(":", 1)
    d = socket.create_connection((host, int(port)), timeout=5)
    d.sendall(data_frame(D_HELLO, welcome["token"]))
    return d


def attack_data(address: str, make_frame) -> None:
    """Handshakes anew (a violation ends that peer's session), sends make_frame(regions) on a
    data connection, and waits until the endpoint has dealt with it (closed it, or not)."""
    ctrl, welcome = connect(address)
    d = open_data(welcome)
    with contextlib.suppress(OSError):
        d.sendall(make_frame(welcome["regions"]))
        d.shutdown(socket.SHUT_WR)
        d.recv(64)
    d.close()
    ctrl.close()

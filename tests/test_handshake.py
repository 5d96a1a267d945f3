"""Handshake: optional HMAC authentication and protocol version checks, reported on both sides."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest
import raw_client as rc

import kvtransfer as kvt


def test_matching_tokens_connect_and_transfer():
    with kvt.Endpoint("d", auth_token="s3cret") as d, kvt.Endpoint("p", auth_token="s3cret") as p:
        dst = np.zeros(8, np.uint8)
        rd = d.register(dst, remote_write=True)
        peer = p.connect(d.info())
        p.write(peer, p.register(np.ones(8, np.uint8)), rd.id, [[0, 0, 8]]).wait()
        assert (dst == 1).all()


@pytest.mark.parametrize("server_token, client_token", [
    ("right", "wrong"), ("right", None), (None, "right")])
def test_wrong_or_missing_token_is_an_authentication_error_on_both_sides(server_token,
                                                                        client_token):
    with kvt.Endpoint("d", auth_token=server_token) as d, \
            kvt.Endpoint("p", auth_token=client_token) as p:
        d.register(np.zeros(8, np.uint8), remote_write=True)
        with pytest.raises(kvt.AuthenticationError) as exc:
            p.connect(d.info())
        assert isinstance(exc.value, PermissionError)
        deadline = threading.Event()
        for _ in range(50):
            if d.errors():
                break
            deadline.wait(0.02)
        assert any(isinstance(e, kvt.AuthenticationError) for e in d.errors()), d.errors()


def test_a_newer_client_version_is_refused_naming_both_versions():
    with kvt.Endpoint("d") as d:
        _, reply = rc.connect(d.address, version=kvt._core.PROTOCOL_VERSION + 1)
        code, message = reply["error"]
        assert code == 5
        v = kvt._core.PROTOCOL_VERSION
        assert f"v{v + 1}" in message and f"v{v}" in message
        for _ in range(50):
            if d.errors():
                break
            threading.Event().wait(0.02)
        assert any(isinstance(e, kvt.ProtocolError) and f"v{v + 1}" in str(e) for e in d.errors())


def test_a_newer_server_version_is_a_protocol_error_at_connect():
    """A fake server that answers with a future version: connect() names both versions."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    v = kvt._core.PROTOCOL_VERSION

    def serve():
        c, _ = srv.accept()
        rc.recv_control(c)
        body = struct.pack("<H", v + 1) + rc.lp(b"future") + rc.lp(b"n" * 16) + b"\0" + rc.lp(b"")
        c.sendall(rc.control_frame(rc.CHALLENGE, body, version=v + 1))
        try:
            rc.recv_control(c)
        except ConnectionError:
            pass
        c.close()

    t = threading.Thread(target=serve)
    t.start()
    with kvt.Endpoint("p") as p:
        with pytest.raises(kvt.ProtocolError, match=f"v{v + 1}.*v{v}"):
            p.connect(f"127.0.0.1:{port}")
    t.join(5)
    srv.close()


def test_connect_to_nothing_is_a_transport_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with kvt.Endpoint("p") as p:
        with pytest.raises(kvt.TransportError, match="cannot connect"):
            p.connect(f"127.0.0.1:{port}")


def test_garbage_info_blob_is_an_invalid_request():
    with kvt.Endpoint("p") as p, pytest.raises(kvt.InvalidRequestError):
        p.connect(b"not-an-address")

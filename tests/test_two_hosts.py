"""Two hosts for real: prefill and decode endpoints in two network namespaces joined by a veth
pair (made here; needs root and iproute2). Bringing the link down mid-transfer is an ERROR on
both sides within the deadline and nothing is reported done; with the link back, new transfers
succeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from kvtransfer.testing.netns import NetnsUnavailable, two_hosts

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def hosts():
    try:
        with two_hosts() as h:
            yield h
    except NetnsUnavailable as e:
        pytest.skip(f"two-host tests need network namespaces: {e}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Peer:
    """A netns_peer process in a namespace, spoken to in JSON lines."""

    def __init__(self, ns: str, *args: str):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "kvtransfer.testing.netns_peer",
             *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 30.0) -> dict:
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "peer did not answer in time"
        line = self.proc.stdout.readline()
        assert line, f"peer exited ({self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def pair(hosts):
    target = Peer(hosts.decode_ns, "target", "--listen", f"{hosts.decode_ip}:0",
                  "--nbytes", str(256 << 20), "--timeout", "2")
    hello = target.recv(60)
    initiator = Peer(hosts.prefill_ns, "initiator", "--connect", hello["info"],
                     "--timeout", "2")
    assert initiator.recv(60) == {"connected": True}
    yield target, initiator, hello["region"]
    initiator.close()
    target.close()


def _write(initiator, target, region, tag: str, seed: int, nblocks: int, bs: int = 1 << 20):
    dst = list(range(nblocks))[::-1]
    initiator.send(write=tag.encode().hex(), region=region, seed=seed, block_bytes=bs,
                   dst_blocks=dst)
    target.send(wait=tag.encode().hex(), seed=seed, block_bytes=bs, blocks=dst)


def test_a_transfer_crosses_the_veth_verified(pair):
    target, initiator, region = pair
    _write(initiator, target, region, "across", 1, 64)
    assert initiator.recv() == {"writing": True}
    assert "done" in initiator.recv()
    assert target.recv() == {"ok": True}


def test_link_down_mid_transfer_fails_both_sides_then_recovers(pair, hosts):
    target, initiator, region = pair
    ns, dev = hosts.decode_ns, hosts.decode_dev
    _write(initiator, target, region, "cut", 2, 256)
    assert initiator.recv() == {"writing": True}
    time.sleep(0.01)  # bytes are on the wire now
    _ip("-n", ns, "link", "set", dev, "down")
    t0 = time.monotonic()
    try:
        got_i, got_t = initiator.recv(30), target.recv(30)
    finally:
        _ip("-n", ns, "link", "set", dev, "up")
    elapsed = time.monotonic() - t0
    print("initiator:", got_i, "target:", got_t, f"after {elapsed:.2f} s")
    if "done" in got_i:  # finished before the link went down: then it must verify
        assert got_t == {"ok": True}
    else:
        assert got_i["error"] in ("TimeoutError", "TransportError"), got_i
        # The target knew of the transfer (its BEGIN arrived) and reports it failed, not done.
        assert got_t.get("error") == "TransportError", got_t
        assert elapsed < 10, f"errors took {elapsed:.1f} s"
    time.sleep(0.5)  # the link is back
    _write(initiator, target, region, "after", 3, 16)
    assert initiator.recv(30) == {"writing": True}
    assert "done" in initiator.recv(30)
    assert target.recv(30) == {"ok": True}

"""Bare TCP sockets driven by the same harness: the floor of the latency rows with the bench's
own Python in it, and no transfer library. The prefill side ``sendall``s each source block, in
block order, on one TCP_NODELAY connection; the decode side, which knows the block table,
receives each straight into its destination block (``recv_into``), spinning on non-blocking
receives where the row's decode side spins and blocking in the kernel where it sleeps. There is
no header, no key, no bounds check and no notification: "notified" is the decode side holding
every byte. A row's time minus this one's is what the library adds.

Writes of up to 64 blocks only: it is a reference for the latency rows, not a transport.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import numpy as np

from kvtransfer.bench import harness as common
from kvtransfer.bench.harness import Workload

MAX_BLOCKS = 64


def versions() -> dict[str, str]:
    return {}


def _check(workload: Workload) -> None:
    if workload.op != "write" or workload.blocks > MAX_BLOCKS:
        raise common.Unsupported(
            f"bare sockets are a floor for small writes (up to {MAX_BLOCKS} blocks), not a "
            "transport")


class Target:
    def __init__(self, workload: Workload, buf: np.ndarray, options: dict[str, Any]):
        _check(workload)
        self.register_s = 0.0
        self.listener = socket.create_server((options.get("host", "127.0.0.1"), 0))
        bs = workload.block_bytes
        view = memoryview(buf).cast("B")
        # Where each source block lands, in the order the prefill side sends them.
        self.places = [view[d * bs:(d + 1) * bs] for d in common.block_permutation(workload)]
        self.conn: socket.socket | None = None

    def info(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    def wait(self, tags: list[str], deadline: float, busy: bool) -> None:
        if self.conn is None:
            self.conn, _ = self.listener.accept()
            self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = self.conn
        # Spinning: non-blocking receives. Sleeping: one blocking receive, asleep in the kernel
        # (a Python socket timeout would add a poll() before each).
        conn.setblocking(not busy)
        if not busy:
            left = max(0.001, deadline - common.now())
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            struct.pack("ll", int(left), int(left % 1 * 1e6)))
        for place in self.places:
            got = 0
            while got < len(place):
                try:
                    n = conn.recv_into(place[got:])
                except BlockingIOError:  # nothing yet (spinning), or SO_RCVTIMEO passed
                    if not busy or common.now() > deadline:
                        raise TimeoutError("bare socket: the block did not come") from None
                    continue
                if n == 0:
                    raise ConnectionError("bare socket: the prefill side closed")
                got += n

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


class Initiator:
    def __init__(self, workload: Workload, buf: np.ndarray, info: tuple[str, int],
                 options: dict[str, Any]):
        _check(workload)
        self.register_s = 0.0
        self.sock = socket.create_connection(tuple(info), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bs = workload.block_bytes
        view = memoryview(buf).cast("B")
        self.batches = common.per_batch(
            workload, [view[i * bs:(i + 1) * bs] for i in range(workload.blocks)])

    def post(self, tag: str | None, lo: int, hi: int, deadline: float, busy: bool) -> None:
        (blocks,) = self.batches[lo, hi]
        for block in blocks:
            self.sock.sendall(block)

    def complete(self, deadline: float, busy: bool) -> None:
        pass  # sendall returned: the kernel has every byte, and nothing acknowledges more

    def close(self) -> None:
        self.sock.close()


def make_target(workload: Workload, buf: np.ndarray, options: dict[str, Any]) -> Target:
    return Target(workload, buf, options)


def make_initiator(workload: Workload, buf: np.ndarray, info: Any,
                   options: dict[str, Any]) -> Initiator:
    return Initiator(workload, buf, info, options)


def run(workload: Workload, variant: str = "bare-tcp", hosts: Any = None,
        **options: Any) -> dict[str, Any]:
    """Measure ``workload`` with bare sockets between two spawned processes."""
    spec = common.PeerSpec(__name__, workload, {}, dict(options), **common.places(hosts))
    return common.run_pair(variant, spec, {"notification": "none: the decode side holds every "
                                                           "byte (bare sockets)"})

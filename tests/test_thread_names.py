"""Every thread kvtransfer starts is named `kvt-...` (what it does: kvt-tcp-in, kvt-handoff,
kvt-watchdog, ...), so that an SRE looking at `top -H` or a stack dump of a serving process can
tell kvtransfer's threads apart from the framework's, and which of them burns a core."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kvtransfer as kvt
from kvtransfer import transports

OUR_OWN = [t for t in ("tcp", "cma") if t in transports.available()]


def _threads() -> dict[int, str]:
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            out[int(task.name)] = (task / "comm").read_text().strip()
        except FileNotFoundError:  # ended meanwhile
            pass
    return out


def _busy_pair(transport: str, **kw):
    """Two endpoints that have written, read and notified: every kind of thread is running."""
    target = kvt.Endpoint("decode", transport=transport, **kw)
    initiator = kvt.Endpoint("prefill", transport=transport, **kw)
    dst, src = np.zeros(1 << 20, np.uint8), np.ones(1 << 20, np.uint8)
    rd = target.register(dst, remote_write=True, remote_read=True)
    rs = initiator.register(src)
    peer = initiator.connect(target.info())
    initiator.write(peer, rs, rd.id, [[0, 0, 65536]], notify=b"w").wait(5)
    target.wait_notification(b"w", timeout=5, spin=0.5)
    initiator.read(peer, rs, rd.id, [[0, 65536, 65536]]).wait(5)
    return target, initiator


@pytest.mark.parametrize("transport", OUR_OWN)
def test_every_thread_it_starts_is_named_for_what_it_does(transport):
    before = _threads()
    target, initiator = _busy_pair(transport)
    try:
        new = {tid: name for tid, name in _threads().items() if tid not in before}
    finally:
        target.close()
        initiator.close()
    assert new, "the endpoints run threads"
    unnamed = sorted(name for name in new.values() if not name.startswith("kvt-"))
    assert not unnamed, f"threads without a kvt- name: {unnamed}"
    names = set(new.values())
    for expected in ("kvt-accept", "kvt-control", "kvt-watchdog", "kvt-handoff",
                     f"kvt-{transport}-accept", f"kvt-{transport}-in"):
        assert expected in names, (expected, names)


def test_the_fabric_transport_names_its_own_threads():
    if "fabric" not in transports.available() or "tcp;ofi_rxm" not in transports.fabric_providers():
        pytest.skip("no libfabric tcp provider here")
    before = _threads()
    target, initiator = _busy_pair("fabric", provider="tcp;ofi_rxm")
    try:
        names = {name for tid, name in _threads().items() if tid not in before}
    finally:
        target.close()
        initiator.close()
    # libfabric may start threads of its own; ours are named.
    assert {"kvt-fab-cq", "kvt-fab-report"} <= names, names

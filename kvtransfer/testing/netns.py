"""Two "hosts" on one machine: network namespaces joined by a veth pair, made and removed here
(needs root and iproute2). Used by the two-host tests (tests/test_two_hosts.py) and by
``kvtransfer bench --netns``. Traffic between the two goes over the veth only; nothing outside
the namespaces is reachable from them.

    with two_hosts() as hosts:            # NetnsUnavailable (with the reason) where it cannot
        subprocess.run(["ip", "netns", "exec", hosts.decode_ns, ...])
        # or, in a fresh process: enter(hosts.prefill_ns) before opening any socket
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

DEFAULT_SUBNET = "10.254.77"  # /24 inside the two namespaces only; the host never sees it
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_REC, MS_SLAVE, MNT_DETACH = 0x4000, 1 << 19, 2


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, or the kernel refused)."""


@dataclass(frozen=True)
class TwoHosts:
    decode_ns: str
    prefill_ns: str
    decode_dev: str  # the veth end inside decode_ns
    prefill_dev: str
    decode_ip: str
    prefill_ip: str


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they probably can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (the `ip` command), which is not installed"
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


@contextmanager
def two_hosts(tag: str | None = None, subnet: str = DEFAULT_SUBNET) -> Iterator[TwoHosts]:
    """Makes namespaces decode and prefill joined by a veth pair (decode .1, prefill .2 of
    ``subnet``/24, loopback up in each), yields their names and addresses, and removes them
    (the veth goes with them) on exit, also after an error. ``tag`` keeps names unique per
    process (default: the pid); interface names stay within the kernel's 15 characters."""
    reason = unavailable_reason()
    if reason:
        raise NetnsUnavailable(reason)
    tag = tag or str(os.getpid() % 100000)
    hosts = TwoHosts(f"kvt-d{tag}", f"kvt-p{tag}", f"kvtd{tag}", f"kvtp{tag}",
                     f"{subnet}.1", f"{subnet}.2")
    made: list[str] = []
    try:
        for ns in (hosts.decode_ns, hosts.prefill_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", hosts.decode_dev, "type", "veth", "peer", "name", hosts.prefill_dev)
        for ns, dev, addr in ((hosts.decode_ns, hosts.decode_dev, hosts.decode_ip),
                              (hosts.prefill_ns, hosts.prefill_dev, hosts.prefill_ip)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns in made:  # deleting a namespace deletes the veth end in it, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        # A pair made before a namespace failed to take it would be left in the host's.
        subprocess.run(["ip", "link", "del", hosts.decode_dev], capture_output=True)


def link_bytes(ns: str, dev: str) -> dict[str, int]:
    """{"rx": bytes, "tx": bytes} interface ``dev`` of namespace ``ns`` has counted so far."""
    proc = subprocess.run(["ip", "-j", "-s", "-n", ns, "link", "show", "dev", dev],
                          capture_output=True, text=True, check=True)
    stats = json.loads(proc.stdout)[0]["stats64"]
    return {"rx": int(stats["rx"]["bytes"]), "tx": int(stats["tx"]["bytes"])}


def enter(ns: str) -> None:
    """Moves this process into network namespace ``ns`` as `ip netns exec` does: the network
    namespace, plus a private mount namespace with /sys remounted, so that tools reading
    /sys/class/net (UCX does) see this namespace's interfaces. Call it first thing in a fresh
    process, before any socket is opened or thread started (threads started earlier stay
    where they were)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise NetnsUnavailable(f"{what} failed: {os.strerror(err)}")

    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        check(libc.setns(fd, CLONE_NEWNET), f"setns into network namespace {ns!r}")
    finally:
        os.close(fd)
    check(libc.unshare(CLONE_NEWNS), "unshare of the mount namespace")
    # Keep mounts made here out of the host's namespace, then show this netns's /sys.
    check(libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")
    check(libc.umount2(b"/sys", MNT_DETACH), "umount /sys")
    check(libc.mount(ns.encode(), b"/sys", b"sysfs", 0, None), "mount sysfs on /sys")

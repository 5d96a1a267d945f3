"""The cma (cross-memory attach) transport: what it must get right beyond the conformance suite.

The initiator copies straight into the target's memory, so the target's safety rests on the
region table it publishes in shared memory and the in-flight counters initiators keep there:
deregistration drains copies under way and nothing lands after it returns, a dead initiator
does not wedge it, keys are checked and violations reported at the target, and a peer cma
cannot reach (another host, another pid namespace) is refused at connect, saying why.
"""

from __future__ import annotations

import contextlib
import glob
import json
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque

import numpy as np
import pytest

import kvtransfer as kvt
from kvtransfer import transports
from kvtransfer.testing.peers import block_segments

MiB = 1 << 20
SYS_PROCESS_VM_WRITEV = 311  # x86_64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif("cma" not in transports.available(),
                                reason="this build has no cma transport")


def _ep(name: str, **kw) -> kvt.Endpoint:
    return kvt.Endpoint(name, transport="cma", **{"timeout": 3.0, **kw})


def write_forever(conn, info: bytes, region_id: int, nbytes: int) -> None:
    """Child: writes all of nbytes again and again, alternating two byte values (so a late
    write would show) and keeping three writes queued (so its copy threads never idle), until
    told to stop; then reports how its writes ended."""
    with _ep("prefill-proc", timeout=5.0) as ep:
        sources = [ep.register(np.full(nbytes, v, np.uint8)) for v in (1, 2)]
        peer = ep.connect(info)
        conn.send("connected")
        segs = block_segments(range(nbytes // MiB), range(nbytes // MiB), MiB)
        outcomes: list[str] = []
        pending: deque = deque()

        def settle_oldest() -> None:
            try:
                pending.popleft().wait(5)
                outcomes.append("done")
            except kvt.KVTransferError as e:
                outcomes.append(type(e).__name__)

        k = 0
        while not conn.poll():
            k += 1
            try:
                pending.append(ep.write(peer, sources[k % 2], region_id, segs))
            except kvt.KVTransferError as e:
                outcomes.append(type(e).__name__)
                time.sleep(0.01)
            if len(pending) >= 3 or (pending and not k % 50):
                settle_oldest()
        while pending:
            settle_oldest()
        conn.send(outcomes)


def test_deregistering_under_a_writing_peer_drains_and_nothing_lands_after(spawn):
    with _ep("decode") as target:
        dst = np.zeros(64 * MiB, np.uint8)
        rd = target.register(dst, remote_write=True)
        proc, conn = spawn(write_forever, target.info(), rd.id, dst.nbytes)
        assert conn.recv() == "connected"
        deadline = time.monotonic() + 10
        while not dst[-MiB:].any():  # a few whole rounds have landed: the peer is busy
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(0.02)
        rd.close(timeout=5)
        after = dst.copy()
        time.sleep(0.3)  # the peer keeps trying all along
        conn.send("stop")
        outcomes = conn.recv()
        assert np.array_equal(dst, after), "bytes landed after deregistration returned"
        assert outcomes.count("done") >= 1
        failed = [o for o in outcomes if o != "done"]
        assert failed and set(failed) <= {"InvalidRequestError"}, outcomes


def _stopped_in_a_copy(pid: int) -> bool | None:
    """For a SIGSTOPped process: True once one of its cma copy threads is stopped at the end
    of a process_vm_writev (before it released the region), False if none is, None while some
    thread has not stopped yet."""
    states = []
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(task + "/comm") as f:
                name = f.read().strip()
            with open(task + "/syscall") as f:
                nr = f.read().split()[0]
        except OSError:
            continue
        if nr == "running":
            return None
        states.append((name, nr))
    return any(name == "kvt-cma-copy" and nr == str(SYS_PROCESS_VM_WRITEV)
               for name, nr in states)


def _stop_mid_copy(pid: int) -> None:
    """SIGSTOPs `pid` at a moment one of its copies is under way (retrying until it is)."""
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 2
        while (mid := _stopped_in_a_copy(pid)) is None:
            assert time.monotonic() < deadline, "the initiator did not stop"
            time.sleep(0.001)
        if mid:
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.001 * (os.getpid() % 7))
    pytest.fail("never caught the initiator inside a copy")


def _start_writing_forever(spawn, target, region, dst):
    """A peer process writing `dst` in a loop, returned once its first bytes have landed."""
    proc, conn = spawn(write_forever, target.info(), region.id, dst.nbytes)
    assert conn.recv() == "connected"
    deadline = time.monotonic() + 10
    while not dst[:MiB].any():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return proc, conn


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall number is x86_64's")
def test_deregistration_waits_for_a_copy_under_way(spawn):
    """An initiator stopped inside a copy (SIGSTOP lands as its process_vm_writev returns,
    before it releases the region) holds deregistration up to the endpoint's timeout, which
    then fails rather than return while the region may still be written."""
    with _ep("decode", timeout=1.0) as target:
        dst = np.zeros(256 * MiB, np.uint8)
        rd = target.register(dst, remote_write=True)
        proc, conn = _start_writing_forever(spawn, target, rd, dst)
        _stop_mid_copy(proc.pid)
        try:
            t0 = time.monotonic()
            with pytest.raises(kvt.TimeoutError, match="still being accessed"):
                rd.close(timeout=5)
            assert 0.9 < time.monotonic() - t0 < 2.0
            after = dst.copy()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.2)
        conn.send("stop")
        conn.recv()
        assert np.array_equal(dst, after), "the resumed initiator wrote a withdrawn region"


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall number is x86_64's")
def test_a_killed_initiator_does_not_wedge_deregistration(spawn):
    with _ep("decode", timeout=10.0) as target:
        dst = np.zeros(256 * MiB, np.uint8)
        rd = target.register(dst, remote_write=True)
        proc, conn = _start_writing_forever(spawn, target, rd, dst)
        _stop_mid_copy(proc.pid)  # its copy's in-flight mark is never released now
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
        t0 = time.monotonic()
        rd.close(timeout=10)
        assert time.monotonic() - t0 < 1.0, "deregistration waited for a dead initiator"


def test_a_wrong_key_never_touches_memory_and_is_a_protocol_error_at_the_target():
    with _ep("decode") as target, _ep("prefill", faults="corrupt_key=1") as initiator:
        dst = np.zeros(MiB, np.uint8)
        rd = target.register(dst, remote_write=True)
        rs = initiator.register(np.ones(MiB, np.uint8))
        peer = initiator.connect(target.info())
        x = initiator.write(peer, rs, rd.id, [[0, 0, MiB]], notify=b"forged")
        with pytest.raises(kvt.ProtocolError, match=f"region {rd.id} with a wrong key"):
            x.wait(5)
        with pytest.raises(kvt.KVTransferError):
            target.wait_notification(b"forged", timeout=5)
        deadline = time.monotonic() + 5
        while not target.errors():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert any(isinstance(e, kvt.ProtocolError) and "wrong key" in str(e)
                   for e in target.errors())
        assert not dst.any()


def _cma_sockets() -> set[str]:
    """Abstract socket names of this process's cma endpoints (closed ones may linger)."""
    with open("/proc/net/unix") as f:
        return {line.split()[-1][1:] for line in f
                if f"@kvtransfer-cma-{os.getpid()}-" in line}


def test_hostile_records_on_the_session_socket_are_refused_and_harm_nothing():
    before = _cma_sockets()
    with _ep("decode") as target:
        (name,) = _cma_sockets() - before
        dst = np.zeros(4096, np.uint8)
        rd = target.register(dst, remote_write=True)
        for record in [b"\x01\x00\x00\x00\x00\x00\x00\x00" + b"\xee" * 8,  # unknown token
                       b"\x07\x00",                                          # truncated
                       b"\x04\x00\x00\x00\x01\x00\x00\x00" + b"\x00" * 8]:   # no hello
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect("\0" + name)
            s.settimeout(5)
            s.send(record)
            answer = s.recv(2048)
            assert answer == b"" or b"unknown session token" in answer
            s.close()
        deadline = time.monotonic() + 5
        while len(target.errors()) < 3:
            assert time.monotonic() < deadline, target.errors()
            time.sleep(0.01)
        text = " ".join(map(str, target.errors()))
        assert "unknown session token" in text and "hello" in text and "malformed" in text
        assert not dst.any()
        # The endpoint still serves a real peer.
        with _ep("prefill") as initiator:
            rs = initiator.register(np.full(4096, 7, np.uint8))
            peer = initiator.connect(target.info())
            initiator.write(peer, rs, rd.id, [[0, 0, 4096]]).wait(5)
        assert (dst == 7).all()


# The session's arrival ring, after the busy counters in its board memfd (cma_arrival_ring.h).
RING = 16384 * 4
TAIL, POLLED, RECORDS = RING, RING + 128, RING + 192
RECORD = struct.Struct("<QII232s")


def _boards() -> dict[int, int]:
    """inode -> fd of every cma session board open in this process (a target's memfd and its
    initiator's copy share an inode; endpoints of earlier tests may linger until collected)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "memfd:kvtransfer-cma-busy" in os.readlink(f"/proc/self/fd/{name}"):
                out[os.fstat(int(name)).st_ino] = int(name)
    return out


@contextlib.contextmanager
def _board(before: dict[int, int]):
    """The one session board opened since `before` (a _boards()), mapped as an initiator maps it."""
    new = {ino: fd for ino, fd in _boards().items() if ino not in before}
    assert len(new) == 1, f"expected one new session board, found {len(new)}"
    with mmap.mmap(next(iter(new.values())), 0) as m:
        yield m


def _word(m: mmap.mmap, off: int, fmt: str = "<Q") -> int:
    return struct.unpack_from(fmt, m, off)[0]


def _spinning(target: kvt.Endpoint, seconds: float) -> threading.Thread:
    def spin() -> None:
        with contextlib.suppress(kvt.TimeoutError):
            target.wait_notification(b"never", timeout=seconds, spin=seconds)

    t = threading.Thread(target=spin)
    t.start()
    return t


def test_while_a_waiter_spins_landed_records_go_through_the_shared_ring_not_the_socket():
    before = _boards()
    with _ep("decode") as target, _ep("prefill") as initiator:
        dst = np.zeros(MiB, np.uint8)
        rd = target.register(dst, remote_write=True)
        rs = initiator.register(np.arange(MiB, dtype=np.uint8))
        peer = initiator.connect(target.info())
        with _board(before) as board:
            initiator.write(peer, rs, rd.id, [[0, 0, 4096]], notify=b"asleep").wait(5)
            target.wait_notification(b"asleep", timeout=5)
            assert _word(board, TAIL) == 0 and _word(board, POLLED, "<I") == 0
            spinner = _spinning(target, 0.5)
            deadline = time.monotonic() + 5
            while _word(board, POLLED, "<I") != 1:
                assert time.monotonic() < deadline, "a spinning waiter must raise the ring's flag"
                time.sleep(0.001)
            for i in range(10):
                initiator.write(peer, rs, rd.id, [[i * 4096, i * 4096, 4096]],
                                notify=b"ring-%d" % i).wait(5)
            assert _word(board, TAIL) == 10  # every record came through the ring
            spinner.join(5)
            for i in range(10):
                target.wait_notification(b"ring-%d" % i, timeout=5)
            while _word(board, POLLED, "<I") != 0:  # lowered by the spin's end (hand-off thread)
                assert time.monotonic() < deadline
                time.sleep(0.001)
            initiator.write(peer, rs, rd.id, [[0, 0, 4096]], notify=b"asleep-again").wait(5)
            target.wait_notification(b"asleep-again", timeout=5)
            assert _word(board, TAIL) == 10
        assert (dst[:10 * 4096] == np.arange(MiB, dtype=np.uint8)[:10 * 4096]).all()


def test_no_landed_record_is_lost_as_waiters_start_and_stop_spinning():
    # Spins of every length, short ones ending while bursts of records are being put in the
    # ring: each record reaches exactly one waiter. (The two narrow races this exercises - a
    # record put as the last spinner lowers the flag, or as a session thread goes to sleep - are
    # closed by the order argued in cma_arrival_ring.h; a run here hits them rarely.)
    before = _boards()
    with _ep("decode") as target, _ep("prefill") as initiator:
        dst = np.zeros(MiB, np.uint8)
        rd = target.register(dst, remote_write=True)
        rs = initiator.register(np.full(MiB, 3, np.uint8))
        peer = initiator.connect(target.info())
        n = 2000

        def post() -> None:
            for lo in range(0, n, 8):
                burst = [initiator.write(peer, rs, rd.id, [[0, (i % 16) * 4096, 4096]],
                                         notify=b"r-%d" % i) for i in range(lo, lo + 8)]
                for x in burst:
                    x.wait(5)
                time.sleep(0.0001 * (lo % 3))

        poster = threading.Thread(target=post)
        poster.start()
        for i in range(n):
            spin = (0.0, 0.00002, 0.0002, 0.005)[i % 4]
            got = target.wait_notification(b"r-%d" % i, timeout=5, spin=spin)
            assert got.payload == b"r-%d" % i
        poster.join(10)
        assert target.notifications() == []  # none twice
        with _board(before) as board:
            assert _word(board, TAIL) > 0, "the spinning waits took some records from the ring"


@pytest.mark.parametrize("corrupt", ["tail beyond the ring", "text longer than a record"])
def test_a_corrupted_arrival_ring_ends_that_session_only(corrupt):
    before = _boards()
    with _ep("decode") as target, _ep("prefill") as initiator:
        dst = np.zeros(4096, np.uint8)
        rd = target.register(dst, remote_write=True)
        rs = initiator.register(np.full(4096, 9, np.uint8))
        peer = initiator.connect(target.info())
        initiator.write(peer, rs, rd.id, [[0, 0, 4096]]).wait(5)
        with _board(before) as board:
            if corrupt == "tail beyond the ring":
                struct.pack_into("<Q", board, TAIL, 1000)
            else:
                RECORD.pack_into(board, RECORDS, 77, 1, 9999, b"")
                struct.pack_into("<Q", board, TAIL, 1)
        with pytest.raises(kvt.TimeoutError):
            target.wait_notification(b"never", timeout=0.3, spin=0.3)  # reads the ring
        deadline = time.monotonic() + 5
        while "arrival" not in " ".join(map(str, target.errors())):
            assert time.monotonic() < deadline, target.errors()
            time.sleep(0.01)
        text = " ".join(map(str, target.errors()))
        assert ("1000 records in 64 slots" in text if corrupt == "tail beyond the ring"
                else "9999 bytes of text" in text)
        # The endpoint still serves a new session.
        with _ep("prefill-2") as other:
            rs2 = other.register(np.full(4096, 5, np.uint8))
            other.write(other.connect(target.info()), rs2, rd.id, [[0, 0, 4096]]).wait(5)
        assert (dst == 5).all()


def _needs_root_unshare() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("namespace tests need root and unshare(1)")


def _peer(prefix: list[str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "kvtransfer.testing.netns_peer", *args,
         "--transport", "cma"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_peer_on_another_host_is_refused_at_connect(tmp_path):
    """Another kernel, as the target sees it: its boot_id differs (a mount namespace binds a
    different one over /proc/sys/kernel/random/boot_id)."""
    _needs_root_unshare()
    fake = tmp_path / "boot_id"
    fake.write_text("00000000-1111-2222-3333-444444444444\n")
    shell = (f"mount --bind {fake} /proc/sys/kernel/random/boot_id && exec "
             + " ".join([sys.executable, "-m", "kvtransfer.testing.netns_peer", "target",
                         "--transport", "cma", "--nbytes", "4096", "--listen",
                         "127.0.0.1:0"]))
    target = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               shell], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        line = target.stdout.readline()
        if not line:
            pytest.skip("cannot bind-mount a boot_id here: " + target.stderr.read()[-300:])
        info = bytes.fromhex(json.loads(line)["info"])
        with _ep("prefill") as initiator:
            with pytest.raises(kvt.TransportError, match="another host.*use transport='tcp'"):
                initiator.connect(info)
    finally:
        target.kill()
        target.wait(10)


def test_an_initiator_that_cannot_see_the_target_pid_is_refused_at_connect():
    """The initiator runs in a pid namespace of its own (as in another container): the
    target's pid means nothing there."""
    _needs_root_unshare()
    with _ep("decode") as target:
        target.register(np.zeros(4096, np.uint8), remote_write=True)
        init = _peer(["unshare", "--pid", "--fork"], "initiator", "--connect",
                     target.info().hex(), "--listen", "127.0.0.1:0")
        try:
            out, err = init.communicate(timeout=30)
        finally:
            init.kill()
        if "unshare failed" in err:
            pytest.skip("cannot make a pid namespace here: " + err[-300:])
        assert init.returncode != 0 and "connected" not in out
        assert "TransportError" in err and "pid namespace" in err, err[-2000:]

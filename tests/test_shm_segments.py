"""The shm segments of killed processes are found and removed; a live process's never are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import kvtransfer as kvt
from kvtransfer import doctor, shm_segments, transports

_HOLDER = """
import sys, time
import kvtransfer as kvt
ep = kvt.Endpoint("holder", transport="fabric", provider="shm")
print("READY", flush=True)
time.sleep(120)
"""


@pytest.fixture
def shm_provider() -> None:
    if "fabric" not in transports.available() or "shm" not in transports.fabric_providers():
        pytest.skip("the libfabric shm provider is not available here")
    if not os.path.isdir(shm_segments.SHM_DIR):
        pytest.skip(f"{shm_segments.SHM_DIR} does not exist here")


def _segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir(shm_segments.SHM_DIR) if n.startswith(f"{pid}:")]


def test_a_killed_process_leaves_a_segment_that_doctor_reports_and_cleans(shm_provider, capsys):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "READY"
        mine = _segments_of(holder.pid)
        assert mine, "the shm endpoint made no segment named after its pid"
        assert not [s for s in shm_segments.stale() if s.pid == holder.pid], "alive, not stale"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert _segments_of(holder.pid) == mine, "a killed process cannot remove its segment"
    left = [s for s in shm_segments.stale() if s.pid == holder.pid]
    assert len(left) == len(mine) and all(s.bytes_used > 0 for s in left)
    assert doctor.report()["stale_shm_segments"]["count"] >= len(mine)

    assert doctor.main(["--clean-shm"]) == 0
    assert "stale shm segment(s)" in capsys.readouterr().out
    assert _segments_of(holder.pid) == []


def test_cleaning_never_touches_a_live_endpoints_segment(shm_provider):
    with kvt.Endpoint("live", transport="fabric", provider="shm") as ep:
        ours = _segments_of(os.getpid())
        assert ours
        shm_segments.remove(shm_segments.stale())
        assert _segments_of(os.getpid()) == ours
        assert ep.caps()["name"]  # still usable


def test_only_kvtransfer_named_files_of_dead_pids_are_stale(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    time.sleep(0.05)
    names = {
        f"{dead.pid}:0:0-0123456789abcdef": True,      # ours, dead
        f"{os.getpid()}:0:0-0123456789abcdef": False,  # ours, alive
        f"{dead.pid}:0:0": False,                      # libfabric's own name, not ours
        "sem.other-program": False,
    }
    for n in names:
        (tmp_path / n).write_bytes(b"x" * 4096)
    found = {os.path.basename(s.path) for s in shm_segments.stale(str(tmp_path))}
    assert found == {n for n, stale in names.items() if stale}
    assert shm_segments.remove(shm_segments.stale(str(tmp_path)))[0] == 1
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, stale in names.items() if not stale)

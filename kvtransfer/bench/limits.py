"""What this machine can physically do, measured in the same run as the transfers: iperf3 over
loopback (the TCP ceiling) and a single-thread memcpy (the same-host ceiling)."""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import time

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iperf3_gbps(streams: int = 1, seconds: float = 3.0, reps: int = 3) -> dict:
    """Median loopback throughput of iperf3 with ``streams`` parallel streams (GB/s, 1e9 B)."""
    if shutil.which("iperf3") is None:
        return {"system": f"iperf3 -P {streams}", "error": "iperf3 is not installed"}
    port = _free_port()
    server = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        results: list[float] = []
        error = ""
        for _attempt in range(100):  # the server needs a moment to listen, and between clients
            if len(results) == reps:
                break
            proc = subprocess.run(
                ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", str(streams), "-t",
                 str(seconds), "-J"], capture_output=True, text=True, timeout=seconds + 30)
            try:
                end = json.loads(proc.stdout)["end"]
                results.append(end["sum_received"]["bits_per_second"] / 8 / 1e9)
            except (ValueError, KeyError):
                error = (proc.stdout + proc.stderr).strip()[-300:]
                time.sleep(0.2)
        if len(results) < reps:
            return {"system": f"iperf3 -P {streams}", "error": error}
        return {"system": f"iperf3 -P {streams}", "gbps_p50": statistics.median(results),
                "gbps_all": results}
    finally:
        server.kill()
        server.wait(5)


def memcpy_gbps(nbytes: int = 256 << 20, reps: int = 5) -> dict:
    """Median single-thread copy throughput between two faulted-in buffers (GB/s)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    results = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        results.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return {"system": "memcpy (1 thread)", "gbps_p50": statistics.median(results),
            "gbps_all": results}

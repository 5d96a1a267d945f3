"""What this machine can physically do, measured in the same run as the transfers: iperf3 over
loopback (the TCP ceiling), a single-thread memcpy (the same-host ceiling) and, beside the
latency rows, one 64 KiB message over bare loopback TCP sockets (the kernel's floor)."""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import time

import numpy as np

from .harness import percentile


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


def tcp_oneway_us(nbytes: int = 64 << 10, reps: int = 200, busy: bool = False) -> dict:
    """The latency rows' floor: one-way times of ``nbytes`` between two threads over loopback
    TCP with bare sockets and no library (kvtransfer._core.tcp_oneway_seconds), the sender asleep
    for 1 ms before each message, as the idle prefill, or spinning (``busy``)."""
    from kvtransfer import _core

    system = f"bare TCP sockets, {nbytes >> 10} KiB one-way, sender {'busy' if busy else 'idle'}"
    times = _core.tcp_oneway_seconds(nbytes, reps, 1000, busy)
    if len(times) < reps:
        return {"system": system, "error": f"only {len(times)} of {reps} messages arrived"}
    p50 = percentile(times, 50)  # as the rows' own p50 and p99 (harness.summarize)
    return {"system": system, "latency_s_p50": p50, "latency_us_p50": p50 * 1e6,
            "latency_us_p99": percentile(times, 99) * 1e6}


def describe(record: dict) -> str:
    """A limit's figure as the tables show it: "3.52 GB/s", "21 µs p50 (p99 48)", or its error."""
    if "gbps_p50" in record:
        return f"{record['gbps_p50']:.2f} GB/s"
    if "latency_us_p50" in record:
        return f"{record['latency_us_p50']:.0f} µs p50 (p99 {record['latency_us_p99']:.0f})"
    return str(record.get("error"))

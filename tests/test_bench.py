"""`kvtransfer bench` on tiny workloads, for real (two spawned processes, real sockets): every
op, mode and network it offers runs, verifies the decode side's bytes, and says in its JSON
record what was measured."""

from __future__ import annotations

import json
import multiprocessing
import re
import subprocess
import threading
import time

import numpy as np
import pytest

from kvtransfer.bench.cli import check_transports, format_table, main
from kvtransfer.bench.harness import (
    RepResult,
    VerificationError,
    Workload,
    block_permutation,
    next_command,
    summarize,
    unsupported_record,
)
from kvtransfer.testing.netns import unavailable_reason
from kvtransfer.transports import available

TINY = "16KiBx64"  # 1 MiB a rep
DIMENSIONS = ("op", "mode", "layers", "layer_delay_s", "network", "netns")


def bench(tmp_path, *args: str) -> list[dict]:
    out = tmp_path / "bench.jsonl"
    rc = main(["--workloads", TINY, "--reps", "2", "--no-progress", "--json", str(out), *args])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0, [r.get("error") for r in records]
    return records


def assert_verified(rec: dict, reps: int = 2) -> None:
    assert rec["verified"] is True and rec["verified_on"] == "decode"
    assert rec["reps"] == reps and rec["warmup_verified"] == 1
    assert rec["gbps_p50"] > 0 and len(rec["gbps_all"]) == reps
    assert rec["register_s_initiator"] > 0 and rec["register_s_target"] > 0
    for key in (*DIMENSIONS, "argv", "machine", "versions", "last_post_to_done_s_p50"):
        assert key in rec, key


def test_read_is_pulled_by_the_decode_side_and_verified_there(tmp_path):
    (rec,) = bench(tmp_path, "--op", "read")
    assert_verified(rec)
    assert (rec["op"], rec["mode"], rec["netns"]) == ("read", "whole", False)
    assert rec["workload"] == "16KiBx64-random read"
    assert rec["notification"] == "ep.read complete on the decode side"


def test_streamed_write_posts_layers_apart_and_reports_the_tail(tmp_path):
    delay_us = 2000
    (rec,) = bench(tmp_path, "--stream", "--layers", "4", "--layer-delay-us", str(delay_us),
                   "--plot", str(tmp_path / "plots"))
    assert_verified(rec)
    assert (rec["mode"], rec["layers"], rec["layer_delay_s"]) == ("streamed", 4, 0.002)
    # Three pauses between four layers; what follows the last post is part of the whole.
    assert rec["post_span_s_p50"] >= 3 * delay_us * 1e-6
    assert rec["last_post_to_done_s_p50"] < rec["latency_s_p50"]
    assert (tmp_path / "plots" / "streamed_last_layer_to_done.png").stat().st_size > 0


def test_every_op_and_mode_combination_runs_in_one_invocation(tmp_path):
    records = bench(tmp_path, "--op", "write,read", "--mode", "whole,streamed", "--layers", "2")
    assert sorted((r["op"], r["mode"]) for r in records) == [
        ("read", "streamed"), ("read", "whole"), ("write", "streamed"), ("write", "whole")]
    for rec in records:
        assert_verified(rec)
    assert len({r["workload"] for r in records}) == 4  # one table block each


def test_layers_must_divide_the_block_count(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--workloads", TINY, "--stream", "--layers", "5", "--no-progress"])
    assert exc.value.code == 2
    assert "64 blocks cannot be split into 5" in capsys.readouterr().err


@pytest.mark.netns
def test_netns_runs_cross_a_veth_made_and_removed_by_the_bench(tmp_path):
    why = unavailable_reason()
    if why:
        pytest.skip(f"--netns: {why}")
    (rec,) = bench(tmp_path, "--netns", "--op", "read")
    assert_verified(rec)
    assert rec["netns"] is True and rec["network"].startswith("veth 10.254.77.2")
    # Warm-up and measured reps all went over the veth, into the decode side.
    assert rec["veth_decode_rx_bytes"] >= 3 * (1 << 20)
    made = re.findall(r"\((kvt-[dp]\d+)\)", rec["network"])
    assert len(made) == 2
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not set(made) & set(left.split()), f"namespaces {made} were left behind"


def test_peer_read_and_streamed_write_are_verified_too(tmp_path):
    pytest.importorskip("mooncake.engine", reason="mooncake-transfer-engine-non-cuda not "
                                                  "installed (requirements-peers.txt)")
    records = bench(tmp_path, "--peers", "mooncake", "--op", "write,read", "--stream",
                    "--layers", "2")
    peers = [r for r in records if r["system"] == "mooncake-tcp"]
    assert sorted(r["op"] for r in peers) == ["read", "write"]
    for rec in peers:
        assert_verified(rec)


def test_every_registered_transport_is_accepted_and_others_are_refused(capsys):
    with_provider = ["fabric:shm"] if "fabric" in available() else []
    assert check_transports([*available(), "auto", *with_provider]) is None
    with pytest.raises(SystemExit):
        main(["--transport", "no-such-transport", "--no-progress"])
    err = capsys.readouterr().err
    assert "'no-such-transport' is not registered" in err and "tcp" in err


def test_a_system_that_cannot_run_a_workload_is_shown_not_applicable():
    w = Workload(4096, 8, op="read")
    table = format_table([unsupported_record("somepeer", w, "no remote read on its TCP")])
    assert "n/a" in table and "(no remote read on its TCP)" in table


def test_streamed_layers_share_one_block_table():
    w = Workload(4096, 12, "random", mode="streamed", layers=3)
    perm = block_permutation(w).reshape(3, 4)  # layer l holds blocks [4l, 4l + 4)
    table = perm[0]
    assert sorted(table) == [0, 1, 2, 3]
    for layer in range(3):
        assert np.array_equal(perm[layer], table + 4 * layer)


def test_a_wrong_block_in_any_rep_means_no_number():
    w = Workload(4096, 8, reps=2, warmup=1)
    good = RepResult(1e-3, 1e-3, 1e-3, 0.0, 0.0, 0.0, 0)
    with pytest.raises(VerificationError, match="wrong blocks after reps {0: 1}"):
        summarize("x", w, [RepResult(1e-3, 1e-3, 1e-3, 0.0, 0.0, 0.0, 1), good, good], {})


def test_repeated_runs_report_the_median_run_and_keep_every_runs_figure(tmp_path):
    (rec,) = bench(tmp_path, "--runs", "3")
    assert_verified(rec)
    assert rec["runs"] == 3 and len(rec["run_headlines"]) == 3
    assert rec["gbps_p50"] == sorted(rec["run_headlines"])[1]


def test_the_median_run_is_chosen_by_time_for_latency_rows_and_a_failure_wins():
    from kvtransfer.bench.cli import median_runs

    def run(us: float, **extra) -> dict:
        return {"system": "s", "workload": "latency-64KiB", "verified": True,
                "latency_s_p50": us * 1e-6, "latency_us_p50": us, "tag": us, **extra}

    (rec,) = median_runs([run(90), run(40), run(55), run(41), run(300)])
    assert rec["tag"] == 55 and rec["runs"] == 5
    (rec,) = median_runs([run(40), run(41, verified=False, error="bad block")])
    assert rec["error"] == "bad block"


def test_a_busy_prefill_side_waits_for_its_next_command_on_the_cpu_and_an_idle_one_sleeps():
    for busy in (True, False):
        ours, theirs = multiprocessing.Pipe()
        threading.Timer(0.3, theirs.send, args=(("go", 0),)).start()
        cpu0 = time.thread_time()
        assert next_command(ours, busy) == ("go", 0)
        spent = time.thread_time() - cpu0
        assert spent > 0.15 if busy else spent < 0.05, (busy, spent)


def test_the_latency_rows_are_measured_and_labelled_apart(tmp_path):
    out = tmp_path / "lat.jsonl"
    assert main(["--workloads", "latency,latency-busy,latency-sleeping", "--no-progress",
                 "--json", str(out)]) == 0
    idle, busy, sleeping = (json.loads(line) for line in out.read_text().splitlines())
    assert (idle["workload"], idle["initiator_busy"], idle["busy_poll"]) == (
        "latency-64KiB", False, True)
    assert (busy["workload"], busy["initiator_busy"], busy["busy_poll"]) == (
        "latency-64KiB-busy-prefill", True, True)
    assert (sleeping["workload"], sleeping["initiator_busy"], sleeping["busy_poll"]) == (
        "latency-64KiB-sleeping-decode", False, False)
    for rec in (idle, busy, sleeping):
        assert rec["verified"] is True and rec["reps"] == 200 and rec["latency_us_p50"] > 0


def test_idle_peers_are_connected_to_the_decode_side_and_measured_as_their_own_system(tmp_path):
    from kvtransfer.bench import kvtransfer_peer
    from kvtransfer.bench.harness import latency_workload

    w = latency_workload(reps=2)
    buf = np.zeros(w.total_bytes, np.uint8)
    options = {"transport": "tcp", "idle_peers": 3}
    target = kvtransfer_peer.make_target(w, buf, options)
    initiator = kvtransfer_peer.make_initiator(w, np.zeros_like(buf), target.info(), options)
    try:
        deadline = time.monotonic() + 5
        while target.ep.stats()["peers"] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert target.ep.stats()["peers"] == 4, "the prefill side and its 3 quiet peers"
    finally:
        initiator.close()
        target.close()
    records = bench(tmp_path, "--workloads", "latency", "--idle-peers", "0,3")
    assert [(r["system"], r["options"]["idle_peers"]) for r in records] == [
        ("kvtransfer-tcp", 0), ("kvtransfer-tcp-3idle", 3)]
    assert all(r["verified"] for r in records)


def test_the_latency_rows_floor_is_one_bare_socket_message_between_two_threads():
    import kvtransfer as kvt
    from kvtransfer import _core
    from kvtransfer.bench import limits

    times = _core.tcp_oneway_seconds(65536, 50, 0, True)
    assert len(times) == 50 and all(0 < t < 1 for t in times)
    idle = limits.tcp_oneway_us(reps=20)
    assert idle["system"] == "bare TCP sockets, 64 KiB one-way, sender idle"
    assert 0 < idle["latency_us_p50"] <= idle["latency_us_p99"]
    assert re.fullmatch(r"\d+ µs p50 \(p99 \d+\)", limits.describe(idle))
    with pytest.raises(kvt.InvalidRequestError, match="nbytes > 0"):
        _core.tcp_oneway_seconds(0, 1, 0, True)


def test_latency_rows_with_limits_measure_their_floor_in_turns_with_them(tmp_path):
    out = tmp_path / "lat.jsonl"
    assert main(["--workloads", "latency,latency-busy", "--limits", "--runs", "2",
                 "--no-progress", "--json", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    floors = {r["system"]: r for r in recs if r["workload"] == "limits"}
    # No bandwidth ceilings beside latency rows; a floor per prefill kind, the median of its runs.
    assert set(floors) == {"bare TCP sockets, 64 KiB one-way, sender idle",
                           "bare TCP sockets, 64 KiB one-way, sender busy"}
    assert all(f["runs"] == 2 and f["latency_us_p50"] > 0 for f in floors.values())
    rows = [r for r in recs if r["workload"] != "limits"]
    assert len(rows) == 2 and all(r["verified"] and r["runs"] == 2 for r in rows)


def test_bare_sockets_run_the_latency_rows_verified_and_refuse_bulk(tmp_path):
    out = tmp_path / "bare.jsonl"
    assert main(["--workloads", "latency-busy,latency-sleeping,4KiBx16384", "--transport", "tcp",
                 "--peers", "bare-tcp", "--reps", "2", "--no-progress", "--json", str(out)]) == 0
    recs = {(r["system"], r["workload"]): r for r in map(json.loads, out.read_text().splitlines())}
    for w in ("latency-64KiB-busy-prefill", "latency-64KiB-sleeping-decode"):
        assert recs["bare-tcp", w]["verified"] is True and recs["bare-tcp", w]["reps"] == 200
    assert "not a transport" in recs["bare-tcp", "4KiBx16384-random"]["unsupported"]


def test_blocks_per_request_sweep_scales_reps_to_the_request_and_draws_its_chart(tmp_path):
    out = tmp_path / "blocks.jsonl"
    assert main(["--sweep-blocks", "--sweep-block-size", "4KiB", "--patterns", "random",
                 "--no-progress", "--json", str(out), "--plot", str(tmp_path / "plots")]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["blocks"] for r in records] == [1, 4, 16, 64, 256, 1024, 4096]
    for rec in records:
        assert rec["sweep"] == "blocks" and rec["block_bytes"] == 4096 and rec["verified"]
    # A one-block request is over in microseconds: it gets 200 reps, a 16 MiB one the default 5.
    assert records[0]["reps"] == 200 and records[-1]["reps"] == 5
    assert (tmp_path / "plots" / "bandwidth_vs_blocks_per_request.png").stat().st_size > 0
    # ... and leaves the block-size chart (of another run into the same folder) alone.
    assert not (tmp_path / "plots" / "bandwidth_vs_block_size.png").exists()


def test_a_malformed_sweep_block_size_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--sweep-blocks", "--sweep-block-size", "64K", "--no-progress"])
    assert "give a number and B, KiB, MiB or GiB" in capsys.readouterr().err

"""The connector's worker and scheduler sides driven directly (worker_sim.py, in .venv-vllm):
pull, push streamed during the forward pass and sent late, kv_both, and every failure ending in
a bounded load error with the request's blocks, in seconds rather than a server's start-up."""

from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def sim(vllm_python):
    return vllm_python((Path(__file__).parent / "worker_sim.py").read_text(), {}, timeout=150)


def test_pull_moves_the_prompt_blocks_and_frees_the_prefill(sim):
    r = sim["pull"]
    assert r["recv"] == ["d1"] and r["sent"] == ["p1"] and r["errors"] == []
    assert r["equal"] and r["others_zero"]
    assert "kvt_ticket" in r["params"]


def test_push_streams_every_layer_during_the_forward_pass(sim):
    r = sim["push_streamed"]
    assert r["recv"] == ["d2"] and r["sent"] == ["p2"] and r["errors"] == []
    assert r["equal"] and r["streamed"] == 4


def test_push_registered_after_the_forward_is_sent_whole_by_a_kv_both_server(sim):
    r = sim["push_late_kv_both"]
    assert r["recv"] == ["d3"] and r["sent"] == ["p3"] and r["errors"] == [] and r["equal"]


@pytest.mark.parametrize("case, blocks", [("push_timeout", [1, 2]), ("bad_ticket", [3]),
                                          ("dead_prefill", [50, 51])])
def test_failed_loads_report_their_blocks(sim, case, blocks):
    r = sim[case]
    assert r["recv"] and r["errors"] == blocks
    if case == "push_timeout":
        assert 1.0 < r["waited_s"] < 4.0  # load_timeout_s=1.5
    if case == "dead_prefill":
        assert r["waited_s"] < 1.0

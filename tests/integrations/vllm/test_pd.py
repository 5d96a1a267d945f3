"""Prefill/decode disaggregation with real vLLM CPU servers and KVTransferConnector.

Each test uses a prefill server (kv_producer) and a decode server (kv_consumer) (the pull and
push token tests share one pair per dtype, choosing the mode per request), sends prompts the
way a P/D proxy does, and checks the decode server's greedy tokens against the same
server run alone (no kv_transfer_params): equal when the KV moved intact, different when the KV
came from another model (the control), and a clean error or a recompute — never a hang — when
the prefill server dies between prefill and decode.
"""

import concurrent.futures as cf
import socket
import time
import uuid

import pytest

try:
    import kvtransfer._core  # noqa: F401
except ImportError:  # pragma: no cover - depends on the build
    pytest.skip("kvtransfer core not built", allow_module_level=True)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

MAX_TOKENS = 10
CONNECTOR = {"kv_connector": "KVTransferConnector",
             "kv_connector_module_path": "kvtransfer.integrations.vllm"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(pool, model, mode: str, policy: str = "fail", prefill_model=None,
               load_timeout_s: float = 20.0):
    """A prefill and a decode server using KVTransferConnector; returns (P, D, P's kvt addr)."""
    p_kvt = f"127.0.0.1:{free_port()}"
    prefill = pool.start("prefill", prefill_model or model, kv_transfer_config={
        **CONNECTOR, "kv_role": "kv_producer",
        "kv_connector_extra_config": {"mode": mode, "listen": p_kvt, "lease_s": 30}})
    decode = pool.start("decode", model, kv_transfer_config={
        **CONNECTOR, "kv_role": "kv_consumer", "kv_load_failure_policy": policy,
        "kv_connector_extra_config": {"mode": mode, "load_timeout_s": load_timeout_s}})
    pool.wait_all()
    return prefill, decode, p_kvt


def disaggregated(prefill, decode, p_kvt: str, prompt: list[int], mode: str,
                  max_tokens: int = MAX_TOKENS) -> dict:
    """One request through prefill then decode, as a P/D proxy sends it."""
    if mode == "pull":
        first = prefill.complete(prompt, 1, {"do_remote_decode": True})
        params = first["kv_transfer_params"]
        assert params and params["do_remote_prefill"] and params["kvt_mode"] == "pull", params
        out = decode.complete(prompt, max_tokens, params)
        out["prefill_token_ids"] = first["token_ids"]
        return out
    # push, decode first: decode allocates and registers its blocks with the prefill, whose
    # forward pass then writes them layer by layer.
    xfer = uuid.uuid4().hex
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(decode.complete, prompt, max_tokens,
                        {"do_remote_prefill": True, "kvt_mode": "push", "transfer_id": xfer,
                         "remote_address": p_kvt})
        time.sleep(0.3)
        first = prefill.complete(prompt, 1, {"do_remote_decode": True, "kvt_mode": "push",
                                             "transfer_id": xfer})
        out = fut.result(timeout=120)
    out["prefill_token_ids"] = first["token_ids"]
    return out


def reference(server, prompts: list[list[int]]) -> list[list[int]]:
    """The decode server alone (no kv_transfer_params): a single-server run."""
    return [server.complete(p, MAX_TOKENS)["token_ids"] for p in prompts]


def test_control_wrong_kv_changes_tokens(vllm_servers, tiny_model_fp32, other_model_fp32,
                                         make_prompts, block_size):
    """The prefill runs another model (same shapes): the transferred KV is wrong, so decode's
    tokens must differ. Proves the tests above compare tokens that depend on the transfer."""
    prefill, decode, p_kvt = start_pair(vllm_servers, tiny_model_fp32, "pull",
                                        prefill_model=other_model_fp32)
    prompts = make_prompts(2, [2 * block_size + 3, 3 * block_size], seed=11)
    expected = reference(decode, prompts)
    outs = [disaggregated(prefill, decode, p_kvt, p, "pull") for p in prompts]
    for out, exp in zip(outs, expected, strict=True):
        assert out["token_ids"] != exp


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_prefill_killed_before_decode(vllm_servers, tiny_model_fp32, policy, make_prompts,
                                      block_size):
    prefill, decode, p_kvt = start_pair(vllm_servers, tiny_model_fp32, "pull", policy=policy,
                                        load_timeout_s=10.0)
    prompt = make_prompts(1, [2 * block_size + 9], seed=5)[0]
    expected = reference(decode, [prompt])[0]
    params = prefill.complete(prompt, 1, {"do_remote_decode": True})["kv_transfer_params"]
    prefill.kill()

    t0 = time.monotonic()
    if policy == "recompute":
        out = decode.complete(prompt, MAX_TOKENS, params, timeout=60)
        assert out["token_ids"] == expected  # recomputed locally
    else:
        with pytest.raises(RuntimeError, match="500"):
            decode.complete(prompt, MAX_TOKENS, params, timeout=60)
    assert time.monotonic() - t0 < 45, "the decode server took too long to give up"
    # The decode server is still healthy and serves the next request.
    assert decode.complete(prompt, MAX_TOKENS)["token_ids"] == expected


# Last in the module: the pairs of pd_pair stay up until the module ends.
@pytest.fixture(scope="module")
def pd_pair(module_servers, tiny_model):
    """One prefill/decode pair per dtype, shared by the pull and the push test: the mode is
    chosen per request (kv_transfer_params["kvt_mode"]), so one pair serves both."""
    prefill, decode, p_kvt = start_pair(module_servers, tiny_model, "pull")
    yield prefill, decode, p_kvt
    prefill.stop()
    decode.stop()


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_pd_tokens_equal_single_server(pd_pair, mode, make_prompts, block_size):
    prefill, decode, p_kvt = pd_pair
    # whole blocks only, a partial last block, less than one block; several at once
    prompts = make_prompts(6, [2 * block_size, 3 * block_size + 5, 17, block_size + 1])
    expected = reference(decode, prompts)

    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda p: disaggregated(prefill, decode, p_kvt, p, mode), prompts))

    for prompt, out, exp in zip(prompts, outs, expected, strict=True):
        assert out["prefill_token_ids"] == exp[:1]
        assert out["finish_reason"] == "length"
        assert out["token_ids"] == exp, f"prompt of {len(prompt)} tokens"

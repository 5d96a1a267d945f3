"""Drives the connector's scheduler and worker sides directly (no vLLM server, no model), in
``.venv-vllm``: vLLM-CPU-shaped torch KV tensors, the StepMetadata a scheduler would send, and the
calls vLLM makes. Run by test_worker.py; reads nothing, prints one JSON line of results."""

import base64
import json
import time
import types

import torch
from vllm.v1.request import RequestStatus

from kvtransfer.integrations.vllm.connector import Config, StepMetadata
from kvtransfer.integrations.vllm.scheduler import SchedulerSide
from kvtransfer.integrations.vllm.worker import WorkerSide

L, NB, H, BS, D = 4, 128, 2, 32, 64
PER_LAYER = NB * H * BS * 2 * D
CFG = Config(load_timeout_s=1.5, lease_s=5)
results = {}


def server(role, fill):
    buf = torch.zeros(L * PER_LAYER, dtype=torch.bfloat16)
    if fill:
        buf.copy_(torch.randn(buf.shape).to(torch.bfloat16))
    caches = {f"model.layers.{i}.self_attn.attn":
              buf[i * PER_LAYER:(i + 1) * PER_LAYER].view(NB, H, BS, 2 * D) for i in range(L)}
    kt = types.SimpleNamespace(is_kv_producer=role in ("kv_producer", "kv_both"),
                               is_kv_consumer=role in ("kv_consumer", "kv_both"))
    w = WorkerSide(CFG, NB, BS, kt)
    w.register_kv_caches(caches)
    sched = SchedulerSide(CFG, BS)
    sched.set_worker_info(w.info())
    return types.SimpleNamespace(w=w, s=sched, blocks=buf.view(L, NB, -1), caches=caches)


def finished_request(rid, n_tokens, params):
    return types.SimpleNamespace(kv_transfer_params=params, request_id=rid,
                                 status=RequestStatus.FINISHED_LENGTH_CAPPED,
                                 num_computed_tokens=n_tokens)


def until(fn, timeout=5.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = fn()
        if got:
            return got, time.monotonic() - t0
        time.sleep(0.002)
    return None, time.monotonic() - t0


def recv(d):
    return d.w.get_finished(set())[1]


P, Dc = server("kv_producer", True), server("kv_consumer", False)

# pull: the prefill holds 4 blocks (it computed a token more), decode loads the prompt's 3
src, dst = [5, 9, 10, 11], [100, 7, 8]
_, params = P.s.request_finished(finished_request("p1", 3 * BS + 1, {"do_remote_decode": True}),
                                 src)
P.w.start_step(P.s.build_connector_meta(types.SimpleNamespace(num_scheduled_tokens={})))
Dc.w.start_step(StepMetadata(loads={"d1": {"mode": "pull", "dst": dst, "params": params}}))
got, _ = until(lambda: recv(Dc))
sent, _ = until(lambda: P.w.get_finished({"p1"})[0])
results["pull"] = {"recv": sorted(got or ()), "sent": sorted(sent or ()),
                   "errors": sorted(Dc.w.take_load_errors()),
                   "equal": bool(torch.equal(P.blocks[:, src[:3]], Dc.blocks[:, dst])),
                   "others_zero": not Dc.blocks[:, [0, 1, 99]].any().item(),
                   "params": sorted(params)}

# push, decode first: streamed layer by layer from save_kv_layer
src, dst = [20, 21], [30, 40]
Dc.w.start_step(StepMetadata(loads={"d2": {"mode": "push", "dst": dst, "params": {
    "transfer_id": "x2", "remote_address": P.w.info().address}}}))
time.sleep(0.2)
meta = StepMetadata(streams={"p2": {"xfer": "x2", "src": src}})
for name in P.caches:
    P.w.save_layer(name, meta)
streamed = P.w._pushes["x2"].streamed
P.w.start_step(StepMetadata(holds={"p2": {"mode": "push", "xfer": "x2", "src": src,
                                          "lease_s": 5}}))
got, _ = until(lambda: recv(Dc))
sent, _ = until(lambda: P.w.get_finished({"p2"})[0])
results["push_streamed"] = {"recv": sorted(got or ()), "sent": sorted(sent or ()),
                            "streamed": streamed, "errors": sorted(Dc.w.take_load_errors()),
                            "equal": bool(torch.equal(P.blocks[:, src], Dc.blocks[:, dst]))}

# push whose registration comes after the prefill's forward: sent whole from get_finished
B = server("kv_both", True)
src, dst = [60, 61, 62], [70, 71, 72]
meta = StepMetadata(streams={"p3": {"xfer": "x3", "src": src}})
for name in B.caches:
    B.w.save_layer(name, meta)
B.w.start_step(StepMetadata(holds={"p3": {"mode": "push", "xfer": "x3", "src": src,
                                          "lease_s": 5}}))
B.w.get_finished({"p3"})
Dc.w.start_step(StepMetadata(loads={"d3": {"mode": "push", "dst": dst, "params": {
    "transfer_id": "x3", "remote_address": B.w.info().address}}}))
sent, _ = until(lambda: B.w.get_finished(set())[0])
got, _ = until(lambda: recv(Dc))
results["push_late_kv_both"] = {"recv": sorted(got or ()), "sent": sorted(sent or ()),
                                "streamed": 0, "errors": sorted(Dc.w.take_load_errors()),
                                "equal": bool(torch.equal(B.blocks[:, src], Dc.blocks[:, dst]))}

# push that never comes: decode reports its blocks when load_timeout_s passes
Dc.w.start_step(StepMetadata(loads={"d4": {"mode": "push", "dst": [1, 2], "params": {
    "transfer_id": "x4", "remote_address": P.w.info().address}}}))
got, waited = until(lambda: recv(Dc), timeout=5)
results["push_timeout"] = {"recv": sorted(got or ()), "waited_s": round(waited, 2),
                           "errors": sorted(Dc.w.take_load_errors())}

# a malformed ticket is a load error at once
bad = dict(params, kvt_ticket=base64.b64encode(b"KVTK garbage").decode())
Dc.w.start_step(StepMetadata(loads={"d5": {"mode": "pull", "dst": [3], "params": bad}}))
got, _ = until(lambda: recv(Dc), timeout=1)
results["bad_ticket"] = {"recv": sorted(got or ()), "errors": sorted(Dc.w.take_load_errors())}

# the prefill is gone: the pull fails at once, blocks reported
_, params = P.s.request_finished(finished_request("p6", 2 * BS, {"do_remote_decode": True}),
                                 [1, 2])
P.w.close()
Dc.w.start_step(StepMetadata(loads={"d6": {"mode": "pull", "dst": [50, 51], "params": params}}))
got, waited = until(lambda: recv(Dc), timeout=5)
results["dead_prefill"] = {"recv": sorted(got or ()), "waited_s": round(waited, 2),
                           "errors": sorted(Dc.w.take_load_errors())}
for x in (B, Dc):
    x.w.close()
print(json.dumps(results))

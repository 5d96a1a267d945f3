"""Time to first token of a vLLM decode server: KV pulled with kvtransfer vs the prompt recomputed.

Starts two real vLLM CPU servers with ``KVTransferConnector`` (a prefill ``kv_producer`` and a
decode ``kv_consumer``, pull mode, one core each) on a tiny random Llama made on the spot (no
download), then for each prompt length sends, ``--reps`` times with fresh prompts:

- *P/D*: the prompt to the prefill server (``max_tokens=1``, ``do_remote_decode``), then - timed
  - the same prompt with the returned ``kv_transfer_params`` to the decode server
  (``max_tokens=1``): the decode server's time to first token when its KV is pulled;
- *recompute*: the same prompt to the decode server without params (timed): its time to first
  token when it computes the prompt itself.

A ``max_tokens=1`` non-streaming request ends with its first token, so its latency is the time to
first token seen by the client (HTTP on loopback included). Prints a table of medians and writes
JSON. Needs ``scripts/vllm_env.sh`` (``.venv-vllm``) and the in-place build of kvtransfer::

    .venv/bin/python benchmarks/vllm_ttft.py [--lengths 32,128,256,480] [--reps 11] \\
        [--out vllm_ttft.json]

The whole run is bounded by ``--budget-s`` (default 280 s): lengths not reached are reported as
skipped. Timings on a shared CPU machine are noisy; compare medians of the same run only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("KVT_VLLM_VENV", REPO / ".venv-vllm")) / "bin" / "python"
BLOCK_SIZE = 32
MAX_MODEL_LEN = 512
TINY_LLAMA = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=MAX_MODEL_LEN, initializer_range=0.1, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
CONNECTOR = {"kv_connector": "KVTransferConnector",
             "kv_connector_module_path": "kvtransfer.integrations.vllm"}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}

_MAKE_MODEL = """
import json, sys, torch, transformers
a = json.load(sys.stdin)
torch.manual_seed(1234)
transformers.LlamaForCausalLM(transformers.LlamaConfig(**a["config"])).save_pretrained(a["path"])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} -> {e.code}: {e.read().decode(errors='replace')}") from e


class Server:
    def __init__(self, name: str, model: Path, cpu: int, kv: dict, dtype: str, log_dir: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model",
                str(model), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port",
                str(self.port), "--dtype", dtype, "--block-size", str(BLOCK_SIZE),
                "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8", "--enforce-eager",
                "--skip-tokenizer-init", "--no-enable-prefix-caching", "--disable-log-stats",
                "--seed", "0", "--kv-transfer-config", json.dumps(kv)]
        env = dict(os.environ, **ENV, VLLM_CPU_OMP_THREADS_BIND=str(cpu),
                   PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                            str(REPO)])))
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(log_dir), start_new_session=True)

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").splitlines()[-30:]
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n" +
                                   "\n".join(tail))
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy in time (log: {self.log_path})")

    def complete(self, prompt: list[int], params: dict | None = None) -> tuple[float, dict]:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True}
        if params is not None:
            body["kv_transfer_params"] = params
        t0 = time.perf_counter()
        out = post(self.url + "/v1/completions", body)
        return time.perf_counter() - t0, out

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def measure(prefill: Server, decode: Server, length: int, reps: int, rng: random.Random,
            dtype_bytes: int) -> dict:
    ttft_pd, ttft_rc, t_prefill, mismatches = [], [], [], 0
    for _ in range(reps):
        prompt = [rng.randrange(3, TINY_LLAMA["vocab_size"]) for _ in range(length)]
        t_p, first = prefill.complete(prompt, {"do_remote_decode": True})
        params = first["kv_transfer_params"]
        if not params or "kvt_ticket" not in params:
            raise RuntimeError(f"the prefill returned no offer ticket: {params!r}")
        t_pd, pd = decode.complete(prompt, params)
        t_rc, rc = decode.complete(prompt)
        if pd["choices"][0]["token_ids"] != rc["choices"][0]["token_ids"]:
            mismatches += 1
        t_prefill.append(t_p)
        ttft_pd.append(t_pd)
        ttft_rc.append(t_rc)
    blocks = -(-length // BLOCK_SIZE)
    c = TINY_LLAMA
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    kv_bytes = (blocks * c["num_hidden_layers"] * c["num_key_value_heads"] * BLOCK_SIZE
                * 2 * head_dim * dtype_bytes)
    ms = lambda xs: round(1e3 * statistics.median(xs), 2)  # noqa: E731
    return {"prompt_tokens": length, "reps": reps, "kv_bytes": kv_bytes,
            "decode_ttft_recompute_ms": ms(ttft_rc), "decode_ttft_kvtransfer_ms": ms(ttft_pd),
            "speedup": round(statistics.median(ttft_rc) / statistics.median(ttft_pd), 2),
            "prefill_server_ms": ms(t_prefill),
            "raw_ms": {"recompute": [round(1e3 * x, 2) for x in ttft_rc],
                       "kvtransfer": [round(1e3 * x, 2) for x in ttft_pd],
                       "prefill": [round(1e3 * x, 2) for x in t_prefill]},
            "first_token_mismatches": mismatches}


def table(rows: list[dict]) -> str:
    head = ("| prompt tokens | KV moved | decode TTFT, recompute (ms) | decode TTFT, kvtransfer "
            "pull (ms) | speedup | prefill server, max_tokens=1 (ms) |")
    lines = [head, "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['prompt_tokens']} | {r['kv_bytes'] / 2**20:.2f} MiB | "
                     f"{r['decode_ttft_recompute_ms']:.1f} | {r['decode_ttft_kvtransfer_ms']:.1f} "
                     f"| {r['speedup']:.2f}x | {r['prefill_server_ms']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32,128,256,480",
                    help=f"prompt lengths, comma-separated (< {MAX_MODEL_LEN})")
    ap.add_argument("--reps", type=int, default=11, help="requests per length and mode (>= 5)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="vllm_ttft.json", help="JSON results file")
    ap.add_argument("--budget-s", type=float, default=280.0, help="bound on the whole run")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if any(not 0 < n < MAX_MODEL_LEN for n in lengths):
        ap.error(f"prompt lengths must be in [1, {MAX_MODEL_LEN - 1}]")
    if not VLLM_PYTHON.exists():
        print(f"{VLLM_PYTHON} is missing: run scripts/vllm_env.sh first", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    load_start = os.getloadavg()
    ncpu = os.cpu_count() or 1
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="kvt-ttft-") as tmp:
        tmp = Path(tmp)
        model = tmp / "tiny-llama"
        subprocess.run([str(VLLM_PYTHON), "-c", _MAKE_MODEL], check=True, text=True,
                       input=json.dumps({"config": TINY_LLAMA, "path": str(model)}),
                       env=dict(os.environ, **ENV), capture_output=True, timeout=120)
        servers = [
            Server("prefill", model, 0, {**CONNECTOR, "kv_role": "kv_producer",
                                         "kv_connector_extra_config": {"mode": "pull"}},
                   args.dtype, tmp),
            Server("decode", model, 1 % ncpu, {**CONNECTOR, "kv_role": "kv_consumer",
                                               "kv_connector_extra_config": {"mode": "pull"}},
                   args.dtype, tmp),
        ]
        try:
            for s in servers:
                s.wait_healthy(deadline)
            t_ready = time.monotonic()
            print(f"servers healthy in {t_ready - t_start:.0f} s", flush=True)
            prefill, decode = servers
            rng = random.Random(7)
            measure(prefill, decode, max(lengths), 2, rng, 4)  # warm-up, not reported
            per_length = (time.monotonic() - t_ready) * max(1, args.reps) / 2
            for n in lengths:
                if time.monotonic() + per_length > deadline:
                    skipped.append(n)
                    continue
                rows.append(measure(prefill, decode, n, args.reps, rng,
                                    4 if args.dtype == "float32" else 2))
                print(f"  {n} tokens: done", flush=True)
        finally:
            for s in servers:
                s.stop()
    result = {
        "benchmark": "vllm_ttft",
        "what": "decode server time to first token (max_tokens=1 request latency, loopback "
                "HTTP), KV pulled with kvtransfer vs prompt recomputed; medians",
        "model": {"config": TINY_LLAMA, "dtype": args.dtype, "block_size": BLOCK_SIZE},
        "transport": "tcp (loopback)",
        "machine": {"cpus": ncpu, "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_1m_start_end": [round(load_start[0], 2),
                                             round(os.getloadavg()[0], 2)]},
        "rows": rows, "skipped_lengths": skipped,
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"(medians of {args.reps}; {args.dtype}; 1-minute load average "
          f"{load_start[0]:.1f} -> {os.getloadavg()[0]:.1f} on {ncpu} CPUs)")
    if skipped:
        print(f"skipped (time budget): {skipped}")
    bad = sum(r["first_token_mismatches"] for r in rows)
    if bad:
        print(f"WARNING: {bad} first token(s) differ between P/D and recompute")
    print(f"wrote {args.out} ({result['wall_s']} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

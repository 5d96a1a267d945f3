"""Start a prefill vLLM server, a decode vLLM server and a P/D proxy, wired with kvtransfer.

Run it with the python of the environment that has vLLM and kvtransfer (see README.md):

    python serve.py --tiny /tmp/tiny-llama --smoke      # make a tiny random model, check, exit
    python serve.py --model /path/to/model --mode push  # serve until Ctrl-C

Each server gets its own CPU core (VLLM_CPU_OMP_THREADS_BIND) on vLLM CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import PDProxy, post  # noqa: E402

CONNECTOR = {"kv_connector": "KVTransferConnector",
             "kv_connector_module_path": "kvtransfer.integrations.vllm"}


def make_tiny_llama(path: Path) -> None:
    """A random 4-layer Llama (vocab 1000), saved with transformers: no download."""
    import torch
    import transformers

    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512,
                                   initializer_range=0.1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def start_server(name: str, model: str, port: int, cpu: int, kv: dict, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "model", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args.dtype, "--block-size", str(args.block_size), "--enforce-eager",
           "--no-enable-prefix-caching", "--max-model-len", "512",
           "--kv-transfer-config", json.dumps(kv)]
    if args.tiny:
        cmd.append("--skip-tokenizer-init")
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(cpu), HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = open(Path(args.log_dir) / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
    print(f"starting {name} on :{port} (log: {log.name})", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: server exited ({proc.returncode}); see its log")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url}: not healthy after {timeout:.0f} s")


def smoke(proxy_url: str, decode_url: str) -> bool:
    prompt = [(7 * i + 3) % 997 + 3 for i in range(75)]  # 2 full blocks + a partial one
    body = {"model": "model", "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    t0 = time.monotonic()
    pd = post(proxy_url + "/v1/completions", body)["choices"][0]["token_ids"]
    t_pd = time.monotonic() - t0
    alone = post(decode_url + "/v1/completions", body)["choices"][0]["token_ids"]
    print(f"P/D via proxy ({t_pd:.2f} s): {pd}\ndecode alone:            {alone}")
    print("MATCH" if pd == alone else "MISMATCH")
    return pd == alone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model path or name (with its tokenizer)")
    src.add_argument("--tiny", help="make a tiny random Llama in this directory and use it")
    ap.add_argument("--mode", choices=["pull", "push"], default="pull")
    ap.add_argument("--transport", default="tcp", help="kvtransfer transport: tcp | fabric")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--prefill-port", type=int, default=8100)
    ap.add_argument("--decode-port", type=int, default=8200)
    ap.add_argument("--proxy-port", type=int, default=8000)
    ap.add_argument("--kvt-port", type=int, default=14600, help="prefill's kvtransfer port")
    ap.add_argument("--log-dir", default=".")
    ap.add_argument("--smoke", action="store_true", help="send one request, compare, exit")
    args = ap.parse_args()

    model = args.model
    if args.tiny:
        model = args.tiny
        if not (Path(model) / "config.json").exists():
            make_tiny_llama(Path(model))
    kvt_addr = f"127.0.0.1:{args.kvt_port}"
    extra = {"mode": args.mode, "transport": args.transport}
    procs = [
        start_server("prefill", model, args.prefill_port, 0, {
            **CONNECTOR, "kv_role": "kv_producer",
            "kv_connector_extra_config": {**extra, "listen": kvt_addr}}, args),
        start_server("decode", model, args.decode_port, 1 % (os.cpu_count() or 1), {
            **CONNECTOR, "kv_role": "kv_consumer", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra}, args),
    ]
    prefill_url = f"http://127.0.0.1:{args.prefill_port}"
    decode_url = f"http://127.0.0.1:{args.decode_port}"
    ok = True
    try:
        wait_healthy(prefill_url, procs[0])
        wait_healthy(decode_url, procs[1])
        server = PDProxy(prefill_url, decode_url, args.mode, kvt_addr).serve("127.0.0.1",
                                                                             args.proxy_port)
        proxy_url = f"http://127.0.0.1:{args.proxy_port}"
        print(f"ready: P/D proxy ({args.mode}) on {proxy_url}/v1/completions", flush=True)
        if args.smoke:
            ok = smoke(proxy_url, decode_url)
        else:
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        server.shutdown()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

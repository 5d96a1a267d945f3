"""Fixtures for tests against real vLLM (CPU) servers.

These tests run under the project's own venv (no vLLM, no torch there) and drive vLLM through
the cached environment that ``scripts/vllm_env.sh`` builds in ``.venv-vllm``: the tiny model is
made, the transformers reference is computed and the servers are run by that venv's python.
Nothing here imports vllm or torch.

Marked ``vllm``; skipped with a reason when ``.venv-vllm`` is missing. Skip them locally with
``pytest -m 'not vllm'``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from server_log import log_excerpt

REPO = Path(__file__).resolve().parents[3]
VLLM_VENV = Path(os.environ.get("KVT_VLLM_VENV", REPO / ".venv-vllm"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"

BLOCK_SIZE = 32  # the CPU backend needs a multiple of 32
MAX_MODEL_LEN = 512
HEALTH_TIMEOUT_S = float(os.environ.get("KVT_VLLM_HEALTH_TIMEOUT", 240))
REQUEST_TIMEOUT_S = 120.0

# The offline, quiet environment every vLLM/transformers subprocess gets.
BASE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def vllm_skip_reason() -> str | None:
    if not VLLM_PYTHON.exists():
        return f"{VLLM_VENV} is missing: run scripts/vllm_env.sh (about 3 min, cached)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = vllm_skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("vllm"):  # not `keywords`: they hold this folder's name too
            item.add_marker(pytest.mark.skip(reason=reason))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BASE_ENV)
    env.update(extra)
    return env


def run_vllm_python(code: str, payload: dict, timeout: float = 300.0) -> dict:
    """Run ``code`` with .venv-vllm's python; it reads JSON on stdin and prints JSON last."""
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-c", code],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(OMP_NUM_THREADS="1"),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"vllm-venv helper failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def vllm_python():
    """``vllm_python(code, payload, timeout=300.0)``: run code in .venv-vllm (see
    run_vllm_python)."""
    if vllm_skip_reason():
        pytest.skip(vllm_skip_reason())
    return run_vllm_python


# ---------------------------------------------------------------------------------------------
# The tiny random Llama, made at test time (no download)
# ---------------------------------------------------------------------------------------------

TINY_LLAMA = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_MODEL_LEN,
    initializer_range=0.1,  # the default 0.02 makes greedy output one repeated token
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

_MAKE_MODEL = """
import json, sys, torch, transformers
args = json.load(sys.stdin)
torch.manual_seed(args["seed"])
cfg = transformers.LlamaConfig(**args["config"])
model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
model.save_pretrained(args["path"], safe_serialization=True)
print(json.dumps({"ok": True}))
"""

_HF_GREEDY = """
import json, sys, torch, transformers
args = json.load(sys.stdin)
torch.set_num_threads(1)
dtype = getattr(torch, args["dtype"])
model = transformers.LlamaForCausalLM.from_pretrained(args["path"], dtype=dtype).eval()
outs = []
with torch.no_grad():
    for prompt in args["prompts"]:
        ids = torch.tensor([prompt])
        new = []
        for _ in range(args["max_tokens"]):
            logits = model(ids).logits[0, -1]
            tok = int(torch.argmax(logits))
            new.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
        outs.append(new)
print(json.dumps({"outputs": outs}))
"""


@dataclass(frozen=True)
class TinyModel:
    path: Path
    dtype: str  # "float32" | "bfloat16": what vLLM (and the reference) compute in

    def hf_greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """transformers' own greedy continuation (no EOS stop), for comparison."""
        payload = dict(path=str(self.path), dtype=self.dtype, prompts=prompts,
                       max_tokens=max_tokens)
        return run_vllm_python(_HF_GREEDY, payload)["outputs"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    if vllm_skip_reason():
        pytest.skip(vllm_skip_reason())
    path = tmp_path_factory.mktemp("tiny-llama")
    run_vllm_python(_MAKE_MODEL, dict(seed=1234, config=TINY_LLAMA, path=str(path)))
    return path


@pytest.fixture(scope="session")
def other_model_fp32(tmp_path_factory) -> TinyModel:
    """Same architecture and shapes as the tiny model, other random weights: its KV is
    well-formed but wrong for the tiny model (a control that a P/D test can fail)."""
    if vllm_skip_reason():
        pytest.skip(vllm_skip_reason())
    path = tmp_path_factory.mktemp("tiny-llama-other")
    run_vllm_python(_MAKE_MODEL, dict(seed=4321, config=TINY_LLAMA, path=str(path)))
    return TinyModel(path, "float32")


@pytest.fixture(scope="module", params=["float32", "bfloat16"], ids=["fp32", "bf16"])
def tiny_model(request, tiny_model_dir) -> TinyModel:
    """The tiny random Llama, with the dtype vLLM should run it in (parametrized; module scope
    so that servers started for one dtype can serve several tests)."""
    return TinyModel(tiny_model_dir, request.param)


@pytest.fixture
def tiny_model_fp32(tiny_model_dir) -> TinyModel:
    return TinyModel(tiny_model_dir, "float32")


def _make_prompts(n: int, lengths: list[int], seed: int = 7) -> list[list[int]]:
    """Deterministic token-id prompts; ids avoid the special tokens 0..2."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_LLAMA["vocab_size"]) for _ in range(lengths[i % len(lengths)])]
            for i in range(n)]


@pytest.fixture
def make_prompts():
    """``make_prompts(n, lengths, seed=7)``: deterministic token-id prompts."""
    return _make_prompts


@pytest.fixture
def block_size() -> int:
    return BLOCK_SIZE


# ---------------------------------------------------------------------------------------------
# vLLM OpenAI-compatible servers
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} -> {e.code}: {e.read().decode(errors='replace')}") from e


@dataclass
class VLLMServer:
    """One ``python -m vllm.entrypoints.openai.api_server`` process (group)."""

    name: str
    model: TinyModel
    port: int
    log_path: Path
    cpu: int | None = None
    kv_transfer_config: dict | None = None
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VLLMServer:
        args = [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model.path),
            "--served-model-name", "tiny",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", self.model.dtype,
            "--block-size", str(BLOCK_SIZE),
            "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", "8",
            "--enforce-eager",
            "--skip-tokenizer-init",
            "--no-enable-prefix-caching",
            "--disable-log-stats",
            "--seed", "0",
            *self.extra_args,
        ]
        if self.kv_transfer_config is not None:
            args += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        # The working tree's kvtransfer (built in place) is what the servers load, unless
        # PYTHONPATH names another build first.
        pythonpath = [*filter(None, [os.environ.get("PYTHONPATH")]), str(REPO)]
        env = _env(PYTHONPATH=os.pathsep.join(pythonpath))
        env.update(self.extra_env)
        if self.cpu is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.cpu)
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=env, cwd=str(self.log_path.parent),
                                     start_new_session=True)
        return self

    def log_tail(self, n: int = 40) -> str:
        """The log's root cause and its last ``n`` lines (log_excerpt)."""
        try:
            return log_excerpt(self.log_path.read_text(errors="replace").splitlines(), n)
        except OSError:
            return ""

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        """Stop the whole process group (API server + engine core); SIGKILL after grace."""
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            # Children (engine core) may outlive the leader: always sweep the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if getattr(self, "log_file", None) is not None:
            self.log_file.close()
            self.log_file = None

    def kill(self) -> None:
        """Abrupt death (SIGKILL of the whole group), as in a crashed host."""
        self.stop(sig=signal.SIGKILL, grace=5.0)

    def complete(self, prompt: list[int], max_tokens: int,
                 kv_transfer_params: dict | None = None,
                 timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """Greedy completion of a token-id prompt; returns the first choice plus the
        response's ``kv_transfer_params`` (key ``kv_transfer_params``)."""
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        if kv_transfer_params is not None:
            body["kv_transfer_params"] = kv_transfer_params
        out = post_json(self.url + "/v1/completions", body, timeout=timeout)
        choice = out["choices"][0]
        return {
            "token_ids": choice.get("token_ids"),
            "finish_reason": choice.get("finish_reason"),
            "kv_transfer_params": out.get("kv_transfer_params"),
        }


class ServerPool:
    """Starts servers on free ports with one core each, and always stops them."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.servers: list[VLLMServer] = []

    def start(self, name: str, model: TinyModel, **kw) -> VLLMServer:
        if "cpu" not in kw:
            kw["cpu"] = len(self.servers) % max(1, os.cpu_count() or 1)
        log_path = self.tmp_path / f"{name}.log"
        if any(srv.log_path == log_path for srv in self.servers):
            log_path = self.tmp_path / f"{name}-{len(self.servers)}.log"
        srv = VLLMServer(name=name, model=model, port=free_port(), log_path=log_path, **kw)
        self.servers.append(srv)
        return srv.start()

    def wait_all(self) -> None:
        """Waits for every server started and not stopped since."""
        for srv in self.servers:
            if not srv.stopped:
                srv.wait_healthy()

    def close(self) -> None:
        for srv in self.servers:
            srv.stop()


@pytest.fixture
def vllm_servers(tmp_path):
    pool = ServerPool(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory):
    """A ServerPool whose servers may outlive one test (stopped at the module's end at the
    latest); a fixture using it stops its own servers when it is done with them."""
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    try:
        yield pool
    finally:
        pool.close()

"""What a failed vLLM server start shows: its first traceback whole, even when the engine's
process prefixes its lines and other processes' lines are interleaved with it. (A flaky start in
CI once showed only the last 40 lines, which held the server's exit, not the worker's cause.)"""

from server_log import first_traceback, log_excerpt

WORKER_FAILURE = """\
INFO 12-07 18:40:01 [api_server.py:1] vLLM API server version 0.11
(EngineCore_0 pid=77) INFO loading weights
(EngineCore_0 pid=77) ERROR 12-07 18:40:09 [core.py:700] EngineCore failed to start.
(EngineCore_0 pid=77) Traceback (most recent call last):
(EngineCore_0 pid=77)   File "vllm/v1/worker/gpu_worker.py", line 12, in initialize_from_config
INFO 12-07 18:40:09 [api_server.py:9] waiting for the engine
(EngineCore_0 pid=77)     self.model_runner.initialize_kv_cache(kv_cache_config)
(EngineCore_0 pid=77) OSError: [Errno 98] Address already in use
(EngineCore_0 pid=77)
(EngineCore_0 pid=77) The above exception was the direct cause of the following exception:
(EngineCore_0 pid=77)
(EngineCore_0 pid=77) Traceback (most recent call last):
(EngineCore_0 pid=77)   File "vllm/v1/engine/core.py", line 30, in run_engine_core
(EngineCore_0 pid=77) RuntimeError: kv connector failed to start
(EngineCore_0 pid=77) INFO shutting down
Traceback (most recent call last):
  File "vllm/entrypoints/openai/api_server.py", line 5, in <module>
RuntimeError: Engine core initialization failed. See root cause above.
""".splitlines()


def test_the_first_traceback_is_shown_whole_with_its_chained_cause():
    tb = first_traceback(WORKER_FAILURE)
    assert tb[0].endswith("Traceback (most recent call last):")
    assert tb[-1].endswith("RuntimeError: kv connector failed to start")
    assert any("OSError: [Errno 98]" in ln for ln in tb)
    assert not any("waiting for the engine" in ln or "shutting down" in ln for ln in tb)


def test_the_excerpt_keeps_the_root_cause_before_the_tail():
    text = log_excerpt(WORKER_FAILURE, n=3)
    assert text.index("OSError: [Errno 98]") < text.index("--- last 3 lines ---")
    assert text.rstrip().endswith("See root cause above.")


def test_a_log_without_a_traceback_has_none():
    assert first_traceback(["INFO starting", "ERROR no model"]) == []

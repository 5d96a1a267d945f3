"""Wire codec and KV serialization throughput (pytest-benchmark).

    .venv/bin/python -m pytest benchmarks/test_bench_wire.py -s \
        --benchmark-columns=min,median,ops --benchmark-sort=name

Frames: a BEGIN control frame (16-byte notification; 61 bytes on the wire) and a data-frame
header with 8 descriptors (176 bytes), each encoded and decoded (header check, crc32c,
descriptors / body fields) -- through Python (``_core.encode_control`` / ``decode_control`` +
``decode_message``, ``encode_data_frame`` / ``decode_data_frame``: what a Python tool pays per
frame) and in a C++ loop (``_core._wire_bench``: what the transport pays per frame).

KV serialization: a Llama-3-8B-like cache (32 layers, 8 KV heads, head_dim 128, fp16, 16-token
blocks: 2 MiB per block) with 64 blocks (128 MiB) moved by ``serialize_blocks`` /
``deserialize_blocks`` into a buffer, a BytesIO and a file, in NHD (each plane-block one
contiguous copy) and HND (a transposing gather). GB/s counts the file's bytes per second.
crc32c alone over 16 MiB is the ceiling the checksum puts on it. One thread.
Prints a human table and writes a JSON record (with argv) to bench-results/.
"""

from __future__ import annotations

import io
import json
import os
import platform
import struct
import sys

import numpy as np
import pytest

from kvtransfer import _core
from kvtransfer.cache import KVCache
from kvtransfer.layout import KVLayout
from kvtransfer.serialize import deserialize_blocks, serialize_blocks, serialized_nbytes

MODEL = dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype="float16")
BLOCKS = 64
BEGIN = 6
RESULTS: list[dict] = []


def _lp(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


BEGIN_BODY = struct.pack("<QIIB", 42, 8, 5000, 1) + _lp(b"r" * 16)
BEGIN_FRAME = _core.encode_control(BEGIN, BEGIN_BODY)
DESCS = [(i * 65536, 32768) for i in range(8)]
DATA_FRAME = _core.encode_data_frame(2, slot=7, region=1, key=9, payload=8 * 32768, descs=DESCS)


def _mean(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return stats.stats.mean if stats else None  # None under --benchmark-disable


def _record(benchmark, name: str, unit_bytes: int, units: int = 1) -> None:
    mean = _mean(benchmark)
    if mean is None:
        return
    row = dict(name=name, seconds=mean, per_s=units / mean,
               gb_per_s=unit_bytes * units / mean / 1e9)
    benchmark.extra_info.update(per_s=row["per_s"], gb_per_s=row["gb_per_s"])
    RESULTS.append(row)


# -- frames through Python -----------------------------------------------------------------------

def test_control_encode_python(benchmark):
    benchmark(_core.encode_control, BEGIN, BEGIN_BODY)
    _record(benchmark, "control encode (python)", len(BEGIN_FRAME))


def test_control_decode_python(benchmark):
    def decode():
        mtype, _, body = _core.decode_control(BEGIN_FRAME)
        return _core.decode_message(mtype, body)

    assert benchmark(decode)["slot"] == 42
    _record(benchmark, "control decode (python)", len(BEGIN_FRAME))


def test_data_encode_python(benchmark):
    benchmark(_core.encode_data_frame, 2, slot=7, region=1, key=9, payload=8 * 32768, descs=DESCS)
    _record(benchmark, "data header encode (python)", len(DATA_FRAME))


def test_data_decode_python(benchmark):
    assert benchmark(_core.decode_data_frame, DATA_FRAME)["descs"] == DESCS
    _record(benchmark, "data header decode (python)", len(DATA_FRAME))


# -- frames in C++ -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["control_encode", "control_decode", "data_encode", "data_decode"])
def test_codec_cpp(benchmark, kind):
    n = 200_000
    benchmark.pedantic(_core._wire_bench, args=(kind, n), rounds=5, iterations=1)
    size = len(BEGIN_FRAME) if kind.startswith("control") else len(DATA_FRAME)
    _record(benchmark, f"{kind.replace('_', ' ')} (C++ loop)", size, n)


def test_crc32c(benchmark):
    data = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8)
    benchmark(_core.crc32c, data)
    _record(benchmark, "crc32c 16 MiB", len(data))


# -- KV serialization ----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["NHD", "HND"])
def cache(request):
    lay = KVLayout.vllm_flash(num_blocks=BLOCKS, kv_order=request.param, **MODEL)
    c = KVCache.allocate(lay, fill=None)
    c.buffer_view(0)[:] = np.random.default_rng(1).integers(0, 256, c.nbytes, dtype=np.uint8)
    return c


@pytest.fixture(scope="module")
def blob(cache):
    ids = np.random.default_rng(2).permutation(BLOCKS)
    buf = bytearray(serialized_nbytes(cache, BLOCKS))
    serialize_blocks(cache, ids, buf)
    return ids, buf


def _order(cache) -> str:
    return cache.layout._params.get("kv_order", "?")


@pytest.mark.parametrize("sink", ["buffer", "bytesio", "file"])
def test_serialize(benchmark, cache, sink, tmp_path):
    ids = np.random.default_rng(2).permutation(BLOCKS)
    n = serialized_nbytes(cache, BLOCKS)
    buf = bytearray(n)
    path = tmp_path / "cache.kvt"

    def run():
        if sink == "buffer":
            serialize_blocks(cache, ids, buf)
        elif sink == "bytesio":
            serialize_blocks(cache, ids, io.BytesIO())
        else:
            serialize_blocks(cache, ids, path)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _record(benchmark, f"serialize {_order(cache)} -> {sink}", n)


@pytest.mark.parametrize("source", ["buffer", "file"])
def test_deserialize(benchmark, cache, blob, source, tmp_path):
    ids, buf = blob
    dst = KVCache.allocate(cache.layout)
    path = tmp_path / "cache.kvt"
    path.write_bytes(buf)
    src = buf if source == "buffer" else path
    benchmark.pedantic(deserialize_blocks, args=(dst, ids[::-1].copy(), src), rounds=5,
                       warmup_rounds=1)
    _record(benchmark, f"deserialize {source} -> {_order(cache)}", len(buf))


def test_zz_report():
    """Prints the table and writes bench-results/wire.json (defined last, so it runs last)."""
    if not RESULTS:
        pytest.skip("no timings (--benchmark-disable?)")
    print(f"\n{'benchmark':36} {'mean':>11} {'per s':>12} {'GB/s':>8}")
    for r in RESULTS:
        print(f"{r['name']:36} {r['seconds'] * 1e3:>9.3f}ms {r['per_s']:>12.4g} "
              f"{r['gb_per_s']:>8.3f}")
    os.makedirs("bench-results", exist_ok=True)
    with open(os.path.join("bench-results", "wire.json"), "w") as f:
        json.dump(dict(bench="wire", argv=sys.argv, python=sys.version, machine=platform.machine(),
                       cpus=os.cpu_count(), rows=RESULTS), f, indent=1)

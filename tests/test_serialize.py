"""KV serialization for offload: serialize_blocks / deserialize_blocks round-trip blocks between
caches of every layout family (through a file, a path, a buffer), refuse another layout naming
both, detect every corrupted byte naming the block, and stream with bounded memory."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvtransfer as kvt
from kvtransfer import _core
from kvtransfer.cache import KVCache
from kvtransfer.layout import KVLayout
from kvtransfer.serialize import (
    deserialize_blocks,
    read_header,
    serialize_blocks,
    serialized_nbytes,
)

GEOM = dict(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8)


def random_cache(layout: KVLayout, seed: int = 0) -> KVCache:
    cache = KVCache.allocate(layout, fill=None)
    for i in range(len(cache.regions())):
        view = cache.buffer_view(i)
        view[:] = np.random.default_rng(seed + i).integers(0, 256, len(view), dtype=np.uint8)
    return cache


def block_values(cache: KVCache, block: int) -> np.ndarray:
    """Block `block` in logical order [plane, token, head, head_bytes], independent of layout."""
    lay = cache.layout
    out = []
    for b, off in cache.planes.tolist():
        view = np.ndarray((lay.block_size, lay.num_kv_heads, lay.head_bytes), dtype=np.uint8,
                          buffer=cache.buffer_view(b), offset=off + block * lay.block_stride,
                          strides=(lay.token_stride, lay.head_stride, 1))
        out.append(view.copy())
    return np.stack(out)


LAYOUTS = {
    "vllm_flash_nhd": lambda n: KVLayout.vllm_flash(num_blocks=n, **GEOM),
    "vllm_flash_hnd": lambda n: KVLayout.vllm_flash(num_blocks=n, kv_order="HND", **GEOM),
    "vllm_flashinfer": lambda n: KVLayout.vllm_flashinfer(num_blocks=n, dtype="bfloat16", **GEOM),
    "vllm_cross_layer": lambda n: KVLayout.vllm_cross_layer(num_blocks=n, **GEOM),
    "sglang_mha": lambda n: KVLayout.sglang_mha(num_layers=3, num_tokens=4 * n, page_size=4,
                                                num_kv_heads=2, head_dim=8),
    "mla": lambda n: KVLayout.mla(num_layers=3, num_blocks=n, block_size=4, kv_lora_rank=16,
                                  rope_dim=8, dtype="float8_e4m3"),
}


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("sink", ["buffer", "fileobj", "path"])
def test_blocks_round_trip_into_other_block_ids(kind, sink, tmp_path):
    src = random_cache(LAYOUTS[kind](12))
    dst = KVCache.allocate(LAYOUTS[kind](9))
    src_ids, dst_ids = [5, 0, 11, 3], [8, 2, 0, 4]
    n = serialized_nbytes(src, len(src_ids))
    if sink == "buffer":
        target = bytearray(n)
    elif sink == "fileobj":
        target = io.BytesIO()
    else:
        target = tmp_path / "blocks.kvt"
    assert serialize_blocks(src, src_ids, target) == n
    if sink == "fileobj":
        assert len(target.getvalue()) == n
        target.seek(0)
    info = deserialize_blocks(dst, dst_ids, target)
    assert info.num_blocks == 4 and list(info.source_blocks) == src_ids and info.scales is None
    assert info.nbytes == n
    for s, d in zip(src_ids, dst_ids, strict=True):
        assert np.array_equal(block_values(src, s), block_values(dst, d))
    for untouched in sorted(set(range(9)) - set(dst_ids)):
        assert not block_values(dst, untouched).any()


def test_blocks_move_between_memory_orders_and_cache_sizes():
    """Blocks are stored canonically: NHD <-> HND, per-layer <-> cross-layer, any block count."""
    src = random_cache(LAYOUTS["vllm_flash_nhd"](10), seed=3)
    buf = bytearray(serialized_nbytes(src, 3))
    serialize_blocks(src, [1, 2, 9], buf)
    for kind in ("vllm_flash_hnd", "vllm_cross_layer"):
        dst = KVCache.allocate(LAYOUTS[kind](4))
        deserialize_blocks(dst, [3, 0, 1], buf)
        for s, d in zip([1, 2, 9], [3, 0, 1], strict=True):
            assert np.array_equal(block_values(src, s), block_values(dst, d))


def test_restores_into_the_recorded_ids_by_default_and_reads_from_bytes():
    src = random_cache(LAYOUTS["vllm_flash_nhd"](6))
    out = io.BytesIO()
    serialize_blocks(src, [4, 1], out)
    dst = KVCache.allocate(LAYOUTS["vllm_flash_nhd"](6))
    deserialize_blocks(dst, None, out.getvalue())  # bytes: read in place
    for b in (4, 1):
        assert np.array_equal(block_values(src, b), block_values(dst, b))
    small = KVCache.allocate(LAYOUTS["vllm_flash_nhd"](3))
    with pytest.raises(kvt.InvalidRequestError, match="source block 4.*pass dst_block_ids"):
        deserialize_blocks(small, None, out.getvalue())


def test_torch_tensors_round_trip():
    torch = pytest.importorskip("torch")
    lay = KVLayout.vllm_flash(num_blocks=5, dtype="bfloat16", **GEOM)
    tensors = [torch.randn(lay.tensor_shape).to(torch.bfloat16) for _ in range(lay.num_layers)]
    src = KVCache(lay, tensors)
    out = [torch.zeros(lay.tensor_shape, dtype=torch.bfloat16) for _ in range(lay.num_layers)]
    data = io.BytesIO()
    serialize_blocks(src, [0, 4], data)
    data.seek(0)
    deserialize_blocks(KVCache(lay, out), [4, 0], data)
    for t, o in zip(tensors, out, strict=True):
        assert torch.equal(t[:, 0], o[:, 4]) and torch.equal(t[:, 4], o[:, 0])
        assert not o[:, 1:4].any()


def test_scales_travel_with_their_blocks():
    src = random_cache(LAYOUTS["mla"](4))
    scales = np.array([[0.5, 2.0], [1.5, -3.25], [7.0, 1e-3]], dtype=np.float32)
    data = io.BytesIO()
    n = serialize_blocks(src, [3, 1, 2], data, scales=scales)
    assert n == serialized_nbytes(src, 3, scale_count=2)
    data.seek(0)
    dst = KVCache.allocate(LAYOUTS["mla"](4))
    info = deserialize_blocks(dst, [0, 1, 2], data)
    assert info.scale_count == 2 and np.array_equal(info.scales, scales)
    one = io.BytesIO()
    serialize_blocks(src, [0], one, scales=[0.25])
    assert deserialize_blocks(dst, [0], one.getvalue()).scales.tolist() == [[0.25]]
    with pytest.raises(kvt.InvalidRequestError, match="scales"):
        serialize_blocks(src, [0, 1], io.BytesIO(), scales=[1.0])


def test_header_is_self_describing():
    src = random_cache(LAYOUTS["vllm_flash_hnd"](6))
    data = io.BytesIO()
    serialize_blocks(src, [1, 2], data)
    data.seek(0)
    info = read_header(data)
    assert data.tell() == info.header_bytes
    lay = src.layout
    assert (info.dtype, info.num_layers, info.kv_parts, info.block_size, info.num_kv_heads,
            info.head_dim) == ("float16", 3, 2, 4, 2, 8)
    assert info.num_blocks == 2 and info.fingerprint == lay.fingerprint()
    assert KVLayout.from_dict(info.layout) == lay
    assert info.block_bytes == lay.num_planes * lay.block_size * lay.num_kv_heads * lay.head_bytes
    assert "vllm_flash" in info.describe()


@pytest.mark.parametrize("change, field", [
    (dict(block_size=8), "block_size 4 != 8"),
    (dict(num_layers=4), "num_layers 3 != 4"),
    (dict(dtype="bfloat16"), "dtype 'float16' != 'bfloat16'"),
    (dict(num_kv_heads=1), "num_kv_heads 2 != 1"),
    (dict(head_dim=16), "head_dim 8 != 16"),
])
def test_a_file_from_another_layout_is_refused_naming_both(change, field):
    src = random_cache(LAYOUTS["vllm_flash_nhd"](4))
    data = io.BytesIO()
    serialize_blocks(src, [0, 1], data)
    dst = KVCache.allocate(KVLayout.vllm_flash(num_blocks=4, **{**GEOM, **change}))
    before = dst.buffer_view(0).copy()
    with pytest.raises(kvt.InvalidRequestError) as exc:
        deserialize_blocks(dst, [0, 1], data.getvalue())
    msg = str(exc.value)
    assert field in msg and repr(src.layout) in msg and repr(dst.layout) in msg
    assert np.array_equal(dst.buffer_view(0), before)
    mla = KVCache.allocate(KVLayout.mla(num_layers=3, num_blocks=4, block_size=4))
    with pytest.raises(kvt.InvalidRequestError, match="kv_parts 2 != 1"):
        deserialize_blocks(mla, [0, 1], data.getvalue())


def test_a_corrupted_byte_names_the_block_and_never_lands():
    src = random_cache(LAYOUTS["vllm_flash_nhd"](6))
    data = bytearray(serialized_nbytes(src, 3))
    serialize_blocks(src, [0, 1, 2], data)
    info = read_header(bytes(data))
    # One byte in the middle of record 1's block data.
    at = info.header_bytes + info.record_bytes + info.record_bytes // 2
    data[at] ^= 0x01
    dst = KVCache.allocate(LAYOUTS["vllm_flash_nhd"](6))
    with pytest.raises(kvt.ProtocolError, match="record 1: fails its crc32c.*destination block 4"):
        deserialize_blocks(dst, [3, 4, 5], io.BytesIO(bytes(data)))
    assert np.array_equal(block_values(dst, 3), block_values(src, 0))  # before it: restored
    assert not block_values(dst, 4).any() and not block_values(dst, 5).any()


def test_every_single_byte_flip_is_detected():
    src = random_cache(LAYOUTS["mla"](3))
    good = bytearray(serialized_nbytes(src, 2, scale_count=1))
    serialize_blocks(src, [2, 0], good, scales=[1.0, 2.0])
    dst = KVCache.allocate(LAYOUTS["mla"](3))
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x80 >> (i % 8)
        with pytest.raises(kvt.ProtocolError):
            deserialize_blocks(dst, [0, 1], bad)


def test_truncated_and_foreign_input_are_protocol_errors():
    src = random_cache(LAYOUTS["vllm_flash_nhd"](4))
    data = io.BytesIO()
    serialize_blocks(src, [0, 1, 2], data)
    raw = data.getvalue()
    dst = KVCache.allocate(LAYOUTS["vllm_flash_nhd"](4))
    with pytest.raises(kvt.ProtocolError, match="truncated in record 2 of 3"):
        deserialize_blocks(dst, [0, 1, 2], io.BytesIO(raw[:-10]))
    with pytest.raises(kvt.ProtocolError, match="truncated in record 0"):
        deserialize_blocks(dst, [0, 1, 2], raw[:read_header(raw).header_bytes + 5])
    for cut in (0, 5, 12, 40):
        with pytest.raises(kvt.ProtocolError):
            deserialize_blocks(dst, [0, 1, 2], raw[:cut])
    with pytest.raises(kvt.ProtocolError, match="bad magic"):
        deserialize_blocks(dst, [0], b"PK\x03\x04" + bytes(100))
    future = bytearray(raw)
    future[4:6] = struct.pack("<H", _core.KV_FILE_VERSION + 1)
    with pytest.raises(kvt.ProtocolError, match="version 2; this build reads version 1"):
        deserialize_blocks(dst, [0, 1, 2], future)


def test_bad_arguments_are_invalid_requests():
    src = random_cache(LAYOUTS["vllm_flash_nhd"](4))
    with pytest.raises(kvt.InvalidRequestError, match="block 4 is outside"):
        serialize_blocks(src, [0, 4], io.BytesIO())
    with pytest.raises(kvt.InvalidRequestError, match="integer block ids"):
        serialize_blocks(src, [0.5], io.BytesIO())
    with pytest.raises(kvt.InvalidRequestError, match="needed"):
        serialize_blocks(src, [0, 1], bytearray(100))
    with pytest.raises(kvt.InvalidRequestError, match="read-only"):
        serialize_blocks(src, [0], bytes(serialized_nbytes(src, 1)))
    with pytest.raises(kvt.InvalidRequestError, match="KVCache"):
        serialize_blocks(np.zeros(10), [0], io.BytesIO())
    data = io.BytesIO()
    serialize_blocks(src, [0, 1], data)
    raw = data.getvalue()
    with pytest.raises(kvt.InvalidRequestError, match="holds 2 blocks, dst_block_ids has 3"):
        deserialize_blocks(src, [0, 1, 2], raw)
    with pytest.raises(kvt.InvalidRequestError, match="duplicates"):
        deserialize_blocks(src, [1, 1], raw)
    with pytest.raises(kvt.InvalidRequestError, match="outside"):
        deserialize_blocks(src, [0, -1], raw)


def test_no_blocks_is_a_valid_file():
    src = random_cache(LAYOUTS["vllm_flash_nhd"](2))
    data = io.BytesIO()
    n = serialize_blocks(src, [], data)
    assert n == len(data.getvalue()) == read_header(data.getvalue()).header_bytes
    assert deserialize_blocks(src, [], data.getvalue()).num_blocks == 0


def test_streaming_keeps_memory_bounded(tmp_path):
    """A 24 MiB cache through a file with 1 MiB chunks: peak extra memory is a few chunks."""
    lay = KVLayout.vllm_flash(num_layers=4, num_blocks=96, block_size=16, num_kv_heads=8,
                              head_dim=128)  # 256 KiB per block, 24 MiB in all
    src = random_cache(lay)
    dst = KVCache.allocate(lay)
    path = tmp_path / "big.kvt"
    ids = list(range(96))
    tracemalloc.start()
    try:
        serialize_blocks(src, ids, path, chunk_bytes=1 << 20)
        _, peak_write = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        deserialize_blocks(dst, ids[::-1], path, chunk_bytes=1 << 20)
        _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_write < 3 << 20 and peak_read < 3 << 20, (peak_write, peak_read)
    for s, d in [(0, 95), (50, 45), (95, 0)]:
        assert np.array_equal(block_values(src, s), block_values(dst, d))


def test_the_file_format_is_as_documented():
    """Spot-checks docs/wire-format.md's "KV file" tables against the bytes."""
    src = random_cache(LAYOUTS["vllm_flash_nhd"](3))
    raw = io.BytesIO()
    serialize_blocks(src, [2], raw, scales=[0.5])
    raw = raw.getvalue()
    magic, version, flags, hlen = struct.unpack_from("<IHHI", raw)
    assert (magic, version, flags) == (0x4654564B, 1, 1) and raw[:4] == b"KVTF"
    assert struct.unpack_from("<I", raw, hlen - 4)[0] == _core.crc32c(raw[:hlen - 4])
    n = struct.unpack_from("<I", raw, 12)[0]
    assert raw[16:16 + n] == b"float16"
    n2 = struct.unpack_from("<I", raw, 16 + n + 44)[0]  # fingerprint, then the layout JSON
    assert raw[16 + n + 48:16 + n + 48 + n2].decode() == src.layout.fingerprint()
    assert json.loads(read_header(raw).layout and json.dumps(read_header(raw).layout))
    rec = raw[hlen:]
    assert rec[:4] == b"KVTB" and struct.unpack_from("<IQf", rec, 4) == (0, 2, 0.5)
    assert struct.unpack_from("<I", rec, len(rec) - 4)[0] == _core.crc32c(rec[:-4])
    assert np.array_equal(np.frombuffer(rec[20:-4], np.uint8).reshape(block_values(src, 2).shape),
                          block_values(src, 2))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 400))
def test_random_input_is_a_typed_error(junk, at):
    """Random bytes, alone or spliced into a valid file, never crash the reader."""
    src = random_cache(LAYOUTS["mla"](2))
    good = bytearray(serialized_nbytes(src, 1))
    serialize_blocks(src, [1], good)
    spliced = bytes(good[:at]) + junk + bytes(good[at + len(junk):])
    for data in (junk, spliced):
        try:
            deserialize_blocks(src, None, data)
        except (kvt.ProtocolError, kvt.InvalidRequestError):
            pass


def hand_built_header(dtype: bytes, num_blocks: int, layout: bytes = b"{}",
                      geometry=(2, 3, 2, 4, 2, 8), extra: bytes = b"") -> bytes:
    """A KV file header built from docs/wire-format.md alone (not through the codec)."""
    itemsize, layers, parts, block_size, heads, head_dim = geometry
    block_bytes = itemsize * layers * parts * block_size * heads * head_dim
    body = (struct.pack("<I", len(dtype)) + dtype
            + struct.pack("<IIIIIIQQI", itemsize, layers, parts, block_size, heads, head_dim,
                          block_bytes, num_blocks, 0)
            + struct.pack("<I", 3) + b"fp!" + struct.pack("<I", len(layout)) + layout + extra)
    length = 12 + len(body) + 4
    pre = struct.pack("<IHHI", 0x4654564B, 1, 0, length)
    return pre + body + struct.pack("<I", _core.crc32c(pre + body))


def test_a_header_built_from_the_doc_is_read_and_judged_by_its_geometry():
    cache = KVCache.allocate(LAYOUTS["vllm_flash_nhd"](2))
    info = read_header(hand_built_header(b"float16", 0, extra=b"appended-field"))
    assert (info.dtype, info.num_layers, info.block_size, info.num_blocks) == ("float16", 3, 4, 0)
    assert info.layout == {} and info.fingerprint == "fp!"
    assert deserialize_blocks(cache, [], hand_built_header(b"float16", 0)).num_blocks == 0
    # A crafted header (valid crc) with a dtype that is not even UTF-8: a typed refusal.
    with pytest.raises(kvt.InvalidRequestError, match="dtype"):
        deserialize_blocks(cache, [], hand_built_header(b"\xff\xfe", 0, layout=b"\xff"))


def test_mmap_and_read_only_file_objects(tmp_path):
    import mmap

    src = random_cache(LAYOUTS["sglang_mha"](5))
    n = serialized_nbytes(src, 2)
    path = tmp_path / "m.kvt"
    path.write_bytes(bytes(n))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), n) as m:
        assert serialize_blocks(src, [4, 2], m) == n  # written in place
    raw = path.read_bytes()

    class ReadOnly:  # read() but no readinto()
        def __init__(self, data: bytes):
            self.f = io.BytesIO(data)

        def read(self, k: int) -> bytes:
            return self.f.read(min(k, 1000))  # short reads too

    dst = KVCache.allocate(LAYOUTS["sglang_mha"](5))
    deserialize_blocks(dst, [0, 1], ReadOnly(raw), chunk_bytes=1)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        deserialize_blocks(dst, [3, 0], m)
    for s, d in ((4, 3), (2, 0), (2, 1)):
        assert np.array_equal(block_values(src, s), block_values(dst, d))

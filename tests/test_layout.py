"""KVLayout: exact shapes and strides of every preset, custom layouts, fingerprints, dtypes and
(de)serialization."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvtransfer.errors import InvalidRequestError
from kvtransfer.layout import KVLayout, normalize_dtype

KW = dict(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=3, head_dim=7)


def contiguous(shape):
    return tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))


def permuted_strides(physical_shape, perm):
    """Strides of a contiguous tensor of physical_shape viewed through permute(perm)."""
    phys = contiguous(physical_shape)
    return tuple(phys[p] for p in perm)


@pytest.mark.parametrize("kv_order", ["NHD", "HND"])
def test_vllm_flash(kv_order):
    lay = KVLayout.vllm_flash(**KW, kv_order=kv_order, dtype="bfloat16")
    assert lay.tensor_shape == (2, 5, 4, 3, 7)
    assert lay.num_tensors == 3 and lay.num_planes == 6 and lay.itemsize == 2
    if kv_order == "NHD":
        assert lay.tensor_strides == contiguous((2, 5, 4, 3, 7))
    else:  # vLLM's HND stride order (0, 1, 3, 2, 4): physical (2, blocks, heads, tokens, dim)
        assert lay.tensor_strides == permuted_strides((2, 5, 3, 4, 7), (0, 1, 3, 2, 4))
    assert lay.plane_offsets().tolist() == [[0, 0], [0, 5 * 4 * 3 * 7 * 2], [1, 0],
                                            [1, 5 * 4 * 3 * 7 * 2], [2, 0], [2, 5 * 4 * 3 * 7 * 2]]


@pytest.mark.parametrize("kv_order", ["NHD", "HND"])
def test_vllm_flashinfer(kv_order):
    lay = KVLayout.vllm_flashinfer(**KW, kv_order=kv_order)
    assert lay.tensor_shape == (5, 2, 4, 3, 7)
    want = (contiguous((5, 2, 4, 3, 7)) if kv_order == "NHD"
            else permuted_strides((5, 2, 3, 4, 7), (0, 1, 3, 2, 4)))
    assert lay.tensor_strides == want
    assert lay.block_stride == 2 * 4 * 3 * 7 * 2


@pytest.mark.parametrize("kv_order", ["NHD", "HND"])
def test_vllm_cross_layer(kv_order):
    lay = KVLayout.vllm_cross_layer(**KW, kv_order=kv_order)
    assert lay.tensor_shape == (5, 3, 2, 4, 3, 7) and lay.num_tensors == 1
    want = (contiguous((5, 3, 2, 4, 3, 7)) if kv_order == "NHD"
            else permuted_strides((5, 3, 2, 3, 4, 7), (0, 1, 2, 4, 3, 5)))
    assert lay.tensor_strides == want
    assert lay.plane_offsets()[:, 1].tolist() == [q * 4 * 3 * 7 * 2 for q in range(6)]


def test_sglang_mha():
    lay = KVLayout.sglang_mha(num_layers=3, num_tokens=20, page_size=4, num_kv_heads=3,
                              head_dim=7, dtype="float32")
    assert lay.tensor_shape == (20, 3, 7) and lay.tensor_strides == (21, 7, 1)
    assert lay.num_blocks == 5 and lay.block_size == 4 and lay.num_tensors == 6
    assert [lay.tensor_name(i) for i in (0, 3, 5)] == ["layer 0 K", "layer 0 V", "layer 2 V"]
    assert lay.tensor_index(2, 1) == 5
    with pytest.raises(InvalidRequestError, match="multiple of page_size"):
        KVLayout.sglang_mha(num_layers=1, num_tokens=10, page_size=4, num_kv_heads=1, head_dim=2)


def test_mla():
    lay = KVLayout.mla(num_layers=2, num_blocks=5, block_size=4, kv_lora_rank=512, rope_dim=64)
    assert lay.tensor_shape == (5, 4, 576) and lay.kv_parts == 1 and lay.num_kv_heads == 1
    assert lay.dtype == "bfloat16" and lay.num_planes == 2 and lay.head_bytes == 1152


def test_custom_layouts():
    hnd = KVLayout("KBTHD", **KW, order="KBHTD")
    assert hnd == KVLayout.vllm_flash(**KW, kv_order="HND")
    assert KVLayout("KBTHD", **KW, strides=hnd.tensor_strides) == hnd
    cpu = KVLayout("BHT(KD)", **KW)  # vLLM CPU: K|V in the last dimension
    assert cpu.tensor_shape == (5, 3, 4, 14) and cpu.tensor_strides == (168, 56, 14, 1)
    assert cpu.plane_offsets()[:2].tolist() == [[0, 0], [0, 14]]  # V starts head_dim in
    assert cpu.head_stride == 56 * 2 and cpu.token_stride == 14 * 2
    padded = KVLayout("BTHD", **KW, strides=(200, 40, 8, 1), kv_parts=2)  # separate K, V; padded
    assert padded.num_tensors == 6 and padded.tensor_nbytes == (4 * 200 + 3 * 40 + 2 * 8 + 7) * 2


@pytest.mark.parametrize("dims,kw,match", [
    ("KBXHD", {}, "unknown letter"),
    ("KBHD", {}, "lacks 'T'"),
    ("KBTTHD", {}, "appears twice"),
    ("KBTD", {}, "no H"),
    ("KBTHD", {"order": "KBTDH"}, "innermost"),
    ("KBTHD", {"order": "KBTH"}, "permutation"),
    ("KBTHD", {"strides": (1, 1, 1, 1, 1)}, "overlaps"),
    ("(BT)KHD", {"order": "TBKHD"}, "not contiguous"),
    ("KBTHD", {"kv_parts": 1}, "kv_parts=1"),
    ("KBTHD", {"order": "KBTHD", "strides": (1,)}, "either"),
    ("KB(THD", {}, "parentheses"),
])
def test_custom_layout_errors(dims, kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        KVLayout(dims, **{**KW, **kw})


def test_sizes_must_be_positive_integers():
    with pytest.raises(InvalidRequestError, match="num_blocks must be a positive integer"):
        KVLayout.vllm_flash(**{**KW, "num_blocks": 0})
    with pytest.raises(InvalidRequestError, match="head_dim"):
        KVLayout.vllm_flash(**{**KW, "head_dim": 2.5})


def test_dtypes():
    assert normalize_dtype("torch.bfloat16") == "bfloat16"
    assert normalize_dtype(np.float16) == "float16"
    assert normalize_dtype(np.dtype("float32")) == "float32"
    assert normalize_dtype("float8_e4m3fn") == "float8_e4m3"
    assert normalize_dtype("fp8_e5m2") == "float8_e5m2"
    for name, size in [("float16", 2), ("bfloat16", 2), ("float32", 4), ("float8_e4m3", 1),
                       ("float8_e5m2", 1)]:
        assert KVLayout.vllm_flash(**KW, dtype=name).itemsize == size
    with pytest.raises(InvalidRequestError, match="unsupported KV dtype"):
        normalize_dtype("int4")


def test_fingerprint_is_stable_and_means_compatible():
    base = KVLayout.vllm_flash(num_layers=32, num_blocks=4096, block_size=16, num_kv_heads=8,
                               head_dim=128)
    # a fixed value: it travels between hosts and versions of this package
    assert base.fingerprint() == "9f3429bf11351978714852842204c2aa453beb848ae7547edb598a8e7b941db3"
    same = [
        KVLayout.vllm_flash(num_layers=32, num_blocks=100, block_size=32, num_kv_heads=2,
                            head_dim=128, kv_order="HND"),
        KVLayout.vllm_flashinfer(num_layers=32, num_blocks=7, block_size=16, num_kv_heads=8,
                                 head_dim=128),
        KVLayout.sglang_mha(num_layers=32, num_tokens=64, page_size=1, num_kv_heads=4,
                            head_dim=128),
    ]
    for other in same:
        assert other.fingerprint() == base.fingerprint()
        base.check_compatible(other)
    different = [
        KVLayout.vllm_flash(num_layers=32, num_blocks=4096, block_size=16, num_kv_heads=8,
                            head_dim=128, dtype="bfloat16"),
        KVLayout.vllm_flash(num_layers=31, num_blocks=4096, block_size=16, num_kv_heads=8,
                            head_dim=128),
        KVLayout.vllm_flash(num_layers=32, num_blocks=4096, block_size=16, num_kv_heads=8,
                            head_dim=64),
        KVLayout.mla(num_layers=32, num_blocks=4096, block_size=16, kv_lora_rank=64,
                     rope_dim=64, dtype="float16"),
    ]
    for other in different:
        assert other.fingerprint() != base.fingerprint()
        with pytest.raises(InvalidRequestError) as e:
            base.check_compatible(other)
        assert repr(base) in str(e.value) and repr(other) in str(e.value)


ALL = [
    KVLayout.vllm_flash(**KW, kv_order="HND", dtype="float8_e5m2"),
    KVLayout.vllm_flashinfer(**KW),
    KVLayout.vllm_cross_layer(**KW, dtype="float32"),
    KVLayout.sglang_mha(num_layers=2, num_tokens=16, page_size=8, num_kv_heads=2, head_dim=4),
    KVLayout.mla(num_layers=2, num_blocks=3, block_size=4, kv_lora_rank=8, rope_dim=4),
    KVLayout("BHT(KD)", **KW),
]


@pytest.mark.parametrize("lay", ALL, ids=lambda lay: lay.kind + "-" + lay.dims)
def test_dict_roundtrip(lay):
    back = KVLayout.from_dict(json.loads(json.dumps(lay.to_dict())))
    assert back == lay and repr(back) == repr(lay) and hash(back) == hash(lay)
    assert back.fingerprint() == lay.fingerprint()


@pytest.mark.parametrize("bad", [
    [], {"format": 2}, {"format": 1, "dims": "KBTHD"},
    {**ALL[0].to_dict(), "strides": [1, 1, 1, 1, 1]},
    {**ALL[0].to_dict(), "num_blocks": -3},
    {**ALL[0].to_dict(), "dtype": "int64"},
])
def test_from_dict_rejects_malformed(bad):
    with pytest.raises(InvalidRequestError):
        KVLayout.from_dict(bad)


def test_repr():
    assert repr(KVLayout.vllm_flash(**KW)) == (
        "KVLayout.vllm_flash(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=3, "
        "head_dim=7, dtype='float16', kv_order='NHD')")
    assert repr(KVLayout("BHT(KD)", **KW)).startswith("KVLayout('BHT(KD)', num_layers=3")


def test_layer_planes():
    lay = KVLayout.vllm_flash(**KW)
    assert lay.layer_planes(None) == (0, 6)
    assert lay.layer_planes(1) == (2, 4)
    assert lay.layer_planes(range(1, 3)) == (2, 6)
    assert lay.layer_planes((0, 0)) == (0, 0)
    with pytest.raises(InvalidRequestError, match="step 1"):
        lay.layer_planes(range(0, 3, 2))
    with pytest.raises(InvalidRequestError, match="outside"):
        lay.layer_planes(range(2, 4))

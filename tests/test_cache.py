"""KVCache: validation of the tensors against the layout, buffers (one per allocation), the
single-buffer form, torch tensors, and the descriptor a peer receives."""

from __future__ import annotations

import numpy as np
import pytest
from kv_reference import make_tensors

from kvtransfer.cache import CacheDescriptor, KVCache
from kvtransfer.errors import InvalidRequestError, ProtocolError
from kvtransfer.layout import KVLayout
from kvtransfer.planner import plan_transfer

KW = dict(num_layers=3, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8)
FLASH = KVLayout.vllm_flash(**KW)


def test_per_layer_tensors_of_one_allocation_share_a_buffer():
    big = np.zeros((3, 2, 6, 4, 2, 8), dtype=np.float16)  # vLLM CPU: layers carved from one buffer
    cache = KVCache(FLASH, [big[i] for i in range(3)])
    assert cache.regions() == [(big.__array_interface__["data"][0], big.nbytes)]
    assert cache.planes[:, 0].tolist() == [0] * 6
    assert cache.planes[:, 1].tolist() == [i * 768 for i in range(6)]
    assert cache.device == "cpu" and cache.nbytes == big.nbytes


def test_separate_allocations_are_separate_buffers():
    tensors = [np.zeros(FLASH.tensor_shape, dtype=np.float16) for _ in range(3)]
    cache = KVCache(FLASH, tensors)
    assert [a for a, _ in cache.regions()] == [t.__array_interface__["data"][0] for t in tensors]
    assert cache.planes.tolist() == [[0, 0], [0, 768], [1, 0], [1, 768], [2, 0], [2, 768]]


def test_one_buffer_holds_all_tensors():
    buf = bytearray(FLASH.nbytes)
    cache = KVCache(FLASH, buf)
    assert len(cache.regions()) == 1 and cache.regions()[0][1] == FLASH.nbytes
    assert cache.planes[:, 1].tolist() == [i * 768 for i in range(6)]
    with pytest.raises(InvalidRequestError, match=f"one contiguous buffer of {FLASH.nbytes} bytes"):
        KVCache(FLASH, bytearray(FLASH.nbytes - 1))
    with pytest.raises(BufferError):  # the cache pins the bytearray: its address stays valid
        buf.extend(b"x")


def test_sglang_k_and_v_lists():
    lay = KVLayout.sglang_mha(num_layers=2, num_tokens=16, page_size=4, num_kv_heads=2,
                              head_dim=4)
    k = [np.zeros((16, 2, 4), np.float16) for _ in range(2)]
    v = [np.zeros((16, 2, 4), np.float16) for _ in range(2)]
    nested, flat = KVCache(lay, (k, v)), KVCache(lay, k + v)
    assert nested.regions() == flat.regions() and len(flat.regions()) == 4
    assert flat.planes[:, 0].tolist() == [0, 2, 1, 3]  # plane (layer, part) -> buffer


def test_wrong_count():
    with pytest.raises(InvalidRequestError,
                       match=r"has 3 tensor\(s\) \(layer 0, layer 1, layer 2\), got 2"):
        KVCache(FLASH, [np.zeros(FLASH.tensor_shape, np.float16)] * 2)


def test_wrong_shape_names_the_tensor():
    tensors = [np.zeros(FLASH.tensor_shape, np.float16) for _ in range(3)]
    tensors[2] = np.zeros((2, 5, 4, 2, 8), np.float16)
    with pytest.raises(InvalidRequestError,
                       match=r"tensor 2 \(layer 2\).*shape \(2, 5, 4, 2, 8\) "
                             r"!= expected \(2, 6, 4, 2, 8\)"):
        KVCache(FLASH, tensors)


def test_wrong_dtype_names_the_tensor():
    tensors = [np.zeros(FLASH.tensor_shape, np.float16) for _ in range(3)]
    tensors[1] = tensors[1].astype(np.float32)
    with pytest.raises(InvalidRequestError,
                       match=r"tensor 1 \(layer 1\).*dtype float32 does not hold float16"):
        KVCache(FLASH, tensors)


def test_wrong_strides_names_the_tensor():
    hnd = np.zeros((2, 6, 2, 4, 8), np.float16).transpose(0, 1, 3, 2, 4)  # HND given, NHD expected
    tensors = [np.zeros(FLASH.tensor_shape, np.float16) for _ in range(3)]
    tensors[0] = hnd
    with pytest.raises(InvalidRequestError, match=r"tensor 0 \(layer 0\).*strides"):
        KVCache(FLASH, tensors)
    # ... and the same tensors are right for the HND layout
    KVCache(KVLayout.vllm_flash(**KW, kv_order="HND"), [hnd] * 3)
    sliced = np.zeros((2, 12, 4, 2, 8), np.float16)[:, ::2]
    with pytest.raises(InvalidRequestError, match="strides"):
        KVCache(FLASH, [sliced] * 3)


def test_raw_bits_for_bfloat16_and_float8():
    bf = KVLayout.vllm_flash(**KW, dtype="bfloat16")
    KVCache(bf, [np.zeros(bf.tensor_shape, np.uint16) for _ in range(3)])
    f8 = KVLayout.mla(num_layers=1, num_blocks=4, block_size=2, kv_lora_rank=4, rope_dim=2,
                      dtype="float8_e4m3")
    KVCache(f8, [np.zeros(f8.tensor_shape, np.uint8)])
    with pytest.raises(InvalidRequestError, match="dtype uint8 does not hold bfloat16"):
        KVCache(bf, [np.zeros(bf.tensor_shape, np.uint8) for _ in range(3)])


def test_array_interface_objects():
    class Foreign:
        def __init__(self, arr):
            self.arr = arr
            self.__array_interface__ = arr.__array_interface__

    tensors = [Foreign(np.zeros(FLASH.tensor_shape, np.float16)) for _ in range(3)]
    cache = KVCache(FLASH, tensors)
    assert len(cache.regions()) == 3
    with pytest.raises(InvalidRequestError, match="cannot read the memory"):
        KVCache(FLASH, [object()] * 3)


def test_layout_type_checked():
    with pytest.raises(InvalidRequestError, match="must be a KVLayout"):
        KVCache("vllm", [])


def test_allocate_and_buffer_view():
    cache = KVCache.allocate(FLASH, fill=7)
    view = cache.buffer_view(0)
    assert view.shape == (FLASH.nbytes,) and (view == 7).all()
    view[:] = 1
    assert (cache.tensors[0].view(np.uint8) == 1).all()


def test_descriptor_roundtrip_and_checks():
    rng = np.random.default_rng(0)
    cache = KVCache(FLASH, make_tensors(FLASH, rng, shared=False))
    desc = cache.descriptor()
    back = CacheDescriptor.from_bytes(desc.to_bytes())
    assert back == desc and back.buffer_nbytes == desc.buffer_nbytes
    plan = plan_transfer(cache, back, [0, 1], [2, 3])
    assert plan.nbytes == 2 * 4 * 2 * 8 * 2 * 6
    with pytest.raises(ProtocolError, match="not valid JSON"):
        CacheDescriptor.from_bytes(b"\xff{")
    bad = desc.to_dict()
    bad["buffers"] = [10, 10, 10]
    with pytest.raises(InvalidRequestError, match="spans bytes"):
        CacheDescriptor.from_dict(bad)
    bad = desc.to_dict()
    bad["planes"] = bad["planes"][:-2]
    with pytest.raises(InvalidRequestError, match="plane table has shape"):
        CacheDescriptor.from_dict(bad)
    with pytest.raises(InvalidRequestError, match="malformed"):
        CacheDescriptor.from_dict({"layout": FLASH.to_dict()})


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bfloat16"),
                                        (torch.float8_e4m3fn, "float8_e4m3"),
                                        (torch.float8_e5m2, "float8_e5m2")])
def test_torch_tensors(dtype, name):
    lay = KVLayout.vllm_flash(**KW, dtype=name)
    big = torch.zeros((3, *lay.tensor_shape), dtype=dtype)
    shared = KVCache(lay, list(big.unbind(0)))
    assert shared.regions() == [(big.data_ptr(), big.nbytes)]
    separate = KVCache(lay, [torch.zeros(lay.tensor_shape, dtype=dtype) for _ in range(3)])
    assert len(separate.regions()) == 3
    with pytest.raises(InvalidRequestError, match="dtype float16"):
        KVCache(lay, [torch.zeros(lay.tensor_shape, dtype=torch.float16)] * 3)


def test_torch_hnd_view_and_single_buffer():
    lay = KVLayout.vllm_flash(**KW, kv_order="HND")
    phys = torch.zeros((3, 2, 6, 2, 4, 8), dtype=torch.float16)  # (layer, 2, blocks, H, T, D)
    logical = phys.permute(0, 1, 2, 4, 3, 5)
    cache = KVCache(lay, list(logical.unbind(0)))
    assert cache.regions() == [(phys.data_ptr(), phys.nbytes)]
    flat = KVCache(lay, phys.view(-1))
    assert flat.regions() == cache.regions() and np.array_equal(flat.planes, cache.planes)

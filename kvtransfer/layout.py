"""KV-cache layouts: where every layer's K and V blocks, tokens and heads sit in memory.

A layout names the dimensions of the tensors a serving framework allocates, with one letter
each::

    L  layer            K  K/V part (0 = K, 1 = V)    B  block      T  token within a block
    H  KV head          D  element within a head (head_dim; always the innermost, stride 1)

``dims`` is the tensor's logical shape in those letters; letters in parentheses share one
tensor dimension (SGLang's token pool ``(BT)HD``, a K|V-concatenated last dim ``(KD)``). A
letter missing from ``dims`` means one tensor per value: no ``L`` → one tensor per layer, no
``K`` (with ``kv_parts=2``) → separate K and V tensors. The physical order (``order``, outer
to inner, default: the order of ``dims``) or explicit element ``strides`` give the strides, so a
logical NHD view of an HND allocation (vLLM's ``kv_cache_stride_order``) is described exactly.

Every (layer, part) pair is a *plane*: the planner addresses block ``b``, token ``t``, head
``h`` of a plane at ``offset + b*block_stride + t*token_stride + h*head_stride`` and moves
``head_dim * itemsize`` contiguous bytes from there.

``fingerprint()`` hashes what both sides of a transfer must share (dtype, number of layers,
K/V parts, head_dim): block counts, block sizes, per-rank head counts and the physical order may
differ, the planner converts between them.
"""

from __future__ import annotations

import hashlib
import json
import math
from itertools import pairwise
from typing import Any

import numpy as np

from .errors import InvalidRequestError

#: dtype name -> itemsize. numpy has no bfloat16/float8: hold those as uint16/uint8 arrays (or
#: torch tensors, or ml_dtypes arrays).
DTYPES: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float8_e4m3": 1,
    "float8_e5m2": 1,
}

_DTYPE_ALIASES = {
    "half": "float16", "fp16": "float16", "f2": "float16",
    "bf16": "bfloat16",
    "float": "float32", "fp32": "float32", "f4": "float32",
    "float8_e4m3fn": "float8_e4m3", "fp8_e4m3": "float8_e4m3", "fp8": "float8_e4m3",
    "e4m3": "float8_e4m3",
    "fp8_e5m2": "float8_e5m2", "e5m2": "float8_e5m2",
}

#: The element dtypes a tensor may carry for each layout dtype (numpy, torch and ml_dtypes
#: names; same-size integers are raw-bit views).
ACCEPTED_TENSOR_DTYPES: dict[str, frozenset[str]] = {
    "float16": frozenset({"float16"}),
    "bfloat16": frozenset({"bfloat16", "uint16", "int16"}),
    "float32": frozenset({"float32"}),
    "float8_e4m3": frozenset({"float8_e4m3", "float8_e4m3fn", "uint8", "int8"}),
    "float8_e5m2": frozenset({"float8_e5m2", "uint8", "int8"}),
}

#: numpy dtype used to allocate a cache of each layout dtype (KVCache.allocate).
NUMPY_STORAGE: dict[str, str] = {
    "float16": "float16", "bfloat16": "uint16", "float32": "float32",
    "float8_e4m3": "uint8", "float8_e5m2": "uint8",
}

_LETTERS = "LKBTHD"
_FORMAT = 1  # version of to_dict()/fingerprint input
_PRESETS = ("vllm_flash", "vllm_flashinfer", "vllm_cross_layer", "sglang_mha", "mla")


def normalize_dtype(dtype: Any) -> str:
    """The canonical name of a dtype given as a string, numpy dtype or torch dtype."""
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        name = np.dtype(dtype).name
    else:
        name = str(dtype)
    name = name.lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise InvalidRequestError(
            f"unsupported KV dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return name


def _parse_dims(dims: str) -> list[str]:
    """'(BT)HD' -> ['BT', 'H', 'D']."""
    groups: list[str] = []
    i = 0
    compact = dims.replace(" ", "")
    while i < len(compact):
        c = compact[i]
        if c == "(":
            j = compact.find(")", i)
            if j < 0 or j == i + 1:
                raise InvalidRequestError(f"dims {dims!r}: unbalanced or empty parentheses")
            groups.append(compact[i + 1:j])
            i = j + 1
        else:
            groups.append(c)
            i += 1
    letters = "".join(groups)
    for c in letters:
        if c not in _LETTERS:
            raise InvalidRequestError(
                f"dims {dims!r}: unknown letter {c!r} (use L, K, B, T, H, D)")
    if len(set(letters)) != len(letters):
        raise InvalidRequestError(f"dims {dims!r}: a letter appears twice")
    return groups


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class KVLayout:
    """The memory layout of a paged KV cache (see the module docstring for ``dims``).

    Use a preset (``vllm_flash``, ``vllm_flashinfer``, ``vllm_cross_layer``, ``sglang_mha``,
    ``mla``) or describe a custom layout::

        KVLayout("KBTHD", num_layers=32, num_blocks=4096, block_size=16, num_kv_heads=8,
                 head_dim=128, dtype="float16", order="KBHTD")   # = vllm_flash(kv_order="HND")

    ``strides`` (elements, one per tensor dimension of ``dims``) may replace ``order``.
    """

    def __init__(self, dims: str, *, num_layers: int, num_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: Any = "float16", kv_parts: int = 2,
                 order: str | None = None, strides: tuple[int, ...] | list[int] | None = None):
        self.num_layers = _positive("num_layers", num_layers)
        self.num_blocks = _positive("num_blocks", num_blocks)
        self.block_size = _positive("block_size", block_size)
        self.num_kv_heads = _positive("num_kv_heads", num_kv_heads)
        self.head_dim = _positive("head_dim", head_dim)
        if kv_parts not in (1, 2):
            raise InvalidRequestError(
                f"kv_parts must be 1 (MLA latent) or 2 (K and V), got {kv_parts!r}")
        self.kv_parts = int(kv_parts)
        self.dtype = normalize_dtype(dtype)
        self.itemsize = DTYPES[self.dtype]
        self.kind = "custom"
        self._params: dict[str, Any] = {}

        groups = _parse_dims(dims)
        letters = "".join(groups)
        self.dims = "".join(g if len(g) == 1 else f"({g})" for g in groups)
        for need in "BTD":
            if need not in letters:
                raise InvalidRequestError(f"dims {dims!r} lacks {need!r} (block, token and "
                                          "head_dim dimensions are required)")
        if "H" not in letters and self.num_kv_heads != 1:
            raise InvalidRequestError(f"dims {dims!r} has no H but num_kv_heads={num_kv_heads}")
        if "K" in letters and self.kv_parts == 1:
            raise InvalidRequestError(f"dims {dims!r} has a K dimension but kv_parts=1")
        sizes = {"L": self.num_layers, "K": self.kv_parts, "B": self.num_blocks,
                 "T": self.block_size, "H": self.num_kv_heads, "D": self.head_dim}
        self._sizes = {c: sizes[c] for c in letters}

        if order is not None and strides is not None:
            raise InvalidRequestError("give either order or strides, not both")
        self._letter_strides = (self._strides_from_order(order, letters) if strides is None
                                else self._strides_from_tensor(strides, groups))
        ls = self._letter_strides
        if self._sizes["D"] > 1 and ls["D"] != 1:
            raise InvalidRequestError(f"dims {self.dims!r}: D (head_dim) must be innermost with "
                                      f"stride 1, got stride {ls['D']}")
        self._check_no_overlap()
        self.tensor_shape = tuple(math.prod(self._sizes[c] for c in g) for g in groups)
        self.tensor_strides = tuple(ls[g[-1]] for g in groups)
        for g in groups:  # letters sharing a dimension must nest exactly
            for outer, inner in pairwise(g):
                if self._sizes[outer] > 1 and ls[outer] != ls[inner] * self._sizes[inner]:
                    raise InvalidRequestError(
                        f"dims {self.dims!r}: {outer}{inner} share a tensor dimension but are not "
                        "contiguous in the given order/strides")
        self._span = 1 + sum((n - 1) * ls[c] for c, n in self._sizes.items())
        self._groups = groups
        self._fingerprint: str | None = None

    # -- construction helpers ------------------------------------------------------------------

    def _strides_from_order(self, order: str | None, letters: str) -> dict[str, int]:
        if order is None:
            order = letters
        order = order.replace(" ", "").replace("(", "").replace(")", "")
        if sorted(order) != sorted(letters):
            raise InvalidRequestError(f"order {order!r} must be a permutation of {letters!r}")
        strides: dict[str, int] = {}
        acc = 1
        for c in reversed(order):
            strides[c] = acc
            acc *= self._sizes[c]
        return strides

    def _strides_from_tensor(self, strides: Any, groups: list[str]) -> dict[str, int]:
        strides = tuple(strides)
        if len(strides) != len(groups):
            raise InvalidRequestError(f"strides {strides!r} must have one entry per tensor "
                                      f"dimension of {''.join(groups)!r} ({len(groups)})")
        out: dict[str, int] = {}
        for g, s in zip(groups, strides, strict=True):
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
                raise InvalidRequestError(
                    f"strides {strides!r}: each must be a non-negative integer")
            acc = int(s)
            for c in reversed(g):
                out[c] = acc
                acc *= self._sizes[c]
        return out

    def _check_no_overlap(self) -> None:
        dims = sorted((s, self._sizes[c], c) for c, s in self._letter_strides.items()
                      if self._sizes[c] > 1)
        extent = 1
        for stride, size, c in dims:
            if stride < extent:
                raise InvalidRequestError(
                    f"layout {self.dims!r}: dimension {c} (stride {stride}) overlaps the "
                    f"dimensions inside it (extent {extent} elements)")
            extent = stride * (size - 1) + extent

    @classmethod
    def _preset(cls, kind: str, params: dict[str, Any], dims: str, **kw: Any) -> KVLayout:
        layout = cls(dims, **kw)
        layout.kind = kind
        layout._params = params
        return layout

    # -- presets -------------------------------------------------------------------------------

    @staticmethod
    def _kv_order(kv_order: str) -> str:
        if kv_order not in ("NHD", "HND"):
            raise InvalidRequestError(f"kv_order must be 'NHD' or 'HND', got {kv_order!r}")
        return kv_order

    @classmethod
    def vllm_flash(cls, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_dim: int, dtype: Any = "float16", kv_order: str = "NHD") -> KVLayout:
        """vLLM FlashAttention: per layer ``(2, num_blocks, block_size, num_kv_heads, head_dim)``;
        ``kv_order="HND"`` stores heads outside tokens (stride order 0, 1, 3, 2, 4)."""
        order = "KBTHD" if cls._kv_order(kv_order) == "NHD" else "KBHTD"
        params = dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=normalize_dtype(dtype),
                      kv_order=kv_order)
        return cls._preset("vllm_flash", params, "KBTHD", order=order, num_layers=num_layers,
                           num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, dtype=dtype)

    @classmethod
    def vllm_flashinfer(cls, *, num_layers: int, num_blocks: int, block_size: int,
                        num_kv_heads: int, head_dim: int, dtype: Any = "float16",
                        kv_order: str = "NHD") -> KVLayout:
        """vLLM FlashInfer: per layer ``(num_blocks, 2, block_size, num_kv_heads, head_dim)``."""
        order = "BKTHD" if cls._kv_order(kv_order) == "NHD" else "BKHTD"
        params = dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=normalize_dtype(dtype),
                      kv_order=kv_order)
        return cls._preset("vllm_flashinfer", params, "BKTHD", order=order, num_layers=num_layers,
                           num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, dtype=dtype)

    @classmethod
    def vllm_cross_layer(cls, *, num_layers: int, num_blocks: int, block_size: int,
                         num_kv_heads: int, head_dim: int, dtype: Any = "float16",
                         kv_order: str = "NHD") -> KVLayout:
        """vLLM cross-layer blocks: one tensor
        ``(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)``; a block holds every
        layer, so a whole-model transfer moves one segment per run of blocks."""
        order = "BLKTHD" if cls._kv_order(kv_order) == "NHD" else "BLKHTD"
        params = dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=normalize_dtype(dtype),
                      kv_order=kv_order)
        return cls._preset("vllm_cross_layer", params, "BLKTHD", order=order,
                           num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)

    @classmethod
    def sglang_mha(cls, *, num_layers: int, num_tokens: int, page_size: int, num_kv_heads: int,
                   head_dim: int, dtype: Any = "float16") -> KVLayout:
        """SGLang MHA token pool: per layer a K and a V buffer ``(num_tokens, num_kv_heads,
        head_dim)``; block ids are page ids (page ``p`` holds tokens
        ``[p*page_size, (p+1)*page_size)``).
        Tensors are ordered all K buffers, then all V buffers (``k_buffer + v_buffer``)."""
        page_size = _positive("page_size", page_size)
        num_tokens = _positive("num_tokens", num_tokens)
        if num_tokens % page_size:
            raise InvalidRequestError(
                f"num_tokens={num_tokens} is not a multiple of page_size={page_size}")
        params = dict(num_layers=num_layers, num_tokens=num_tokens, page_size=page_size,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=normalize_dtype(dtype))
        return cls._preset("sglang_mha", params, "(BT)HD", num_layers=num_layers,
                           num_blocks=num_tokens // page_size, block_size=page_size,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)

    @classmethod
    def mla(cls, *, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int = 512,
            rope_dim: int = 64, dtype: Any = "bfloat16") -> KVLayout:
        """MLA (DeepSeek-style): per layer one latent ``(num_blocks, block_size,
        kv_lora_rank + rope_dim)``. No head dimension: tensor parallel ranks hold it whole."""
        params = dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                      kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, dtype=normalize_dtype(dtype))
        return cls._preset("mla", params, "BTD", kv_parts=1, num_layers=num_layers,
                           num_blocks=num_blocks, block_size=block_size, num_kv_heads=1,
                           head_dim=_positive("kv_lora_rank", kv_lora_rank)
                           + _positive("rope_dim", rope_dim), dtype=dtype)

    # -- geometry ------------------------------------------------------------------------------

    @property
    def num_tensors(self) -> int:
        """How many tensors a cache of this layout consists of."""
        return self._layer_tensors * self._part_tensors

    @property
    def _layer_tensors(self) -> int:
        return 1 if "L" in self._sizes else self.num_layers

    @property
    def _part_tensors(self) -> int:
        return 1 if ("K" in self._sizes or self.kv_parts == 1) else self.kv_parts

    @property
    def num_planes(self) -> int:
        """Planes = layers x K/V parts; plane ``layer * kv_parts + part``."""
        return self.num_layers * self.kv_parts

    @property
    def tensor_nbytes(self) -> int:
        """Bytes one tensor spans (its storage, for a strided view)."""
        return self._span * self.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors, packed one after another (the single-buffer form)."""
        return self.tensor_nbytes * self.num_tensors

    @property
    def head_bytes(self) -> int:
        return self.head_dim * self.itemsize

    def _stride_bytes(self, letter: str) -> int:
        return self._letter_strides.get(letter, 0) * self.itemsize

    @property
    def block_stride(self) -> int:
        """Bytes between consecutive blocks of a plane."""
        return self._stride_bytes("B")

    @property
    def token_stride(self) -> int:
        return self._stride_bytes("T")

    @property
    def head_stride(self) -> int:
        return self._stride_bytes("H")

    def tensor_index(self, layer: int, part: int) -> int:
        """Which tensor holds plane (layer, part). Separate K/V tensors are part-major."""
        li = 0 if "L" in self._sizes else layer
        pi = 0 if self._part_tensors == 1 else part
        return pi * self._layer_tensors + li

    def tensor_name(self, index: int) -> str:
        """A human name for tensor ``index`` ("layer 3", "layer 3 V", "all layers")."""
        pi, li = divmod(index, self._layer_tensors)
        name = "all layers" if "L" in self._sizes else f"layer {li}"
        if self._part_tensors > 1:
            name += " " + "KV"[pi]
        return name

    def plane_offsets(self) -> np.ndarray:
        """int64 [num_planes, 2]: (tensor index, byte offset of block 0 inside that tensor)."""
        out = np.empty((self.num_planes, 2), dtype=np.int64)
        sl, sk = self._stride_bytes("L"), self._stride_bytes("K")
        for layer in range(self.num_layers):
            for part in range(self.kv_parts):
                q = layer * self.kv_parts + part
                off = ((layer * sl if "L" in self._sizes else 0)
                       + (part * sk if "K" in self._sizes else 0))
                out[q] = (self.tensor_index(layer, part), off)
        return out

    def layer_planes(self, layers: Any = None) -> tuple[int, int]:
        """The plane range [begin, end) of a layer range (None: all; int; range; (begin, end))."""
        if layers is None:
            begin, end = 0, self.num_layers
        elif isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
            begin, end = int(layers), int(layers) + 1
        elif isinstance(layers, range):
            if layers.step != 1 and len(layers) > 1:
                raise InvalidRequestError(f"layer range {layers!r} must have step 1")
            begin, end = layers.start, layers.start + len(layers)
        else:
            try:
                begin, end = (int(v) for v in layers)
            except (TypeError, ValueError) as e:
                raise InvalidRequestError(
                    f"layers must be None, an int, a range or (begin, end), got {layers!r}") from e
        if not 0 <= begin <= end <= self.num_layers:
            raise InvalidRequestError(
                f"layers [{begin}, {end}) are outside the layout's {self.num_layers} layers")
        return begin * self.kv_parts, end * self.kv_parts

    # -- identity ------------------------------------------------------------------------------

    def _compat(self) -> dict[str, Any]:
        return {"format": _FORMAT, "dtype": self.dtype, "num_layers": self.num_layers,
                "kv_parts": self.kv_parts, "head_dim": self.head_dim}

    def fingerprint(self) -> str:
        """sha256 hex of what must match for a transfer between two layouts to be valid:
        dtype, number of layers, K/V parts (2) or latent (1), head_dim. Equal fingerprints <=>
        compatible layouts; block counts, block sizes, per-rank heads and memory order may differ
        (the planner maps between them)."""
        if self._fingerprint is None:
            canon = json.dumps(self._compat(), sort_keys=True, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(canon.encode()).hexdigest()
        return self._fingerprint

    def check_compatible(self, other: KVLayout) -> None:
        """Raises InvalidRequestError naming both layouts and what differs, unless a transfer
        between them is valid."""
        if self.fingerprint() == other.fingerprint():
            return
        a, b = self._compat(), other._compat()
        diffs = ", ".join(f"{k} {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k])
        raise InvalidRequestError(
            f"incompatible KV layouts: {self!r} (fingerprint {self.fingerprint()[:12]}) vs "
            f"{other!r} (fingerprint {other.fingerprint()[:12]}): {diffs}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description; KVLayout.from_dict(d) rebuilds an equal layout."""
        d = {"format": _FORMAT, "kind": self.kind, "dims": self.dims,
             "strides": list(self.tensor_strides), "dtype": self.dtype,
             "num_layers": self.num_layers, "num_blocks": self.num_blocks,
             "block_size": self.block_size, "num_kv_heads": self.num_kv_heads,
             "head_dim": self.head_dim, "kv_parts": self.kv_parts}
        if self._params:
            d["params"] = dict(self._params)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        """Rebuilds a layout from to_dict() output (which may come from a peer: every field is
        checked)."""
        if not isinstance(d, dict):
            raise InvalidRequestError(f"malformed layout description: {type(d).__name__}")
        try:
            if d.get("format") != _FORMAT:
                raise InvalidRequestError(f"layout format {d.get('format')!r} is not {_FORMAT}")
            layout = cls(str(d["dims"]), strides=[int(s) for s in d["strides"]], dtype=d["dtype"],
                         num_layers=d["num_layers"], num_blocks=d["num_blocks"],
                         block_size=d["block_size"], num_kv_heads=d["num_kv_heads"],
                         head_dim=d["head_dim"], kv_parts=d["kv_parts"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InvalidRequestError):
                raise
            raise InvalidRequestError(f"malformed layout description: {e!r}") from e
        kind, params = d.get("kind", "custom"), d.get("params") or {}
        if kind in _PRESETS and isinstance(params, dict) and all(
                isinstance(k, str) and isinstance(v, (int, str)) for k, v in params.items()):
            layout.kind, layout._params = kind, dict(params)
        return layout

    def _key(self) -> tuple:
        return (self.dims, self.tensor_strides, self.dtype, self.num_layers, self.num_blocks,
                self.block_size, self.num_kv_heads, self.head_dim, self.kv_parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KVLayout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        if self.kind != "custom" and self._params:
            args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
            return f"KVLayout.{self.kind}({args})"
        return (f"KVLayout({self.dims!r}, num_layers={self.num_layers}, "
                f"num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype!r}, kv_parts={self.kv_parts}, "
                f"strides={self.tensor_strides!r})")

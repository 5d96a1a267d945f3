"""A KV cache in memory (KVCache) and the description a peer needs to address it
(CacheDescriptor).

Buffers and planes
------------------
The transport moves bytes between one registered region on each side of a write, so a cache
describes itself as:

* **buffers** — the distinct memory ranges ``(address, nbytes)`` its tensors live in. Tensors that
  are views of one allocation (vLLM's CPU backend carves every layer out of one buffer; a
  single-buffer cache; numpy views of one array; torch tensors of one storage) share one buffer,
  the smallest range covering them; separate allocations (vLLM GPU per-layer tensors, SGLang's
  K and V buffers) are one buffer each.
* **planes** — for each (layer, K/V part), the buffer it lives in and the byte offset of its
  block 0 in that buffer. All planes share the layout's block/token/head strides.

The planner (:func:`kvtransfer.planner.plan_transfer`) takes two such descriptions and returns
segments grouped by (source buffer, destination buffer); a sender registers each buffer once
(``ep.register(cache.regions()[i])``) and issues one ``ep.write`` per group. Nothing loops over
blocks in Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidRequestError, ProtocolError
from .layout import ACCEPTED_TENSOR_DTYPES, NUMPY_STORAGE, KVLayout


@dataclass
class _Tensor:
    address: int
    shape: tuple[int, ...]
    strides: tuple[int, ...] | None  # elements; None when not expressible in elements
    dtype: str
    itemsize: int
    owner_key: Any  # tensors with equal keys are views of one allocation
    device: str
    c_contiguous: bool
    nbytes: int
    keep: Any = None  # a buffer export to hold (pins a bytearray against resizing)


def _root(obj: Any) -> Any:
    """The object at the end of a numpy array's .base chain (the owner of the memory)."""
    while True:
        base = getattr(obj, "base", None)
        if base is None:
            return obj
        obj = base


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _inspect(obj: Any, what: str) -> _Tensor:
    """Address, shape, strides, dtype and owner of a numpy array, torch tensor, buffer-protocol
    object or anything with __array_interface__ / __cuda_array_interface__."""
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size") and hasattr(obj, "stride"):
        shape = tuple(int(n) for n in obj.shape)
        strides = tuple(int(s) for s in obj.stride())
        storage = obj.untyped_storage()
        device = str(obj.device)
        return _Tensor(int(obj.data_ptr()), shape, strides, str(obj.dtype).removeprefix("torch."),
                       int(obj.element_size()), ("torch", device, int(storage.data_ptr())),
                       device, bool(obj.is_contiguous()), int(obj.numel() * obj.element_size()))
    iface = getattr(obj, "__cuda_array_interface__", None)
    device = "cuda"
    if iface is None and not isinstance(obj, np.ndarray):
        iface = getattr(obj, "__array_interface__", None)
        device = "cpu"
    if iface is not None:
        dt = np.dtype(iface["typestr"])
        shape = tuple(int(n) for n in iface["shape"])
        byte_strides = iface.get("strides")
        strides = (_contiguous_strides(shape) if byte_strides is None
                   else tuple(s // dt.itemsize for s in byte_strides))
        if byte_strides is not None and any(s % dt.itemsize for s in byte_strides):
            strides = None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        return _Tensor(int(iface["data"][0]), shape, strides, dt.name, dt.itemsize,
                       ("iface", id(obj)), device, strides == _contiguous_strides(shape), nbytes)
    if not isinstance(obj, np.ndarray):
        try:
            obj = np.frombuffer(obj, dtype=np.uint8)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(
                f"{what}: cannot read the memory of a {type(obj).__name__}: pass numpy arrays, "
                "torch tensors, or objects with __array_interface__") from e
    isz = obj.dtype.itemsize
    strides = None if any(s % isz for s in obj.strides) else tuple(s // isz for s in obj.strides)
    return _Tensor(int(obj.__array_interface__["data"][0]), tuple(obj.shape), strides,
                   obj.dtype.name, isz, ("numpy", id(_root(obj))), "cpu",
                   bool(obj.flags.c_contiguous), int(obj.nbytes), keep=obj)


def _strides_match(shape: tuple[int, ...], got: tuple[int, ...] | None,
                   want: tuple[int, ...]) -> bool:
    if got is None:
        return False
    return all(n == 1 or g == w for n, g, w in zip(shape, got, want, strict=True))


def _flatten(tensors: Any) -> list[Any]:
    items = list(tensors)
    if items and all(isinstance(t, (list, tuple)) for t in items):
        return [t for group in items for t in group]
    return items


class KVCache:
    """A paged KV cache: a KVLayout plus the tensors that hold it, validated against it.

    ``tensors`` is one of

    * the layout's tensors in order (``layout.num_tensors``: one per layer for vLLM's per-layer
      layouts and MLA, one for the cross-layer layout; for SGLang all K buffers then all V
      buffers, or the pair ``(k_buffers, v_buffers)``);
    * one contiguous buffer of ``layout.nbytes`` bytes holding those tensors back to back
      (any dtype: numpy array, bytearray, torch tensor).

    Tensors may be numpy arrays (bfloat16 / float8 as uint16 / uint8 views), torch tensors (CPU
    or GPU), or any object with ``__array_interface__`` / ``__cuda_array_interface__``. Each must
    have the layout's shape, dtype and exact strides; the error names the tensor and what differs.
    The cache keeps references to the tensors, so the memory stays valid while it lives.
    """

    def __init__(self, layout: KVLayout, tensors: Any):
        if not isinstance(layout, KVLayout):
            raise InvalidRequestError(f"layout must be a KVLayout, got {type(layout).__name__}")
        self.layout = layout
        if isinstance(tensors, (list, tuple)):
            items = _flatten(tensors)
            self.tensors = tuple(items)
            self._init_tensors(items)
        else:
            self.tensors = (tensors,)
            info = _inspect(tensors, "KVCache buffer")
            if layout.num_tensors == 1 and info.shape == layout.tensor_shape:
                self._init_tensors([tensors])
            else:
                self._init_flat(info)
        self._descriptor: CacheDescriptor | None = None

    # -- construction --------------------------------------------------------------------------

    def _init_flat(self, info: _Tensor) -> None:
        layout = self.layout
        if not info.c_contiguous or info.nbytes != layout.nbytes:
            raise InvalidRequestError(
                f"KVCache: {layout!r} expects {layout.num_tensors} tensor(s) of shape "
                f"{layout.tensor_shape} or one contiguous buffer of {layout.nbytes} bytes; got one "
                f"{'contiguous' if info.c_contiguous else 'non-contiguous'} object of shape "
                f"{info.shape} ({info.nbytes} bytes)")
        self._buffers = [(info.address, info.nbytes)]
        self._keep = info.keep
        self.device = info.device
        planes = layout.plane_offsets()
        planes[:, 1] += planes[:, 0] * layout.tensor_nbytes
        planes[:, 0] = 0
        self._planes = planes

    def _init_tensors(self, items: list[Any]) -> None:
        layout = self.layout
        if len(items) != layout.num_tensors:
            raise InvalidRequestError(
                f"KVCache: {layout!r} has {layout.num_tensors} tensor(s) "
                f"({self._tensor_names()}), got {len(items)}")
        accepted = ACCEPTED_TENSOR_DTYPES[layout.dtype]
        infos = []
        for i, t in enumerate(items):
            what = f"KVCache tensor {i} ({layout.tensor_name(i)}) of {layout!r}"
            info = _inspect(t, what)
            if info.shape != layout.tensor_shape:
                raise InvalidRequestError(
                    f"{what}: shape {info.shape} != expected {layout.tensor_shape}")
            if info.dtype not in accepted or info.itemsize != layout.itemsize:
                raise InvalidRequestError(
                    f"{what}: dtype {info.dtype} does not hold {layout.dtype} (accepted: "
                    f"{', '.join(sorted(accepted))})")
            if not _strides_match(info.shape, info.strides, layout.tensor_strides):
                raise InvalidRequestError(
                    f"{what}: strides {info.strides} (elements) != expected "
                    f"{layout.tensor_strides}: the tensor is not laid out as the layout says "
                    "(a non-contiguous slice, or a different memory order)")
            infos.append(info)
        devices = {i.device for i in infos}
        if len(devices) != 1:
            raise InvalidRequestError(f"KVCache: tensors are on several devices: {sorted(devices)}")
        self.device = devices.pop()
        # One buffer per allocation: the smallest range covering that allocation's tensors.
        keys: dict[Any, int] = {}
        spans: list[list[int]] = []
        for info in infos:
            end = info.address + layout.tensor_nbytes
            k = keys.setdefault(info.owner_key, len(spans))
            if k == len(spans):
                spans.append([info.address, end])
            else:
                spans[k][0] = min(spans[k][0], info.address)
                spans[k][1] = max(spans[k][1], end)
        self._buffers = [(lo, hi - lo) for lo, hi in spans]
        planes = layout.plane_offsets()
        for q in range(len(planes)):
            info = infos[planes[q, 0]]
            b = keys[info.owner_key]
            planes[q] = (b, info.address - spans[b][0] + planes[q, 1])
        self._planes = planes

    def _tensor_names(self) -> str:
        n = self.layout.num_tensors
        names = [self.layout.tensor_name(i) for i in range(min(n, 4))]
        return ", ".join(names) + (", ..." if n > 4 else "")

    @classmethod
    def allocate(cls, layout: KVLayout, fill: int | None = 0) -> KVCache:
        """A numpy-backed cache of this layout in one allocation (bfloat16/float8 as
        uint16/uint8). ``fill``: byte value to fill with, or None to leave it uninitialised."""
        buf = np.empty(layout.nbytes, dtype=np.uint8)
        if fill is not None:
            buf.fill(fill)
        dtype = np.dtype(NUMPY_STORAGE[layout.dtype])
        strides = tuple(s * layout.itemsize for s in layout.tensor_strides)
        views = [np.ndarray(layout.tensor_shape, dtype=dtype, buffer=buf,
                            offset=i * layout.tensor_nbytes, strides=strides)
                 for i in range(layout.num_tensors)]
        return cls(layout, views)

    # -- description ---------------------------------------------------------------------------

    def regions(self) -> list[tuple[int, int]]:
        """The memory to register: (address, nbytes) per buffer; buffer i = list index i."""
        return list(self._buffers)

    @property
    def planes(self) -> np.ndarray:
        """int64 [num_planes, 2]: (buffer index, byte offset of block 0) per (layer, part)."""
        return self._planes.copy()

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self._buffers)

    def descriptor(self) -> CacheDescriptor:
        """What a peer needs to plan transfers into or out of this cache (no addresses)."""
        if self._descriptor is None:
            self._descriptor = CacheDescriptor(self.layout, tuple(n for _, n in self._buffers),
                                               self._planes.copy())
        return self._descriptor

    def buffer_view(self, index: int) -> np.ndarray:
        """A uint8 numpy view of buffer ``index`` (host memory only; for tests and tools)."""
        if self.device != "cpu":
            raise InvalidRequestError(f"buffer {index} is on {self.device}, not host memory")
        import ctypes

        addr, n = self._buffers[index]
        return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))

    def __repr__(self) -> str:
        return (f"KVCache({self.layout!r}, {len(self._buffers)} buffer(s), {self.nbytes} bytes, "
                f"{self.device})")


class CacheDescriptor:
    """A cache's geometry without its memory: layout, buffer sizes and plane table. Travels to the
    peer (``to_bytes``/``from_bytes``, JSON) so either side can plan a transfer."""

    def __init__(self, layout: KVLayout, buffer_nbytes: tuple[int, ...], planes: np.ndarray):
        self.layout = layout
        self.buffer_nbytes = tuple(int(n) for n in buffer_nbytes)
        planes = np.ascontiguousarray(planes, dtype=np.int64)
        if planes.shape != (layout.num_planes, 2):
            raise InvalidRequestError(
                f"plane table has shape {planes.shape}, expected ({layout.num_planes}, 2)")
        self.planes = planes
        self.planes.flags.writeable = False
        self._plane_set: Any = None

    def plane_set(self) -> Any:
        """The validated C++ description (kvtransfer._core.PlaneSet), built once."""
        if self._plane_set is None:
            from . import _core

            lay = self.layout
            self._plane_set = _core.PlaneSet(
                num_blocks=lay.num_blocks, block_size=lay.block_size, num_heads=lay.num_kv_heads,
                head_bytes=lay.head_bytes, block_stride=lay.block_stride,
                token_stride=lay.token_stride, head_stride=lay.head_stride, planes=self.planes,
                buffer_nbytes=np.asarray(self.buffer_nbytes, dtype=np.int64))
        return self._plane_set

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout.to_dict(), "buffers": list(self.buffer_nbytes),
                "planes": self.planes.ravel().tolist()}

    @classmethod
    def from_dict(cls, d: Any) -> CacheDescriptor:
        if not isinstance(d, dict):
            raise InvalidRequestError(f"malformed cache descriptor: {type(d).__name__}")
        try:
            layout = KVLayout.from_dict(d["layout"])
            planes = np.asarray(d["planes"], dtype=np.int64).reshape(-1, 2)
            desc = cls(layout, tuple(int(n) for n in d["buffers"]), planes)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InvalidRequestError):
                raise
            raise InvalidRequestError(f"malformed cache descriptor: {e!r}") from e
        desc.plane_set()  # bounds-checks every plane against its buffer
        return desc

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CacheDescriptor:
        """Parses to_bytes() output from a peer; ProtocolError if it is not JSON at all,
        InvalidRequestError if the description is inconsistent."""
        try:
            d = json.loads(bytes(data).decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"cache descriptor is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CacheDescriptor) and self.layout == other.layout
                and self.buffer_nbytes == other.buffer_nbytes
                and np.array_equal(self.planes, other.planes))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CacheDescriptor({self.layout!r}, buffers={list(self.buffer_nbytes)})"

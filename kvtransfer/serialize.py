"""KV-cache blocks to a file or buffer and back: offload to disk or host memory, restore into
another cache (docs/wire-format.md, "KV file").

The format is self-describing -- a header with the block geometry (dtype, layers, K/V parts,
block size, heads, head_dim), the source layout and its fingerprint, then one record per block
with its own crc32c and optional float32 quantization scales. Blocks are stored in a canonical
order (plane by plane, then token, head, element), so a file restores into any cache with the
same block geometry whatever its memory order (NHD or HND, per-layer tensors or one buffer,
vLLM or SGLang) and block count. It streams: a multi-GB cache is written and read through a
bounded staging buffer (``chunk_bytes``), never copied whole; a writable buffer or a bytes-like
source is used in place, without staging at all.

All header and record bytes are encoded and checked by the C++ codec (``_core``); this module
only moves block data between the cache and the records.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from .cache import KVCache
from .errors import InvalidRequestError, ProtocolError
from .layout import KVLayout

__all__ = ["KVFileInfo", "deserialize_blocks", "read_header", "serialize_blocks",
           "serialized_nbytes"]

DEFAULT_CHUNK_BYTES = 16 << 20
_FLAG_SCALES = 1
_PRE = _core.KV_PREAMBLE_BYTES
_REC_HDR = _core.KV_RECORD_HEADER_BYTES
_REC_END = _core.KV_RECORD_TRAILER_BYTES
_GEOMETRY = ("dtype", "num_layers", "kv_parts", "block_size", "num_kv_heads", "head_dim")


@dataclass
class KVFileInfo:
    """What a KV file holds: its header fields, and after ``deserialize_blocks`` the source
    block id and scales of every record (in file order)."""

    version: int
    dtype: str
    num_layers: int
    kv_parts: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    block_bytes: int
    num_blocks: int
    scale_count: int
    fingerprint: str
    layout: dict[str, Any] | None  # the source KVLayout.to_dict(), if readable
    header_bytes: int
    record_bytes: int
    source_blocks: np.ndarray | None = None  # int64 [num_blocks]
    scales: np.ndarray | None = None          # float32 [num_blocks, scale_count]

    @property
    def nbytes(self) -> int:
        """Size of the whole file."""
        return self.header_bytes + self.num_blocks * self.record_bytes

    def describe(self) -> str:
        """The source layout as a human reads it."""
        if self.layout is not None:
            try:
                return repr(KVLayout.from_dict(self.layout))
            except InvalidRequestError:
                pass
        return ("KV blocks of " + ", ".join(f"{k}={getattr(self, k)!r}" for k in _GEOMETRY))


# -- geometry ------------------------------------------------------------------------------------

class _Blocks:
    """Strided uint8 views of a host cache's planes, to copy whole blocks in the file's
    canonical order [plane, token, head, head_bytes] without touching other blocks."""

    def __init__(self, cache: KVCache, what: str):
        if not isinstance(cache, KVCache):
            raise InvalidRequestError(
                f"{what}: cache must be a KVCache, got {type(cache).__name__}")
        if cache.device != "cpu":
            raise InvalidRequestError(
                f"{what}: the cache is on {cache.device}; serialize_blocks/deserialize_blocks read "
                "and write host memory only (copy the blocks to a host cache first)")
        lay = cache.layout
        self.layout = lay
        self.shape = (lay.num_planes, lay.block_size, lay.num_kv_heads, lay.head_bytes)
        self.block_bytes = int(np.prod(self.shape))
        buffers = [cache.buffer_view(i) for i in range(len(cache.regions()))]
        strides = (lay.block_stride, lay.token_stride, lay.head_stride, 1)
        self.planes = [
            np.ndarray((lay.num_blocks, *self.shape[1:]), dtype=np.uint8, buffer=buffers[b],
                       offset=int(off), strides=strides)
            for b, off in cache.planes.tolist()]

    def gather(self, block: int, out: np.ndarray) -> None:
        rec = out.reshape(self.shape)
        for q, plane in enumerate(self.planes):
            rec[q] = plane[block]

    def scatter(self, block: int, data: np.ndarray) -> None:
        rec = data.reshape(self.shape)
        for q, plane in enumerate(self.planes):
            plane[block] = rec[q]


def _header_fields(layout: KVLayout, num_blocks: int, scale_count: int) -> dict[str, Any]:
    return {
        "flags": _FLAG_SCALES if scale_count else 0, "dtype": layout.dtype,
        "itemsize": layout.itemsize, "num_layers": layout.num_layers,
        "kv_parts": layout.kv_parts, "block_size": layout.block_size,
        "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
        "block_bytes": layout.num_planes * layout.block_size * layout.num_kv_heads
        * layout.head_bytes,
        "num_blocks": num_blocks, "scale_count": scale_count,
        "fingerprint": layout.fingerprint(),
        "layout": json.dumps(layout.to_dict(), separators=(",", ":")),
    }


def _block_ids(ids: Any, num_blocks: int, name: str) -> np.ndarray:
    try:
        arr = np.asarray(ids)
        if arr.dtype == np.bool_ or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(arr.dtype)
        arr = arr.astype(np.int64, copy=False).reshape(-1)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(
            f"{name} must be a sequence of integer block ids, got {ids!r}") from e
    bad = (arr < 0) | (arr >= num_blocks)
    if bad.any():
        raise InvalidRequestError(f"{name}: block {int(arr[bad][0])} is outside the cache's "
                                  f"{num_blocks} blocks")
    return arr


def _scales(scales: Any, n: int) -> np.ndarray | None:
    if scales is None:
        return None
    arr = np.asarray(scales, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[0] != n or not 0 < arr.shape[1] <= 65536:
        raise InvalidRequestError(
            f"scales must be float32 [num_blocks] or [num_blocks, S] with num_blocks={n} and "
            f"1 <= S <= 65536, got shape {np.shape(scales)}")
    return np.ascontiguousarray(arr, dtype="<f4")


def serialized_nbytes(cache_or_layout: KVCache | KVLayout, num_blocks: int, *,
                      scale_count: int = 0) -> int:
    """Bytes ``serialize_blocks`` writes for ``num_blocks`` blocks (to size a buffer)."""
    layout = cache_or_layout.layout if isinstance(cache_or_layout, KVCache) else cache_or_layout
    header = _core.encode_kv_header(_header_fields(layout, int(num_blocks), int(scale_count)))
    fields = _core.decode_kv_header(header)
    return len(header) + int(num_blocks) * fields["record_bytes"]


# -- writing -------------------------------------------------------------------------------------

def _memoryview(obj: Any) -> memoryview | None:
    """A memoryview of a bytes-like object (an mmap included); None for paths and files."""
    if isinstance(obj, (str, os.PathLike, io.IOBase)):
        return None
    try:
        return memoryview(obj)
    except TypeError:
        return None


def _writable_buffer(obj: Any) -> np.ndarray | None:
    """A uint8 view of a writable bytes-like object, or None for a file-like or path."""
    mv = _memoryview(obj)
    if mv is None:
        if isinstance(obj, (str, os.PathLike)) or hasattr(obj, "write"):
            return None
        raise InvalidRequestError(
            f"file_or_buffer must be a path, a binary file object or a writable buffer, got "
            f"{type(obj).__name__}")
    if mv.readonly:
        raise InvalidRequestError(f"cannot serialize into a read-only {type(obj).__name__}: pass "
                                  "a bytearray, a writable numpy array or a file")
    if not mv.c_contiguous:
        raise InvalidRequestError("cannot serialize into a non-contiguous buffer")
    return np.frombuffer(mv.cast("B"), dtype=np.uint8)


def _write_all(f: Any, data: memoryview) -> None:
    while len(data):
        n = f.write(data)
        if n is None:
            raise InvalidRequestError(
                "the file is non-blocking and would block; pass a blocking file")
        if n >= len(data):
            return
        data = data[n:]


def serialize_blocks(cache: KVCache, block_ids: Any, file_or_buffer: Any, *,
                     scales: Any = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Writes blocks ``block_ids`` of a host-memory ``cache`` to ``file_or_buffer``: a path, a
    binary file object (anything with ``write``), or a writable buffer (bytearray, numpy array,
    writable memoryview) at least ``serialized_nbytes(cache, len(block_ids))`` bytes long.

    ``scales``: optional float32 per-block quantization scales, ``[n]`` or ``[n, S]``, stored
    with each block and returned by ``deserialize_blocks``. Memory used beyond the cache: one
    staging chunk of about ``chunk_bytes`` (none when writing into a buffer). Returns the
    number of bytes written.
    """
    blocks = _Blocks(cache, "serialize_blocks")
    ids = _block_ids(block_ids, cache.layout.num_blocks, "serialize_blocks: block_ids")
    sc = _scales(scales, len(ids))
    scale_count = 0 if sc is None else sc.shape[1]
    header = _core.encode_kv_header(_header_fields(cache.layout, len(ids), scale_count))
    rec_bytes = _REC_HDR + 4 * scale_count + blocks.block_bytes + _REC_END
    total = len(header) + len(ids) * rec_bytes

    def fill(rec: np.ndarray, i: int) -> None:
        if sc is not None:
            rec[_REC_HDR:_REC_HDR + 4 * scale_count] = sc[i].view(np.uint8)
        blocks.gather(int(ids[i]), rec[_REC_HDR + 4 * scale_count:rec_bytes - _REC_END])
        _core.seal_kv_record(rec, i, int(ids[i]))

    out = _writable_buffer(file_or_buffer)
    if out is not None:
        if len(out) < total:
            raise InvalidRequestError(f"serialize_blocks: the buffer holds {len(out)} bytes, "
                                      f"{total} are needed for {len(ids)} blocks")
        out[:len(header)] = np.frombuffer(header, dtype=np.uint8)
        for i in range(len(ids)):
            at = len(header) + i * rec_bytes
            fill(out[at:at + rec_bytes], i)
        return total

    own = isinstance(file_or_buffer, (str, os.PathLike))
    f = open(file_or_buffer, "wb") if own else file_or_buffer  # noqa: SIM115 - closed below
    try:
        _write_all(f, memoryview(header))
        per_chunk = max(1, int(chunk_bytes) // rec_bytes)
        stage = np.empty(min(per_chunk, max(1, len(ids))) * rec_bytes, dtype=np.uint8)
        for start in range(0, len(ids), per_chunk):
            k = min(per_chunk, len(ids) - start)
            for j in range(k):
                fill(stage[j * rec_bytes:(j + 1) * rec_bytes], start + j)
            _write_all(f, memoryview(stage[:k * rec_bytes]))
    finally:
        if own:
            f.close()
    return total


# -- reading -------------------------------------------------------------------------------------

class _Source:
    """Sequential reads from a path, a file object or a bytes-like object (zero-copy views)."""

    def __init__(self, obj: Any):
        self._own = None
        self._buf: np.ndarray | None = None
        self._pos = 0
        mv = _memoryview(obj)
        if mv is not None:
            if not mv.c_contiguous:
                raise InvalidRequestError("cannot read a KV file from a non-contiguous buffer")
            self._buf = np.frombuffer(mv.cast("B"), dtype=np.uint8)
        elif isinstance(obj, (str, os.PathLike)):
            self._own = self._f = open(obj, "rb")  # noqa: SIM115 - closed by close()
        elif hasattr(obj, "readinto") or hasattr(obj, "read"):
            self._f = obj
        else:
            raise InvalidRequestError(
                f"file_or_buffer must be a path, a binary file object or a bytes-like object, "
                f"got {type(obj).__name__}")

    def read(self, n: int, stage: np.ndarray | None = None) -> np.ndarray:
        """The next n bytes (a view of the source, or of `stage`); fewer at end of input."""
        if self._buf is not None:
            out = self._buf[self._pos:self._pos + n]
            self._pos += len(out)
            return out
        dst = stage[:n] if stage is not None else np.empty(n, dtype=np.uint8)
        got = 0
        readinto = getattr(self._f, "readinto", None)
        while got < n:
            if readinto is not None:
                r = readinto(memoryview(dst[got:]))
            else:
                chunk = self._f.read(n - got)
                r = len(chunk) if chunk else 0
                if r:
                    dst[got:got + r] = np.frombuffer(chunk, dtype=np.uint8)
            if not r:
                break
            got += r
        return dst[:got]

    def close(self) -> None:
        if self._own is not None:
            self._own.close()


def _read_header(src: _Source) -> KVFileInfo:
    pre = src.read(_PRE)
    if len(pre) < _PRE:
        raise ProtocolError(f"not a kvtransfer KV file: {len(pre)} bytes, shorter than its header")
    total = _core.kv_header_length(pre)
    rest = src.read(total - _PRE)
    raw = np.concatenate([pre, rest]) if len(rest) else pre
    d = _core.decode_kv_header(raw)
    try:  # informational: a file that passed its crc may still hold anything here
        layout = json.loads(d["layout"].decode())
        layout = layout if isinstance(layout, dict) else None
    except ValueError:
        layout = None
    return KVFileInfo(
        version=d["version"], dtype=d["dtype"].decode(errors="replace"),
        num_layers=d["num_layers"], kv_parts=d["kv_parts"], block_size=d["block_size"],
        num_kv_heads=d["num_kv_heads"], head_dim=d["head_dim"], block_bytes=d["block_bytes"],
        num_blocks=d["num_blocks"], scale_count=d["scale_count"],
        fingerprint=d["fingerprint"].decode(errors="replace"), layout=layout,
        header_bytes=d["header_bytes"], record_bytes=d["record_bytes"])


def read_header(file_or_buffer: Any) -> KVFileInfo:
    """The header of a KV file (geometry, block count, source layout) without reading blocks.
    A file object is left positioned after the header."""
    src = _Source(file_or_buffer)
    try:
        return _read_header(src)
    finally:
        src.close()


def _check_geometry(info: KVFileInfo, layout: KVLayout) -> None:
    diffs = [f"{k} {getattr(info, k)!r} != {getattr(layout, k)!r}" for k in _GEOMETRY
             if getattr(info, k) != getattr(layout, k)]
    if diffs:
        raise InvalidRequestError(
            f"deserialize_blocks: the file holds blocks of {info.describe()} but the destination "
            f"cache is {layout!r}: {', '.join(diffs)}")


def deserialize_blocks(cache: KVCache, dst_block_ids: Any, file_or_buffer: Any, *,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> KVFileInfo:
    """Reads a KV file written by ``serialize_blocks`` into blocks ``dst_block_ids`` of a
    host-memory ``cache`` (record i lands in ``dst_block_ids[i]``; None: in the block ids the
    file was written from). ``file_or_buffer``: a path, a binary file object or a bytes-like
    object (read in place).

    Raises InvalidRequestError naming both layouts when the file's block geometry differs from
    the cache's, or when the ids do not fit; ProtocolError for a malformed or corrupted file
    (naming the record and its destination block). Each record is verified before it is
    copied, so a corrupted block never lands; records before it have been restored. Returns
    the file's :class:`KVFileInfo` with ``source_blocks`` and ``scales`` filled in.
    """
    blocks = _Blocks(cache, "deserialize_blocks")
    src = _Source(file_or_buffer)
    try:
        info = _read_header(src)
        _check_geometry(info, cache.layout)
        n = info.num_blocks
        if dst_block_ids is None:
            dst = None
        else:
            dst = _block_ids(dst_block_ids, cache.layout.num_blocks,
                             "deserialize_blocks: dst_block_ids")
            if len(dst) != n:
                raise InvalidRequestError(
                    f"deserialize_blocks: the file holds {n} blocks, dst_block_ids has {len(dst)}")
            if len(np.unique(dst)) != len(dst):
                raise InvalidRequestError("deserialize_blocks: dst_block_ids has duplicates")
        rec_bytes = info.record_bytes  # from a header that matched this cache: bounded by it
        sc_bytes = 4 * info.scale_count
        info.source_blocks = np.empty(n, dtype=np.int64)
        info.scales = np.empty((n, info.scale_count), dtype="<f4") if info.scale_count else None
        per_chunk = max(1, int(chunk_bytes) // rec_bytes)
        stage = (None if src._buf is not None
                 else np.empty(min(per_chunk, max(1, n)) * rec_bytes, dtype=np.uint8))
        for start in range(0, n, per_chunk):
            k = min(per_chunk, n - start)
            chunk = src.read(k * rec_bytes, stage)
            for j in range(k):
                i = start + j
                target = f"destination block {int(dst[i])}" if dst is not None else "its block"
                rec = chunk[j * rec_bytes:(j + 1) * rec_bytes]
                if len(rec) < rec_bytes:
                    raise ProtocolError(
                        f"deserialize_blocks: KV file truncated in record {i} of {n} (for "
                        f"{target}): {len(rec)} of {rec_bytes} bytes")
                try:
                    source = _core.open_kv_record(rec, i)
                except ProtocolError as e:
                    raise ProtocolError(f"deserialize_blocks: {e}, in the record for {target}; "
                                        "that block was left untouched") from None
                if dst is None and not 0 <= source < cache.layout.num_blocks:
                    raise InvalidRequestError(
                        f"deserialize_blocks: record {i} is source block {source}, outside the "
                        f"cache's {cache.layout.num_blocks} blocks; pass dst_block_ids")
                info.source_blocks[i] = source
                if info.scales is not None:
                    info.scales[i] = rec[_REC_HDR:_REC_HDR + sc_bytes].view("<f4")
                blocks.scatter(int(dst[i]) if dst is not None else source,
                               rec[_REC_HDR + sc_bytes:rec_bytes - _REC_END])
        return info
    finally:
        src.close()

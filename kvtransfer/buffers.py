"""Turns what users register (numpy arrays, bytearray, memoryview, torch tensors, or a raw
``(address, nbytes)``) into an address and a size, keeping the owner alive."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidRequestError


def buffer_address(buf: Any) -> tuple[int, int, Any, bool]:
    """Returns (address, nbytes, owner, writeable); the owner must stay referenced while the
    memory is registered."""
    if isinstance(buf, tuple) and len(buf) == 2 and all(isinstance(v, int) for v in buf):
        addr, nbytes = buf
        if addr <= 0 or nbytes < 0:
            raise InvalidRequestError(f"(address, nbytes) = {buf!r} is not a valid memory range")
        return addr, nbytes, None, True
    if hasattr(buf, "data_ptr") and hasattr(buf, "element_size"):  # torch.Tensor, lazily
        if not buf.is_contiguous():
            raise InvalidRequestError(
                "cannot register a non-contiguous tensor: call .contiguous() first, or register "
                "the tensor it is a view of")
        if getattr(buf, "device", None) is not None and buf.device.type != "cpu":
            raise InvalidRequestError(
                f"tensor is on {buf.device}; this build registers host memory only")
        return int(buf.data_ptr()), int(buf.numel() * buf.element_size()), buf, True
    if isinstance(buf, np.ndarray):
        arr = buf
    else:
        try:
            arr = np.frombuffer(buf, dtype=np.uint8)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(
                f"cannot register {type(buf).__name__}: pass a numpy array, bytearray, "
                "memoryview, torch tensor or (address, nbytes)") from e
    if not arr.flags.c_contiguous:
        raise InvalidRequestError(
            "cannot register a non-contiguous array: use np.ascontiguousarray")
    address = int(arr.__array_interface__["data"][0])
    return address, int(arr.nbytes), buf, bool(arr.flags.writeable)

"""Host-side helpers every launcher shares: fresh tensors, parameter words, broadcast strides, dim coalescing.

They speak handles and plain numbers; ATen argument conventions live in `ops.py`, WGSL text in the family
modules. Nothing here reads tensor data back: all values are computed on the device.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch

from tapml.backends.webgpu.runtime import I32_MAX, I32_MIN, Runtime, WGTensor, contiguous_strides
from tapml.errors import TapmlError


def new(rt: Runtime, shape: Sequence[int], dtype: torch.dtype) -> WGTensor:
    """A fresh contiguous tensor (uninitialized)."""
    shape = tuple(int(n) for n in shape)
    info = rt.dtypes[dtype]
    storage = rt.alloc(max(math.prod(shape), 1) * info.size)
    return WGTensor(storage, shape, contiguous_strides(shape), 0, dtype)


def word(x: float | bool, ct: str) -> int:
    """One parameter word: a float's f32 bits or a checked int32."""
    if ct == "f32":
        v = float(x)
        if math.isfinite(v) and abs(v) > 3.4028234663852886e38:
            v = math.copysign(math.inf, v)
        return struct.unpack("<i", struct.pack("<f", v))[0]
    v = int(x)
    if not I32_MIN <= v <= I32_MAX:
        raise TapmlError(f"webgpu: scalar {x} does not fit the int32 that int64 values are computed in")
    return v


def words(x: float | bool, ct: str) -> list[int]:
    """The parameter words of a scalar: two (low, high) for i64, else one."""
    if ct == "i64":
        v = int(x)
        if not -(2**63) <= v < 2**63:
            raise TapmlError(f"webgpu: scalar {x} does not fit int64")
        lo, hi = struct.unpack("<ii", struct.pack("<q", v))
        return [lo, hi]
    return [word(x, ct)]


def native_ct(rt: Runtime, ct: str) -> str:
    """Compute types are logical (i64 for int64); on a device without 64-bit integers i64 runs as i32."""
    return "i32" if ct == "i64" and not rt.int64_native else ct


def fbits(x: float) -> int:
    return word(x, "f32")


def bcast_strides(t: WGTensor, shape: Sequence[int]) -> list[int]:
    """`t`'s strides broadcast to `shape` (right-aligned; expanded dims get stride 0)."""
    nd, td = len(shape), t.dim()
    out = [0] * nd
    for i in range(td):
        n, s = t.shape[td - 1 - i], t.stride[td - 1 - i]
        out[nd - 1 - i] = 0 if n == 1 else s
    return out


def coalesce(shape: Sequence[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dims and merge neighbours that are contiguous for every operand (at least one dim left)."""
    keep = [d for d, n in enumerate(shape) if n != 1]
    out_shape: list[int] = []
    out_strides: list[list[int]] = [[] for _ in strides]
    for d in keep:
        n = shape[d]
        if out_shape and all(ss[-1] == s[d] * n for ss, s in zip(out_strides, strides)):
            out_shape[-1] *= n
            for ss, s in zip(out_strides, strides):
                ss[-1] = s[d]
            continue
        out_shape.append(n)
        for ss, s in zip(out_strides, strides):
            ss.append(s[d])
    if not out_shape:
        return [1], [[0] for _ in strides]
    return out_shape, out_strides


MAXD = 8

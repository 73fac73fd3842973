"""The ATen op table of the WebGPU backend: overload name -> handler (and the check behind `supports`).

Handlers take ATen arguments with WGTensor handles in place of tensors and return handles; they do
metadata work (shapes, dtypes, views) and scalar packing on the host and leave every value to a kernel.
They must not call torch on data. Families live in `pointwise.py`, `bits.py`, `structured.py` and
`selection.py`; all register here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.backends.webgpu.runtime import I32_MAX, I32_MIN, WGTensor, dtype_reason
from tapml.ops import OpCall, resolve_op


@dataclass
class Handler:
    fn: Callable[..., Any]
    check: Callable[[OpCall], str | None] | None = None
    view: bool = False  # metadata-only: integer arguments are sizes/indices, not values


OPS: dict[str, Handler] = {}


def register(*names: str, check: Callable[[OpCall], str | None] | None = None, view: bool = False):
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for n in names:
            OPS[n] = Handler(fn, check, view)
        return fn
    return deco


def handler(name: str) -> Handler | None:
    return OPS.get(name)


# --- shared helpers ----------------------------------------------------------------------------------------

def is_t(x: Any) -> bool:
    return isinstance(x, WGTensor)


def opmath(dt: torch.dtype) -> str:
    """Compute type of arithmetic in `dt`: f32 for floating dtypes, i64 for int64 (the launchers run it as
    i32 on devices without 64-bit integers), i32 for other integers and bool."""
    return "f32" if dt.is_floating_point else ("i64" if dt == torch.int64 else "i32")


_META: dict[tuple[torch.dtype, bool], torch.Tensor] = {}


def _meta_of(dt: torch.dtype, has_dims: bool) -> torch.Tensor:
    t = _META.get((dt, has_dims))
    if t is None:
        t = _META[(dt, has_dims)] = torch.empty((1,) if has_dims else (), dtype=dt, device="meta")
    return t


_PROMOTED: dict[tuple, torch.dtype] = {}


def result_type(*xs: Any) -> torch.dtype:
    """torch's type promotion over handles and Python scalars (categories; 0-dim vs n-dim tensors)."""
    key = tuple((x.dtype, x.dim() > 0) if type(x) is WGTensor else type(x) for x in xs)
    got = _PROMOTED.get(key)
    if got is None:
        got = _PROMOTED[key] = _result_type(*xs)
    return got


def _result_type(*xs: Any) -> torch.dtype:
    tens = [_meta_of(x.dtype, x.dim() > 0) for x in xs if is_t(x)]
    rest = [x for x in xs if x is not None and not is_t(x)]
    acc = tens[0]
    for m in tens[1:] + rest:
        dt = torch.result_type(acc, m)
        acc = _meta_of(dt, acc.dim() > 0 or (isinstance(m, torch.Tensor) and m.dim() > 0))
    return acc.dtype


def float_dtype(dt: torch.dtype) -> torch.dtype:
    return dt if dt.is_floating_point else torch.get_default_dtype()


def broadcast(*shapes: Sequence[int]) -> tuple[int, ...]:
    first = shapes[0]
    if all(s == first for s in shapes):
        return tuple(first)
    nd = max((len(s) for s in shapes), default=0)
    out = [1] * nd
    for s in shapes:
        for i, n in enumerate(s):
            j = nd - len(s) + i
            if n != 1:
                if out[j] not in (1, n):
                    raise RuntimeError(f"shapes {[list(x) for x in shapes]} do not broadcast")
                out[j] = n
    return tuple(out)


def meta_call(op: str, args: tuple, kwargs: dict) -> Any:
    """Run `op` on meta stand-ins of the handles: torch's own shape, dtype and view logic, no data."""
    margs, mkwargs = _to_meta(args), {k: _to_meta(v) for k, v in kwargs.items()}
    if "device" in mkwargs or _has_device(op):
        mkwargs = dict(mkwargs, device=torch.device("meta"))
        mkwargs.pop("pin_memory", None)
    return resolve_op(op)(*margs, **mkwargs)


def _to_meta(x: Any) -> Any:
    if type(x) is WGTensor:
        return x.meta()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(v) for v in x)
    return x


_DEVICE_OPS: dict[str, bool] = {}


def _has_device(op: str) -> bool:
    got = _DEVICE_OPS.get(op)
    if got is None:
        got = _DEVICE_OPS[op] = any(a.name == "device" for a in resolve_op(op)._schema.arguments)
    return got


def norm_dim(d: int, nd: int) -> int:
    return d % nd if nd else 0


# --- supports ----------------------------------------------------------------------------------------------

def _int_scalars(x: Any) -> list[int]:
    if isinstance(x, bool):
        return []
    if isinstance(x, int):
        return [x]
    if isinstance(x, (list, tuple)):
        return [v for e in x for v in _int_scalars(e)]
    return []


def check_call(call: OpCall, f16: bool, max_bytes: int, int64_native: bool = False) -> str | None:
    """None when the backend runs `call` on the device, else the reason it does not."""
    h = OPS.get(call.op)
    if h is None:
        return f"no WebGPU kernel for {call.op}"
    for t in call.tensors():
        reason = dtype_reason(t.dtype, f16)
        if reason:
            return reason
        if t.numel() * 4 > max_bytes:
            return f"a {list(t.shape)} tensor exceeds the adapter's largest storage binding ({max_bytes} bytes)"
    for v in pytree.tree_leaves((call.args, call.kwargs)):
        if isinstance(v, torch.dtype):
            reason = dtype_reason(v, f16)
            if reason:
                return reason
    if isinstance(call.outputs, (torch.Tensor, list, tuple)):
        for t in pytree.tree_leaves(call.outputs):
            if isinstance(t, torch.Tensor):
                reason = dtype_reason(t.dtype, f16)
                if reason:
                    return reason
    if not h.view and not int64_native:
        for v in _int_scalars(list(call.args) + list(call.kwargs.values())):
            if not I32_MIN <= v <= I32_MAX:
                return f"integer argument {v} does not fit int32, the width int64 is computed in on WebGPU"
    if h.check is not None:
        return h.check(call)
    return None


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)

"""Ops on the bits of values: the shifts (torch's rules for amounts outside the width) and dtype views
(`view.dtype`, the bytes reinterpreted).

Shifts are expressions over the elementwise kernel; a dtype view is metadata where the stored words already
hold the same bits, else a repacking kernel (`kernels.bitcast`). No op here touches data on the host.
"""

from __future__ import annotations

from typing import Any

import torch

from tapml.backends.webgpu import kernels as K
from tapml.backends.webgpu.ops import broadcast, is_t, meta_call, opmath, register, result_type
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.errors import TapmlError
from tapml.ops import OpCall

# --- shifts ------------------------------------------------------------------------------------------------

_SHIFT_BITS = {torch.uint8: 8, torch.int8: 8, torch.int16: 16, torch.int32: 32, torch.int64: 64}


def _check_shift(call: OpCall) -> str | None:
    dt = torch.result_type(*call.args[:2])
    if dt not in _SHIFT_BITS:
        return f"bit shifts of {dt} are not defined (torch has none for it either)"
    return None


def _shift(left: bool, inplace: bool):
    """torch's shifts: the amount taken in the result dtype (wrapped), then a negative amount or one of at
    least the dtype's width gives 0 (a right shift of a negative signed value: -1)."""
    def run(rt: Runtime, a: Any, b: Any) -> WGTensor:
        dt = result_type(a, b)
        if dt == torch.int64 and not rt.int64_native:
            raise TapmlError("webgpu: int64 shifts need 64-bit integers (the adapter feature shader-int64); "
                             "int32 on the device would lose the high bits")
        shape = broadcast(*(x.shape for x in (a, b) if is_t(x)))
        out = a if inplace else K.new(rt, shape, dt)
        ct, wrap = opmath(dt), rt.dtypes[dt].wrap
        amount = f"{wrap}(b)" if wrap else "b"
        cond = f"{amount} >= IT({_SHIFT_BITS[dt]})" + ("" if dt == torch.uint8 else f" || {amount} < IT(0)")
        if left:
            expr = f"select(a << u32({amount}), IT(0), {cond})"
        else:
            expr = f"select(a >> u32({amount}), select(IT(0), IT(-1), a < IT(0)), {cond})"
        return K.ew(rt, expr, [a, b], out, [ct, ct], ct)
    return run


for _left, _names in ((True, ("bitwise_left_shift", "__lshift__")), (False, ("bitwise_right_shift", "__rshift__"))):
    for _ov in ("Tensor", "Tensor_Scalar", "Scalar_Tensor", "Scalar"):
        register(f"aten.{_names[0]}.{_ov}", f"aten.{_names[1]}.{_ov}", check=_check_shift)(_shift(_left, False))
        register(f"aten.{_names[0]}_.{_ov}", f"aten.__i{_names[1][2:]}.{_ov}", check=_check_shift)(
            _shift(_left, True))


# --- dtype views -------------------------------------------------------------------------------------------

def _check_view_dtype(call: OpCall) -> str | None:
    for dt in (call.args[0].dtype, call.args[1]):
        if dt not in K.BITCAST_SIZES:
            return f"a dtype view to or from {dt} is not implemented on WebGPU (1-, 2- and 4-byte dtypes are)"
    return None


# dtypes whose stored words already hold the same bits: a view between them is metadata
_SAME_WORDS = ({torch.float32, torch.int32},)


@register("aten.view.dtype", check=_check_view_dtype)
def _view_dtype(rt: Runtime, x: WGTensor, dtype: torch.dtype) -> WGTensor:
    """x's bytes as `dtype` (the last dim rescaled by the element sizes). float32 <-> int32 is a view of the
    same buffer; otherwise narrow ints and bfloat16 are stored widened on the device, so the bytes are repacked
    into a fresh tensor: a copy, not an alias (a later write through it would not reach x; the bitcasts models
    make, such as GGUF's scales out of a uint8 buffer, are read only)."""
    if dtype == x.dtype or any({x.dtype, dtype} <= s for s in _SAME_WORDS):
        return x.view_as(x.shape, x.stride, x.offset, dtype)
    m = meta_call("aten.view.dtype", (x, dtype), {})
    return K.reinterpret(rt, x, dtype, tuple(m.shape))

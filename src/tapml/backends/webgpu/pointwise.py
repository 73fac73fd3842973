"""Pointwise ATen ops (unary, binary, comparisons, where/clamp/fill), factories, copies and views.

Each op is an expression over the elementwise kernel of `kernels.ew`; views are metadata on the same
storage, computed by torch's own view logic on meta stand-ins. No op here touches data on the host.
"""

from __future__ import annotations

from typing import Any

import torch

from tapml.backends.webgpu import kernels as K
from tapml.backends.webgpu.ops import (
    broadcast,
    float_dtype,
    is_t,
    meta_call,
    norm_dim,
    opmath,
    register,
    result_type,
)
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.backends.webgpu.transfer import download

# --- unary -------------------------------------------------------------------------------------------------

# name -> (float expression, int expression or None (float only: ints compute in f32)); `a` is the input.
UNARY = {
    "neg": ("-a", "-a"),
    "abs": ("abs(a)", "abs(a)"),
    "exp": ("t_exp(a)", None),
    "exp2": ("t_exp(a * 0.6931471805599453)", None),
    "expm1": ("t_expm1(a)", None),
    "log": ("t_log(a)", None),
    "log2": ("t_log(a) * 1.4426950408889634", None),
    "log10": ("t_log(a) * 0.4342944819032518", None),
    "log1p": ("t_log1p(a)", None),
    "sin": ("t_sin(a)", None),
    "cos": ("t_cos(a)", None),
    "tan": ("t_sin(a) / t_cos(a)", None),
    "tanh": ("t_tanh(a)", None),
    "erf": ("t_erf(a)", None),
    "sqrt": ("sqrt(a)", None),
    "rsqrt": ("1.0 / sqrt(a)", None),
    "reciprocal": ("1.0 / a", None),
    "sigmoid": ("1.0 / (1.0 + t_exp(-a))", None),
    "silu": ("a / (1.0 + t_exp(-a))", None),
    "relu": ("select(a, 0.0, a < 0.0)", "max(a, 0)"),
    "floor": ("floor(a)", "a"),
    "ceil": ("ceil(a)", "a"),
    "round": ("round(a)", "a"),
    "trunc": ("trunc(a)", "a"),
    "frac": ("a - trunc(a)", None),
    "sign": ("f_sign(a)", "sign(a)"),
    "hardswish": ("a * min(max(a + 3.0, 0.0), 6.0) / 6.0", None),
    "hardsigmoid": ("min(max(a + 3.0, 0.0), 6.0) / 6.0", None),
    "mish": ("a * t_tanh(select(t_log1p(t_exp(a)), a, a > 20.0))", None),
}
GELU = {"none": "a * 0.5 * (1.0 + t_erf(a * 0.70710678118654752))",
        "tanh": "0.5 * a * (1.0 + t_tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))"}
PREDICATES = {"isnan": "is_nan(a)", "isinf": "is_inf(a)", "isfinite": "!(is_nan(a) || is_inf(a))",
              "isneginf": "is_inf(a) && a < 0.0", "isposinf": "is_inf(a) && a > 0.0"}


def _out(rt: Runtime, like: WGTensor | None, shape: tuple, dtype: torch.dtype, inplace: bool) -> WGTensor:
    return like if inplace else K.new(rt, shape, dtype)


def _unary(name: str, inplace: bool):
    fexpr, iexpr = UNARY[name]

    def run(rt: Runtime, x: WGTensor, *rest: Any, **kw: Any) -> WGTensor:
        int_ok = iexpr is not None and not x.dtype.is_floating_point
        dt = x.dtype if (int_ok or x.dtype.is_floating_point) else float_dtype(x.dtype)
        out = _out(rt, x, x.shape, dt, inplace)
        if int_ok:  # int64 in its own compute type: as i32 it lost the high word (-(2**40) gave 0)
            ct = "i64" if x.info.ct == "i64" else "i32"
            return K.ew(rt, iexpr, [x], out, [ct], ct)
        return K.ew(rt, fexpr, [x], out, ["f32"], "f32")
    return run


for _n in UNARY:
    register(f"aten.{_n}.default")(_unary(_n, False))
    register(f"aten.{_n}_.default")(_unary(_n, True))


def _gelu(inplace: bool):
    def run(rt: Runtime, x: WGTensor, approximate: str = "none") -> WGTensor:
        return K.ew(rt, GELU[approximate], [x], _out(rt, x, x.shape, x.dtype, inplace), ["f32"], "f32")
    return run


register("aten.gelu.default")(_gelu(False))
register("aten.gelu_.default")(_gelu(True))

for _n, _e in PREDICATES.items():
    register(f"aten.{_n}.default")(
        lambda rt, x, _e=_e: K.ew(rt, _e, [x], K.new(rt, x.shape, torch.bool), ["f32"], "bool")
        if x.dtype.is_floating_point else K.fill(rt, K.new(rt, x.shape, torch.bool), _e == PREDICATES["isfinite"]))


@register("aten.bitwise_not.default", "aten.bitwise_not_.default")
def _bitwise_not(rt: Runtime, x: WGTensor) -> WGTensor:
    out = K.new(rt, x.shape, x.dtype)
    if x.dtype == torch.bool:
        return K.ew(rt, "!a", [x], out, ["bool"], "bool")
    return K.ew(rt, "~a", [x], out, ["i32"], "i32")


@register("aten.logical_not.default")
def _logical_not(rt: Runtime, x: WGTensor) -> WGTensor:
    return K.ew(rt, "!a", [x], K.new(rt, x.shape, torch.bool), ["bool"], "bool")


@register("aten.leaky_relu.default", "aten.leaky_relu_.default")
def _leaky_relu(rt: Runtime, x: WGTensor, slope: float = 0.01) -> WGTensor:
    return K.ew(rt, "select(a, a * b, a <= 0.0)", [x, slope], K.new(rt, x.shape, x.dtype), ["f32", "f32"], "f32")


@register("aten.hardtanh.default", "aten.hardtanh_.default")
def _hardtanh(rt: Runtime, x: WGTensor, lo: float = -1.0, hi: float = 1.0) -> WGTensor:
    ct = opmath(x.dtype)
    return K.ew(rt, "select(select(a, b, a < b), c, a > c)", [x, lo, hi], K.new(rt, x.shape, x.dtype),
                [ct] * 3, ct)


@register("aten.softplus.default")
def _softplus(rt: Runtime, x: WGTensor, beta: float = 1.0, threshold: float = 20.0) -> WGTensor:
    return K.ew(rt, "select(t_log1p(t_exp(a * b)) / b, a, a * b > c)", [x, beta, threshold],
                K.new(rt, x.shape, x.dtype), ["f32"] * 3, "f32")


@register("aten.elu.default")
def _elu(rt: Runtime, x: WGTensor, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> WGTensor:
    return K.ew(rt, "select(a * c, b * t_expm1(a * d) * c, a <= 0.0)", [x, alpha, scale, input_scale],
                K.new(rt, x.shape, x.dtype), ["f32"] * 4, "f32")


# --- binary ------------------------------------------------------------------------------------------------

# name -> (float expression, int expression); `a` self, `b` other, `c` alpha when present.
ARITH = {
    "add": ("a + b", "a + b"), "sub": ("a - b", "a - b"), "mul": ("a * b", "a * b"),
    "maximum": ("f_max(a, b)", "max(a, b)"), "minimum": ("f_min(a, b)", "min(a, b)"),
    "max": ("f_max(a, b)", "max(a, b)"), "min": ("f_min(a, b)", "min(a, b)"),
    "remainder": ("t_rem(a, b)", "i_rem(a, b)"), "fmod": ("a % b", "i_fmod(a, b)"),
    "floor_divide": ("t_floordiv(a, b)", "i_floordiv(a, b)"),
    "pow": ("t_pow(a, b)", "i_pow(a, b)"),
    "bitwise_and": (None, "a & b"), "bitwise_or": (None, "a | b"), "bitwise_xor": (None, "a ^ b"),
    "atan2": ("atan2(a, b)", None), "copysign": (("select(abs(a), -abs(a), b < 0.0 || (b == 0.0 && "
                                                 "(bitcast<u32>(b) >> 31u) == 1u))"), None),
}
COMPARE = {"eq": "a == b", "ne": "!(a == b)", "lt": "a < b", "le": "a <= b", "gt": "a > b", "ge": "a >= b"}
LOGICAL = {"logical_and": "a && b", "logical_or": "a || b", "logical_xor": "a != b"}


def _binary(name: str, inplace: bool, reverse: bool = False):
    fexpr, iexpr = ARITH.get(name, (None, None))

    def run(rt: Runtime, a: Any, b: Any, *rest: Any, alpha: Any = 1, **kw: Any) -> WGTensor:
        if reverse:  # rsub(self, other) = other - self * alpha
            a, b = b, a
        dt = result_type(a, b)
        if name in ("atan2",):
            dt = float_dtype(dt)
        if name in ("bitwise_and", "bitwise_or", "bitwise_xor") and dt == torch.bool:
            dt = torch.bool
        shape = broadcast(*(x.shape for x in (a, b) if is_t(x)))
        target = (b if reverse else a) if inplace else None
        out = target if inplace else K.new(rt, shape, dt)
        ct = opmath(dt)
        expr = fexpr if ct == "f32" else iexpr
        if expr is None:
            ct, expr = ("f32", fexpr) if fexpr is not None else ("i32", iexpr)
        ops, cts = [a, b], [ct, ct]
        if alpha != 1 and name in ("add", "sub"):
            expr = f"a {'+' if name == 'add' else '-'} c * b"
            ops, cts = [a, b, alpha], [ct, ct, ct]
        if reverse and alpha != 1:
            expr = "a - b * c"
            ops, cts = [a, b, alpha], [ct, ct, ct]
        return K.ew(rt, expr, ops, out, cts, ct)
    return run


def _compare(expr: str, inplace: bool = False):
    def run(rt: Runtime, a: Any, b: Any) -> WGTensor:
        ct = opmath(result_type(a, b))
        shape = broadcast(*(x.shape for x in (a, b) if is_t(x)))
        out = a if inplace else K.new(rt, shape, torch.bool)
        return K.ew(rt, expr, [a, b], out, [ct, ct], "bool")
    return run


def _logical(expr: str, inplace: bool = False):
    def run(rt: Runtime, a: Any, b: Any) -> WGTensor:
        shape = broadcast(*(x.shape for x in (a, b) if is_t(x)))
        out = a if inplace else K.new(rt, shape, torch.bool)
        return K.ew(rt, expr, [a, b], out, ["bool", "bool"], "bool")
    return run


for _n in ARITH:
    for _ov in ("Tensor", "Scalar", "default", "other", "Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor"):
        register(f"aten.{_n}.{_ov}")(_binary(_n, False))
        register(f"aten.{_n}_.{_ov}")(_binary(_n, True))
for _ov in ("Tensor", "Scalar"):
    register(f"aten.rsub.{_ov}")(_binary("sub", False, reverse=True))
for _n, _e in COMPARE.items():
    for _ov in ("Tensor", "Scalar"):
        register(f"aten.{_n}.{_ov}")(_compare(_e))
        register(f"aten.{_n}_.{_ov}")(_compare(_e, True))
for _n, _e in LOGICAL.items():
    register(f"aten.{_n}.default")(_logical(_e))
    register(f"aten.{_n}_.default")(_logical(_e, True))


def _div(inplace: bool):
    def run(rt: Runtime, a: Any, b: Any, *, rounding_mode: str | None = None) -> WGTensor:
        dt = result_type(a, b)
        if rounding_mode is None:
            dt = float_dtype(dt)
        shape = broadcast(*(x.shape for x in (a, b) if is_t(x)))
        out = a if inplace else K.new(rt, shape, dt)
        ct = opmath(dt)
        if rounding_mode is None:
            expr = "a / b"
        elif rounding_mode == "trunc":
            expr = "trunc(a / b)" if ct == "f32" else "select(a / b, 0, b == 0)"
        else:
            expr = "t_floordiv(a, b)" if ct == "f32" else "i_floordiv(a, b)"
        return K.ew(rt, expr, [a, b], out, [ct, ct], ct)
    return run


for _ov in ("Tensor", "Scalar", "Tensor_mode", "Scalar_mode"):
    register(f"aten.div.{_ov}")(_div(False))
    register(f"aten.div_.{_ov}")(_div(True))
    register(f"aten.true_divide.{_ov}")(_div(False))


def _addcop(div: bool):
    def run(rt: Runtime, x: WGTensor, t1: WGTensor, t2: WGTensor, *, value: float = 1) -> WGTensor:
        dt = result_type(x, t1, t2)
        ct = opmath(dt)
        out = K.new(rt, broadcast(x.shape, t1.shape, t2.shape), dt)
        expr = "a + d * (b / c)" if div else "a + d * b * c"
        return K.ew(rt, expr, [x, t1, t2, value], out, [ct] * 4, ct)
    return run


register("aten.addcmul.default")(_addcop(False))
register("aten.addcdiv.default")(_addcop(True))


@register("aten.lerp.Scalar", "aten.lerp.Tensor")
def _lerp(rt: Runtime, a: WGTensor, b: WGTensor, w: Any) -> WGTensor:
    out = K.new(rt, broadcast(*(x.shape for x in (a, b, w) if is_t(x))), a.dtype)
    expr = "select(b - (b - a) * (1.0 - c), a + c * (b - a), abs(c) < 0.5)"
    return K.ew(rt, expr, [a, b, w], out, ["f32"] * 3, "f32")


# --- where, masked_fill, clamp, fill ------------------------------------------------------------------------

@register("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def _where(rt: Runtime, cond: WGTensor, a: Any, b: Any) -> WGTensor:
    if is_t(a) or is_t(b):
        dt = result_type(a, b)
    else:
        dt = torch.get_default_dtype() if isinstance(a, float) or isinstance(b, float) else torch.int64
    ct = opmath(dt)
    out = K.new(rt, broadcast(*(x.shape for x in (cond, a, b) if is_t(x))), dt)
    return K.ew(rt, "select(c, b, a)", [cond, a, b], out, ["bool", ct, ct], ct)


def _masked_fill(inplace: bool):
    def run(rt: Runtime, x: WGTensor, mask: WGTensor, value: Any) -> WGTensor:
        ct = opmath(x.dtype) if x.dtype != torch.bool else "bool"
        out = x if inplace else K.new(rt, broadcast(x.shape, mask.shape), x.dtype)
        return K.ew(rt, "select(a, c, b)", [x, mask, value], out, [ct, "bool", ct], ct)
    return run


for _ov in ("Scalar", "Tensor"):
    register(f"aten.masked_fill.{_ov}")(_masked_fill(False))
    register(f"aten.masked_fill_.{_ov}")(_masked_fill(True))


def _clamp(kind: str, inplace: bool):
    def run(rt: Runtime, x: WGTensor, lo: Any = None, hi: Any = None) -> WGTensor:
        if kind == "max":
            lo, hi = None, lo
        dt = result_type(x, lo, hi)
        ct = opmath(dt)
        ops, cts, expr = [x], [ct], "a"
        for bound, cmp in ((lo, "<"), (hi, ">")):
            if bound is None:
                continue
            v = K.LETTERS[len(ops)]
            ops.append(bound)
            cts.append(ct)
            expr = (f"select({expr}, {v}, ({expr}) {cmp} {v})" if ct == "f32"
                    else f"{'max' if cmp == '<' else 'min'}({expr}, {v})")
        out = x if inplace else K.new(rt, broadcast(*(t.shape for t in ops if is_t(t))), dt)
        return K.ew(rt, expr, ops, out, cts, ct)
    return run


for _ov in ("default", "Tensor"):
    register(f"aten.clamp.{_ov}")(_clamp("both", False))
    register(f"aten.clamp_.{_ov}")(_clamp("both", True))
    register(f"aten.clip.{_ov}")(_clamp("both", False))
    register(f"aten.clamp_min.{_ov}")(_clamp("min", False))
    register(f"aten.clamp_min_.{_ov}")(_clamp("min", True))
    register(f"aten.clamp_max.{_ov}")(_clamp("max", False))
    register(f"aten.clamp_max_.{_ov}")(_clamp("max", True))


@register("aten.fill_.Scalar", "aten.fill_.Tensor")
def _fill_(rt: Runtime, x: WGTensor, value: Any) -> WGTensor:
    ct = x.info.ct
    return K.ew(rt, "a", [value], x, [ct if not is_t(value) else x.info.ct], ct)


@register("aten.fill.Scalar", "aten.fill.Tensor")
def _fill(rt: Runtime, x: WGTensor, value: Any) -> WGTensor:
    return _fill_(rt, K.new(rt, x.shape, x.dtype), value)


@register("aten.zero_.default")
def _zero_(rt: Runtime, x: WGTensor) -> WGTensor:
    return K.fill(rt, x, 0)


def _triangle(upper: bool, inplace: bool):
    def run(rt: Runtime, x: WGTensor, diagonal: int = 0) -> WGTensor:
        ct = x.info.ct
        zero = {"f32": "0.0", "i32": "0", "bool": "false"}[ct]
        keep = "col - row >= b" if upper else "col - row <= b"
        out = x if inplace else K.new(rt, x.shape, x.dtype)
        return K.ew(rt, f"select({zero}, a, {keep})", [x, diagonal], out, [ct, "i32"], ct, coords=True)
    return run


for _n, _u in (("triu", True), ("tril", False)):
    register(f"aten.{_n}.default")(_triangle(_u, False))
    register(f"aten.{_n}_.default")(_triangle(_u, True))


# --- factories ---------------------------------------------------------------------------------------------

def _factory(op: str, value: Any):
    """zeros/ones/full/empty(+_like, new_*): shape and dtype by torch's meta logic, value by a fill kernel."""
    def run(rt: Runtime, *args: Any, **kwargs: Any) -> WGTensor:
        m = meta_call(op, args, kwargs)
        out = K.new(rt, m.shape, m.dtype)
        v = value(args, kwargs) if callable(value) else value
        return K.fill(rt, out, v)
    return run


def _full_value(pos: int):
    return lambda args, kwargs: args[pos] if len(args) > pos else kwargs["fill_value"]


for _op, _v in [("aten.zeros.default", 0), ("aten.ones.default", 1), ("aten.full.default", _full_value(1)),
                ("aten.empty.memory_format", 0), ("aten.empty_strided.default", 0),
                ("aten.zeros_like.default", 0), ("aten.ones_like.default", 1),
                ("aten.full_like.default", _full_value(1)), ("aten.empty_like.default", 0),
                ("aten.new_zeros.default", 0), ("aten.new_ones.default", 1), ("aten.new_full.default", _full_value(2)),
                ("aten.new_empty.default", 0), ("aten.new_empty_strided.default", 0),
                ("aten.scalar_tensor.default", _full_value(0))]:
    register(_op)(_factory(_op, _v))


def _arange(op: str):
    def run(rt: Runtime, *args: Any, **kwargs: Any) -> WGTensor:
        m = meta_call(op, args, kwargs)
        nums = [a for a in args if isinstance(a, (int, float))]
        start, step = (0, 1) if len(nums) == 1 else (nums[0], nums[2] if len(nums) > 2 else 1)
        out = K.new(rt, m.shape, m.dtype)
        ct = opmath(m.dtype)
        expr = "a + f32(idx) * b" if ct == "f32" else "a + IT(idx) * b"
        return K.ew(rt, expr, [start, step], out, [ct, ct], ct)
    return run


for _op in ("aten.arange.default", "aten.arange.start", "aten.arange.start_step"):
    register(_op)(_arange(_op))


# --- copies and conversions --------------------------------------------------------------------------------

@register("aten._to_copy.default")
def _to_copy(rt: Runtime, x: WGTensor, *, dtype: torch.dtype | None = None, **_: Any) -> WGTensor:
    return K.copy(rt, x, K.new(rt, x.shape, dtype or x.dtype))


@register("aten.clone.default")
def _clone(rt: Runtime, x: WGTensor, *, memory_format: Any = None) -> WGTensor:
    return K.copy(rt, x, K.new(rt, x.shape, x.dtype))


@register("aten.copy_.default")
def _copy_(rt: Runtime, x: WGTensor, src: WGTensor, non_blocking: bool = False) -> WGTensor:
    return K.copy(rt, src, x)


@register("aten.copy.default")
def _copy(rt: Runtime, x: WGTensor, src: WGTensor, non_blocking: bool = False) -> WGTensor:
    return K.copy(rt, src, K.new(rt, x.shape, x.dtype))


@register("aten.lift_fresh.default", view=True)
def _lift_fresh(rt: Runtime, x: WGTensor) -> WGTensor:
    return x


@register("aten.lift_fresh_copy.default", "aten.contiguous.default")
def _lift_fresh_copy(rt: Runtime, x: WGTensor, **_: Any) -> WGTensor:
    return K.copy(rt, x, K.new(rt, x.shape, x.dtype))


@register("aten._local_scalar_dense.default")
def _item(rt: Runtime, x: WGTensor) -> Any:
    return download(rt, x).item()


# --- views -------------------------------------------------------------------------------------------------

VIEWS = ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten._reshape_alias.default",
         "aten.transpose.int", "aten.t.default", "aten.permute.default", "aten.expand.default",
         "aten.slice.Tensor", "aten.select.int", "aten.unsqueeze.default", "aten.squeeze.default",
         "aten.squeeze.dim", "aten.squeeze.dims", "aten.as_strided.default", "aten.alias.default",
         "aten.detach.default", "aten.split.Tensor", "aten.split_with_sizes.default", "aten.unbind.int",
         "aten.chunk.default", "aten.narrow.default", "aten.diagonal.default", "aten.unfold.default",
         "aten.view_as.default", "aten.expand_as.default", "aten.movedim.int", "aten.swapaxes.default",
         "aten.flatten.using_ints", "aten.unflatten.int", "aten.tensor_split.sections")
_COPY_FALLBACK = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
                  "aten._reshape_alias.default", "aten.flatten.using_ints", "aten.unflatten.int"}


def _hashable(x: Any) -> Any:
    return tuple(_hashable(v) for v in x) if isinstance(x, (list, tuple)) else x


_VIEWS: dict[tuple, Any] = {}


def _view(op: str):
    def run(rt: Runtime, x: WGTensor, *args: Any, **kwargs: Any) -> Any:
        # views of a known geometry are answered from a cache of torch's answers (shape, strides, offset)
        try:
            key = (op, x.shape, x.stride, x.offset, x.dtype, _hashable(args), tuple(kwargs.items()))
            got = _VIEWS.get(key)
        except TypeError:
            key, got = None, None
        if got is not None:
            if type(got) is tuple:
                return x.view_as(*got)
            return [x.view_as(*g) for g in got]
        res = _view_meta(rt, op, x, args, kwargs)
        if key is not None and res[0] is x.storage:
            if len(_VIEWS) > 50000:
                _VIEWS.clear()
            _VIEWS[key] = res[1]
        got = res[1]
        base = res[2]
        if type(got) is tuple:
            return base.view_as(*got)
        return [base.view_as(*g) for g in got]
    return run


def _view_meta(rt: Runtime, op: str, x: WGTensor, args: tuple, kwargs: dict) -> tuple:
    """(storage viewed, geometry (shape, stride, offset) or a list of them, the tensor viewed)."""
    try:
        res = meta_call(op, (x,) + args, kwargs)
    except RuntimeError:
        if op not in _COPY_FALLBACK:
            raise
        x = K.copy(rt, x, K.new(rt, x.shape, x.dtype))
        res = meta_call(op, (x,) + args, kwargs)
    if isinstance(res, torch.Tensor):
        return x.storage, (tuple(res.shape), tuple(res.stride()), res.storage_offset()), x
    return x.storage, [(tuple(m.shape), tuple(m.stride()), m.storage_offset()) for m in res], x


for _op in VIEWS:
    register(_op, view=True)(_view(_op))


# --- cat and friends ---------------------------------------------------------------------------------------

@register("aten.cat.default")
def _cat(rt: Runtime, tensors: list[WGTensor], dim: int = 0) -> WGTensor:
    parts = [t for t in tensors if not (t.dim() == 1 and t.shape[0] == 0)]
    if not parts:
        return K.new(rt, (0,), result_type(*tensors))
    ref = parts[0]
    d = norm_dim(dim, ref.dim())
    dt = result_type(*tensors)
    shape = list(ref.shape)
    shape[d] = sum(t.shape[d] for t in parts)
    out = K.new(rt, shape, dt)
    at = 0
    for t in parts:
        n = t.shape[d]
        if n:
            view = out.view_as(t.shape, out.stride, out.offset + at * out.stride[d])
            K.copy(rt, t, view)
        at += n
    return out


@register("aten.stack.default")
def _stack(rt: Runtime, tensors: list[WGTensor], dim: int = 0) -> WGTensor:
    ref = tensors[0]
    d = norm_dim(dim, ref.dim() + 1)
    shape = list(ref.shape)
    shape.insert(d, len(tensors))
    out = K.new(rt, shape, result_type(*tensors))
    for i, t in enumerate(tensors):
        st = list(out.stride)
        sd = st.pop(d)
        K.copy(rt, t, out.view_as(t.shape, st, out.offset + i * sd))
    return out


@register("aten.repeat.default")
def _repeat(rt: Runtime, x: WGTensor, repeats: list[int]) -> WGTensor:
    lead = len(repeats) - x.dim()
    xs = [1] * lead + list(x.shape)
    xst = [0] * lead + list(x.stride)
    shape = [r * n for r, n in zip(repeats, xs)]
    out = K.new(rt, shape, x.dtype)
    # out viewed as [r0, n0, r1, n1, ...]; the source broadcasts over the r dims
    vshape, vstride, sstride = [], [], []
    for (r, n), s, os_ in zip(zip(repeats, xs), xst, out.stride):
        vshape += [r, n]
        vstride += [n * os_, os_]
        sstride += [0, s]
    if out.numel():
        K.copy(rt, x.view_as(vshape, sstride, x.offset), out.view_as(vshape, vstride, 0))
    return out


@register("aten.constant_pad_nd.default")
def _pad(rt: Runtime, x: WGTensor, pad: list[int], value: float = 0) -> WGTensor:
    nd = x.dim()
    shape, src_off, dst_off = list(x.shape), x.offset, 0
    out_shape = list(x.shape)
    for i in range(len(pad) // 2):
        d = nd - 1 - i
        out_shape[d] += pad[2 * i] + pad[2 * i + 1]
    out = K.new(rt, out_shape, x.dtype)
    K.fill(rt, out, value)
    for i in range(len(pad) // 2):
        d = nd - 1 - i
        lo, hi = pad[2 * i], pad[2 * i + 1]
        if lo >= 0:
            dst_off += lo * out.stride[d]
        else:
            src_off += -lo * x.stride[d]
            shape[d] += lo
        if hi < 0:
            shape[d] += hi
    if all(n > 0 for n in shape):
        K.copy(rt, x.view_as(shape, x.stride, src_off), out.view_as(shape, out.stride, dst_off))
    return out

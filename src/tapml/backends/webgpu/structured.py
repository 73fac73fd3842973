"""Structured ATen ops: reductions, softmax, normalizations, the matmul family, attention, convolution,
pooling, indexing/scatter, cumulative sums, sort/topk, isin and histc.

Each handler derives shapes and strides on the host and hands all values to kernels (`kernels/`); a case
it cannot run faithfully is turned down by its check (reported unsupported), never approximated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tapml.backends.webgpu import kernels as K
from tapml.backends.webgpu.ops import broadcast, is_t, meta_call, norm_dim, opmath, register
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.backends.webgpu.selection import accumulate_into, expand_masks
from tapml.ops import OpCall

# --- reductions --------------------------------------------------------------------------------------------


def _sum_dtype(x: WGTensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.int64 if not x.dtype.is_floating_point else x.dtype


def _as_dims(dim: Any) -> list[int] | None:
    if dim is None:
        return None
    return [dim] if isinstance(dim, int) else list(dim)


@register("aten.sum.default", "aten.sum.dim_IntList")
def _sum(rt: Runtime, x: WGTensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> WGTensor:
    out_dt = _sum_dtype(x, dtype)
    return K.reduce(rt, "sum", x, _as_dims(dim), keepdim, out_dt, opmath(out_dt))


@register("aten.prod.default", "aten.prod.dim_int")
def _prod(rt: Runtime, x: WGTensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> WGTensor:
    out_dt = _sum_dtype(x, dtype)
    return K.reduce(rt, "prod", x, _as_dims(dim), keepdim, out_dt, opmath(out_dt))


@register("aten.mean.default", "aten.mean.dim")
def _mean(rt: Runtime, x: WGTensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> WGTensor:
    return K.reduce(rt, "mean", x, _as_dims(dim), keepdim, dtype or x.dtype, "f32")


def _minmax_all(kind: str):
    def run(rt: Runtime, x: WGTensor, dim: Any = None, keepdim: bool = False) -> WGTensor:
        return K.reduce(rt, kind, x, _as_dims(dim), keepdim, x.dtype, opmath(x.dtype))
    return run


register("aten.amax.default")(_minmax_all("amax"))
register("aten.amin.default")(_minmax_all("amin"))
register("aten.max.default")(_minmax_all("amax"))
register("aten.min.default")(_minmax_all("amin"))


@register("aten.aminmax.default")
def _aminmax(rt: Runtime, x: WGTensor, *, dim: int | None = None, keepdim: bool = False) -> tuple[WGTensor, WGTensor]:
    dims = None if dim is None else [dim]
    return (K.reduce(rt, "amin", x, dims, keepdim, x.dtype, opmath(x.dtype)),
            K.reduce(rt, "amax", x, dims, keepdim, x.dtype, opmath(x.dtype)))


def _minmax_dim(kind: str):
    def run(rt: Runtime, x: WGTensor, dim: int, keepdim: bool = False) -> tuple[WGTensor, WGTensor]:
        return K.reduce(rt, kind, x, [dim], keepdim, x.dtype, opmath(x.dtype))
    return run


register("aten.max.dim")(_minmax_dim("max"))
register("aten.min.dim")(_minmax_dim("min"))


def _arg(kind: str):
    def run(rt: Runtime, x: WGTensor, dim: int | None = None, keepdim: bool = False) -> WGTensor:
        return K.reduce(rt, kind, x, None if dim is None else [dim], keepdim, torch.int64, opmath(x.dtype))
    return run


register("aten.argmax.default")(_arg("argmax"))
register("aten.argmin.default")(_arg("argmin"))


def _anyall(kind: str):
    def run(rt: Runtime, x: WGTensor, dim: Any = None, keepdim: bool = False) -> WGTensor:
        out_dt = torch.uint8 if x.dtype == torch.uint8 else torch.bool
        return K.reduce(rt, kind, x, _as_dims(dim), keepdim, out_dt, "bool")
    return run


for _k in ("any", "all"):
    for _ov in ("default", "dim", "dims"):
        register(f"aten.{_k}.{_ov}")(_anyall(_k))


def _var(kind: str):
    def run(rt: Runtime, x: WGTensor, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> Any:
        dims = _as_dims(dim)
        red = range(x.dim()) if not dims else [norm_dim(d, x.dim()) for d in dims]
        n = math.prod(x.shape[d] for d in red)
        div = max(n - (1 if correction is None else correction), 0)
        if kind == "var_mean":
            var = K.reduce(rt, "var", x, dims, keepdim, x.dtype, "f32", float(div))
            return var, K.reduce(rt, "mean", x, dims, keepdim, x.dtype, "f32")
        return K.reduce(rt, kind, x, dims, keepdim, x.dtype, "f32", float(div))
    return run


register("aten.var.correction")(_var("var"))
register("aten.std.correction")(_var("std"))
register("aten.var_mean.correction")(_var("var_mean"))


@register("aten.logsumexp.default")
def _logsumexp(rt: Runtime, x: WGTensor, dim: Any, keepdim: bool = False) -> WGTensor:
    dt = x.dtype if x.dtype.is_floating_point else torch.float32
    return K.reduce(rt, "logsumexp", x, _as_dims(dim), keepdim, dt, "f32")


@register("aten.linalg_vector_norm.default")
def _vector_norm(rt: Runtime, x: WGTensor, ord: float = 2, dim: Any = None, keepdim: bool = False, *,
                 dtype: Any = None) -> WGTensor:
    kind = {2: "norm2", 1: "norm1", 0: "norm0", math.inf: "norminf", -math.inf: "norm-inf"}.get(ord, "normp")
    return K.reduce(rt, kind, x, _as_dims(dim), keepdim, dtype or x.dtype, "f32",
                    float(ord) if kind == "normp" else None)


# --- softmax and normalization -----------------------------------------------------------------------------

def _softmax(kind: str):
    def run(rt: Runtime, x: WGTensor, dim: int, half_to_float: Any = False) -> WGTensor:
        if isinstance(half_to_float, torch.dtype):
            dt = half_to_float
        else:
            dt = torch.float32 if half_to_float else x.dtype
        return K.softmax(rt, kind, x, dim, dt)
    return run


register("aten._softmax.default")(_softmax("softmax"))
register("aten._log_softmax.default")(_softmax("log_softmax"))


@register("aten._safe_softmax.default")
def _safe_softmax(rt: Runtime, x: WGTensor, dim: int, dtype: torch.dtype | None = None) -> WGTensor:
    return K.softmax(rt, "safe_softmax", x, dim, dtype or x.dtype)


@register("aten.native_layer_norm.default")
def _layer_norm(rt: Runtime, x: WGTensor, normalized_shape: Sequence[int], weight: WGTensor | None,
                bias: WGTensor | None, eps: float) -> tuple[WGTensor, WGTensor, WGTensor]:
    return K.layer_norm(rt, x, len(normalized_shape), weight, bias, eps)


@register("aten.native_group_norm.default")
def _group_norm(rt: Runtime, x: WGTensor, weight: WGTensor | None, bias: WGTensor | None, n: int, c: int,
                hw: int, group: int, eps: float) -> tuple[WGTensor, WGTensor, WGTensor]:
    xc = K.contiguous(rt, x)
    flat = xc.view_as((n, group, c // group * hw), (c * hw, c // group * hw, 1), xc.offset)
    normed, mean, rstd = K.layer_norm(rt, flat, 1, None, None, eps)
    out = normed.view_as(x.shape, K.contiguous_strides(x.shape), 0)
    chan = (n, c, hw)
    ops, cts, expr = [out.view_as(chan, (c * hw, hw, 1), 0)], ["f32"], "a"
    if weight is not None:
        ops.append(weight.view_as((c, 1), (weight.stride[0], 0), weight.offset))
        cts.append("f32")
        expr = "a * b"
    if bias is not None:
        ops.append(bias.view_as((c, 1), (bias.stride[0], 0), bias.offset))
        cts.append("f32")
        expr = f"{expr} + {'c' if weight is not None else 'b'}"
    if len(ops) > 1:
        res = K.new(rt, chan, x.dtype)
        K.ew(rt, expr, ops, res, cts, "f32")
        out = res.view_as(x.shape, K.contiguous_strides(x.shape), 0)
    return out, mean.view_as((n, group), (group, 1), 0), rstd.view_as((n, group), (group, 1), 0)


def _channel(t: WGTensor, nd: int) -> WGTensor:
    """A per-channel vector [C] as a broadcastable [C, 1, ..] view for an [N, C, ...] input."""
    return t.view_as((t.shape[0],) + (1,) * (nd - 2), (t.stride[0],) + (0,) * (nd - 2), t.offset)


def _batch_norm(rt: Runtime, x: WGTensor, weight: WGTensor | None, bias: WGTensor | None,
                mean: WGTensor, var: WGTensor, eps: float) -> WGTensor:
    """Inference batch norm the way torch's CPU kernel forms it: alpha = w / sqrt(var + eps),
    beta = b - mean * alpha, out = x * alpha + beta."""
    nd = x.dim()
    ops = [x, _channel(mean, nd), _channel(var, nd)]
    alpha = "(1.0 / sqrt(c + EPS))"
    if weight is not None:
        ops.append(_channel(weight, nd))
        alpha = f"({alpha} * d)"
    beta = f"(-b * {alpha})"
    if bias is not None:
        ops.append(_channel(bias, nd))
        beta = f"({K.LETTERS[len(ops) - 1]} - b * {alpha})"
    ops.append(float(eps))
    expr = f"a * {alpha} + {beta}".replace("EPS", K.LETTERS[len(ops) - 1])
    return K.ew(rt, expr, ops, K.new(rt, x.shape, x.dtype), ["f32"] * len(ops), "f32")


def _bn_saved_dtype(x: WGTensor, *params: WGTensor | None) -> torch.dtype:
    """The dtype of batch norm's saved mean/invstd: CPU torch's rule (the input's, float32 when a half input
    comes with float32 parameters; torch's meta kernel says float32 for every half input, unlike its CPU)."""
    mixed = x.dtype in (torch.float16, torch.bfloat16) and any(p is not None and p.dtype == torch.float32
                                                              for p in params)
    return torch.float32 if mixed else x.dtype


@register("aten.native_batch_norm.default", "aten._native_batch_norm_legit.default")
def _native_batch_norm(rt: Runtime, x: WGTensor, weight: WGTensor | None, bias: WGTensor | None,
                       running_mean: WGTensor | None, running_var: WGTensor | None, training: bool,
                       momentum: float, eps: float) -> tuple[WGTensor, WGTensor, WGTensor]:
    saved = _bn_saved_dtype(x, weight, bias, running_mean, running_var)
    if not training:
        out = _batch_norm(rt, x, weight, bias, running_mean, running_var, eps)
        return out, K.new(rt, (0,), saved), K.new(rt, (0,), saved)
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // x.shape[1]
    mean = K.reduce(rt, "mean", x, dims, False, torch.float32, "f32")
    var = K.reduce(rt, "var", x, dims, False, torch.float32, "f32", float(n))
    invstd = K.ew(rt, "1.0 / sqrt(a + b)", [var, float(eps)], K.new(rt, var.shape, saved), ["f32"] * 2, "f32")
    out = _batch_norm(rt, x, weight, bias, mean, var, eps)
    if running_mean is not None:
        K.ew(rt, "a * (1.0 - c) + b * c", [running_mean, mean, float(momentum)], running_mean, ["f32"] * 3, "f32")
    if running_var is not None:
        unbiased = float(n) / max(n - 1, 1)
        K.ew(rt, "a * (1.0 - c) + b * d * c", [running_var, var, float(momentum), unbiased], running_var,
             ["f32"] * 4, "f32")
    return out, mean if saved == torch.float32 else K.copy(rt, mean, K.new(rt, mean.shape, saved)), invstd


@register("aten._native_batch_norm_legit_no_training.default")
def _bn_no_training(rt: Runtime, x: WGTensor, weight: WGTensor | None, bias: WGTensor | None,
                    running_mean: WGTensor, running_var: WGTensor, momentum: float,
                    eps: float) -> tuple[WGTensor, WGTensor, WGTensor]:
    saved = _bn_saved_dtype(x, weight, bias, running_mean, running_var)
    out = _batch_norm(rt, x, weight, bias, running_mean, running_var, eps)
    return out, K.new(rt, (0,), saved), K.new(rt, (0,), saved)


# --- matmul family -----------------------------------------------------------------------------------------

@register("aten.mm.default", "aten.bmm.default")
def _mm(rt: Runtime, a: WGTensor, b: WGTensor) -> WGTensor:
    return K.matmul(rt, a, b)


@register("aten.addmm.default", "aten.baddbmm.default")
def _addmm(rt: Runtime, bias: WGTensor, a: WGTensor, b: WGTensor, *, beta: float = 1, alpha: float = 1) -> WGTensor:
    return K.matmul(rt, a, b, bias, alpha, beta)


@register("aten.mv.default")
def _mv(rt: Runtime, a: WGTensor, v: WGTensor) -> WGTensor:
    out = K.matmul(rt, a, v.view_as((v.shape[0], 1), (v.stride[0], 0), v.offset))
    return out.view_as((a.shape[0],), (1,), out.offset)


@register("aten.dot.default")
def _dot(rt: Runtime, a: WGTensor, b: WGTensor) -> WGTensor:
    out = K.matmul(rt, a.view_as((1, a.shape[0]), (0, a.stride[0]), a.offset),
                   b.view_as((b.shape[0], 1), (b.stride[0], 0), b.offset))
    return out.view_as((), (), out.offset)


def _check_grouped(call: OpCall) -> str | None:
    a, b = call.args[0], call.args[1]
    offs = call.args[2] if len(call.args) > 2 else call.kwargs.get("offs")
    bias = call.args[3] if len(call.args) > 3 else call.kwargs.get("bias")
    out_dtype = call.args[4] if len(call.args) > 4 else call.kwargs.get("out_dtype")
    if bias is not None or (out_dtype is not None and out_dtype != a.dtype):
        return "_grouped_mm with bias or out_dtype is not implemented on WebGPU"
    if a.dim() == 2 and b.dim() == 3 and offs is not None:
        return None
    if a.dim() == 3 and b.dim() == 3 and offs is None:
        return None
    return f"_grouped_mm of {a.dim()}-d x {b.dim()}-d operands is not implemented on WebGPU"


@register("aten._grouped_mm.default", check=_check_grouped)
def _grouped(rt: Runtime, a: WGTensor, b: WGTensor, offs: WGTensor | None = None, bias: Any = None,
             out_dtype: Any = None) -> WGTensor:
    if offs is None:
        return K.matmul(rt, a, b)
    return K.grouped_mm(rt, a, b, offs)


# --- attention ---------------------------------------------------------------------------------------------

def _check_sdpa(call: OpCall) -> str | None:
    q, k, v = call.args[:3]
    dropout = call.args[3] if len(call.args) > 3 else call.kwargs.get("dropout_p", 0.0)
    if dropout:
        return "attention dropout draws random numbers; only dropout_p=0 runs on WebGPU"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "attention inputs must be 4-d [batch, heads, length, features]"
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        return "query heads must be a multiple of key/value heads"
    if max(q.shape[3], v.shape[3]) > 1024:
        return "attention head size above 1024 is not implemented on WebGPU"
    mask = call.kwargs.get("attn_mask")
    if mask is not None and mask.dim() > 4:
        return "attention mask with more than 4 dims"
    return None


@register("aten._scaled_dot_product_flash_attention_for_cpu.default", check=_check_sdpa)
def _sdpa_cpu(rt: Runtime, q: WGTensor, k: WGTensor, v: WGTensor, dropout_p: float = 0.0, is_causal: bool = False,
              *, attn_mask: WGTensor | None = None, scale: float | None = None) -> tuple[WGTensor, WGTensor]:
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    if attn_mask is not None and attn_mask.dim() < 4:
        m = attn_mask
        attn_mask = m.view_as((1,) * (4 - m.dim()) + m.shape, (0,) * (4 - m.dim()) + m.stride, m.offset)
    return K.attention(rt, q, k, v, attn_mask, scale, is_causal)


# --- convolution and pooling -------------------------------------------------------------------------------

def _check_conv(call: OpCall) -> str | None:
    x = call.args[0]
    transposed = call.args[6] if len(call.args) > 6 else False
    if transposed:
        return "transposed convolution is not implemented on WebGPU"
    if x.dim() not in (3, 4, 5):
        return f"{x.dim() - 2}-d convolution is not implemented on WebGPU (1-d, 2-d and 3-d are)"
    return None


@register("aten.convolution.default", check=_check_conv)
def _convolution(rt: Runtime, x: WGTensor, w: WGTensor, bias: WGTensor | None, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                 groups: int) -> WGTensor:
    m = meta_call("aten.convolution.default", (x, w, bias, stride, padding, dilation, transposed, output_padding,
                                                groups), {})
    nsp = x.dim() - 2
    return K.convolution(rt, x, w, bias, _per_dim(stride, nsp), _per_dim(padding, nsp), _per_dim(dilation, nsp),
                         groups, m.shape)


def _per_dim(v: Sequence[int], n: int) -> list[int]:
    """A convolution parameter given once or once per spatial dim, as one per dim."""
    return list(v) * n if len(v) == 1 else list(v)


def _pair(v: Any, default: Sequence[int] | None = None) -> tuple[int, int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return (v, v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _nchw(x: WGTensor) -> WGTensor:
    if x.dim() == 4:
        return x
    return x.view_as((1,) + x.shape, (0,) + x.stride, x.offset)


def _check_pool(call: OpCall) -> str | None:
    return None if call.args[0].dim() in (3, 4) else "pooling needs a 3-d or 4-d input"


@register("aten.max_pool2d_with_indices.default", check=_check_pool)
def _max_pool(rt: Runtime, x: WGTensor, kernel_size: Any, stride: Any = (), padding: Any = 0, dilation: Any = 1,
              ceil_mode: bool = False) -> tuple[WGTensor, WGTensor]:
    m = meta_call("aten.max_pool2d_with_indices.default", (x, kernel_size, stride, padding, dilation, ceil_mode), {})
    kk = _pair(kernel_size)
    out, idx = K.pool2d(rt, "max", _nchw(x), m[0].shape[-2:], kk, _pair(stride, kk), _pair(padding),
                        _pair(dilation))
    return (out.view_as(m[0].shape, K.contiguous_strides(m[0].shape), 0),
            idx.view_as(m[1].shape, K.contiguous_strides(m[1].shape), 0))


@register("aten.avg_pool2d.default", check=_check_pool)
def _avg_pool(rt: Runtime, x: WGTensor, kernel_size: Any, stride: Any = (), padding: Any = 0,
              ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: int | None = None) -> WGTensor:
    m = meta_call("aten.avg_pool2d.default", (x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                               divisor_override), {})
    kk = _pair(kernel_size)
    out, _ = K.pool2d(rt, "avg", _nchw(x), m.shape[-2:], kk, _pair(stride, kk), _pair(padding), (1, 1),
                      count_include_pad, divisor_override)
    return out.view_as(m.shape, K.contiguous_strides(m.shape), 0)


@register("aten._adaptive_avg_pool2d.default", check=_check_pool)
def _adaptive_avg(rt: Runtime, x: WGTensor, output_size: Sequence[int]) -> WGTensor:
    oh, ow = _pair(output_size)
    out, _ = K.pool2d(rt, "adaptive_avg", _nchw(x), (oh, ow))
    shape = x.shape[:-2] + (oh, ow)
    return out.view_as(shape, K.contiguous_strides(shape), 0)


# --- indexing ----------------------------------------------------------------------------------------------

def _check_index(call: OpCall) -> str | None:
    if any(t is not None and t.dtype in (torch.bool, torch.uint8) and t.dim() == 0 for t in call.args[1]):
        return "a 0-d boolean index (x[True]) is not implemented on WebGPU"
    if call.op.startswith("aten.index_put"):
        acc = call.args[3] if len(call.args) > 3 else call.kwargs.get("accumulate", False)
        if acc and call.args[0].dtype == torch.bool:
            return "index_put_ with accumulate=True into a bool tensor is not implemented on WebGPU"
    return None


def _index_plan(x: WGTensor, indices: Sequence[WGTensor | None]) -> tuple[list[int], list[int], list[tuple]]:
    """Index space, source coefficients and index entries of advanced indexing (numpy placement rules)."""
    idx = list(indices) + [None] * (x.dim() - len(indices))
    pos = [i for i, t in enumerate(idx) if t is not None]
    tens = [idx[i] for i in pos]
    bshape = list(broadcast(*(t.shape for t in tens)))
    rest = [d for d in range(x.dim()) if idx[d] is None]
    if pos == list(range(pos[0], pos[-1] + 1)):
        before = [d for d in rest if d < pos[0]]
        after = [d for d in rest if d > pos[-1]]
    else:
        before, after = [], rest
    shape = [x.shape[d] for d in before] + bshape + [x.shape[d] for d in after]
    coef = [x.stride[d] for d in before] + [0] * len(bshape) + [x.stride[d] for d in after]
    entries = []
    for d, t in zip(pos, tens):
        strides = [0] * len(before) + K.bcast_strides(t, bshape) + [0] * len(after)
        entries.append((t, strides, x.stride[d], x.shape[d]))
    return shape, coef, entries


@register("aten.index.Tensor", check=_check_index)
def _index(rt: Runtime, x: WGTensor, indices: Sequence[WGTensor | None]) -> WGTensor:
    """Advanced indexing; a boolean mask becomes its nonzero coordinates first (a count read back)."""
    shape, coef, entries = _index_plan(x, expand_masks(rt, indices))
    return K.gather(rt, x, shape, coef, entries)


@register("aten.masked_select.default")
def _masked_select(rt: Runtime, x: WGTensor, mask: WGTensor) -> WGTensor:
    """x[mask], both broadcast to their common shape (the selection's size read back)."""
    shape = broadcast(x.shape, mask.shape)
    xb = x.view_as(shape, K.bcast_strides(x, shape), x.offset)
    mb = mask.view_as(shape, K.bcast_strides(mask, shape), mask.offset)
    return _index(rt, xb, [mb])


def _index_put(inplace: bool):
    def run(rt: Runtime, x: WGTensor, indices: Sequence[WGTensor | None], values: WGTensor,
            accumulate: bool = False) -> WGTensor:
        """Advanced-index writes (a boolean mask becomes its nonzero coordinates, its count read back); with
        accumulate, every destination sums its values in index order (`selection.accumulate_into`:
        deterministic, no float atomics)."""
        dst = x if inplace else K.copy(rt, x, K.new(rt, x.shape, x.dtype))
        shape, coef, entries = _index_plan(dst, expand_masks(rt, indices))
        if accumulate:
            return accumulate_into(rt, dst, values, shape, coef, entries)
        return K.scatter(rt, dst, values, shape, coef, entries)
    return run


register("aten.index_put_.default", check=_check_index)(_index_put(True))
register("aten.index_put.default", check=_check_index)(_index_put(False))


@register("aten.embedding.default")
def _embedding(rt: Runtime, w: WGTensor, indices: WGTensor, padding_idx: int = -1, scale_grad_by_freq: bool = False,
               sparse: bool = False) -> WGTensor:
    shape = list(indices.shape) + [w.shape[1]]
    coef = [0] * indices.dim() + [w.stride[1]]
    return K.gather(rt, w, shape, coef, [(indices, list(indices.stride) + [0], w.stride[0], w.shape[0])])


@register("aten.index_select.default")
def _index_select(rt: Runtime, x: WGTensor, dim: int, index: WGTensor) -> WGTensor:
    d = norm_dim(dim, x.dim())
    n = index.numel()
    shape = list(x.shape)
    if shape:
        shape[d] = n
    coef = list(x.stride)
    istr = [0] * len(shape)
    if shape:
        coef[d] = 0
        istr[d] = index.stride[0] if index.dim() else 0
    return K.gather(rt, x, shape, coef, [(index, istr, x.stride[d] if x.dim() else 0, x.shape[d] if x.dim() else 1)])


@register("aten.gather.default")
def _gather(rt: Runtime, x: WGTensor, dim: int, index: WGTensor, *, sparse_grad: bool = False) -> WGTensor:
    d = norm_dim(dim, x.dim())
    coef = [x.stride[i] if i != d else 0 for i in range(index.dim())]
    return K.gather(rt, x, list(index.shape), coef, [(index, list(index.stride), x.stride[d], x.shape[d])])


def _scatter(inplace: bool):
    def run(rt: Runtime, x: WGTensor, dim: int, index: WGTensor, src: Any) -> WGTensor:
        dst = x if inplace else K.copy(rt, x, K.new(rt, x.shape, x.dtype))
        d = norm_dim(dim, x.dim())
        if not is_t(src):
            src = K.fill(rt, K.new(rt, (), x.dtype), src)
        coef = [dst.stride[i] if i != d else 0 for i in range(index.dim())]
        vals = src.view_as(index.shape, [src.stride[i] for i in range(index.dim())], src.offset) if src.dim() else src
        return K.scatter(rt, dst, vals, list(index.shape), coef,
                         [(index, list(index.stride), dst.stride[d], dst.shape[d])])
    return run


for _ov in ("src", "value"):
    register(f"aten.scatter.{_ov}")(_scatter(False))
    register(f"aten.scatter_.{_ov}")(_scatter(True))


# --- cumulative, sorting, set membership, histograms -------------------------------------------------------

def _cum(kind: str):
    def run(rt: Runtime, x: WGTensor, dim: int, *, dtype: torch.dtype | None = None) -> WGTensor:
        return K.cumulative(rt, kind, x, dim, _sum_dtype(x, dtype))
    return run


register("aten.cumsum.default")(_cum("cumsum"))
register("aten.cumprod.default")(_cum("cumprod"))


def _check_sort(call: OpCall) -> str | None:
    x = call.args[0]
    if x.dim() and max(x.shape) > 65536:
        return "sort/topk along more than 65536 elements is not implemented on WebGPU (rank sort is O(n^2))"
    return None


@register("aten.sort.default", check=_check_sort)
def _sort(rt: Runtime, x: WGTensor, dim: int = -1, descending: bool = False) -> tuple[WGTensor, WGTensor]:
    n = x.shape[norm_dim(dim, x.dim())] if x.dim() else 1
    return K.rank_sort(rt, x, dim, n, descending)


@register("aten.sort.stable", check=_check_sort)
def _sort_stable(rt: Runtime, x: WGTensor, *, stable: bool | None = None, dim: int = -1,
                 descending: bool = False) -> tuple[WGTensor, WGTensor]:
    return _sort(rt, x, dim, descending)


@register("aten.topk.default", check=_check_sort)
def _topk(rt: Runtime, x: WGTensor, k: int, dim: int = -1, largest: bool = True,
          sorted: bool = True) -> tuple[WGTensor, WGTensor]:
    return K.rank_sort(rt, x, dim, k, largest)


@register("aten.isin.Tensor_Tensor")
def _isin(rt: Runtime, x: WGTensor, test: WGTensor, *, assume_unique: bool = False,
          invert: bool = False) -> WGTensor:
    return K.isin(rt, x, test, invert)


@register("aten.isin.Tensor_Scalar")
def _isin_scalar(rt: Runtime, x: WGTensor, test: Any, *, assume_unique: bool = False,
                 invert: bool = False) -> WGTensor:
    ct = opmath(x.dtype)
    return K.ew(rt, "(a == b) != c", [x, test, invert], K.new(rt, x.shape, torch.bool), [ct, ct, "bool"], "bool")


def _check_histc(call: OpCall) -> str | None:
    lo = call.args[2] if len(call.args) > 2 else call.kwargs.get("min", 0)
    hi = call.args[3] if len(call.args) > 3 else call.kwargs.get("max", 0)
    if lo >= hi:
        return "histc with min >= max takes its range from the data; not implemented on WebGPU"
    return None


@register("aten.histc.default", check=_check_histc)
def _histc(rt: Runtime, x: WGTensor, bins: int = 100, min: float = 0, max: float = 0) -> WGTensor:
    return K.histc(rt, x, bins, float(min), float(max))

"""Host side of the kernels: turn handles into parameter words and dispatches (one function per kernel family).

It speaks handles and plain numbers; ATen argument conventions live in `ops.py`, WGSL text in `wgsl.py`.
Nothing here reads tensor data back: all values are computed on the device.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence

import torch

from tapml.backends.webgpu import wgsl
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
_I_HELPER = re.compile(r"\bi_(pow|floordiv|rem|fmod)\(")


# --- elementwise -------------------------------------------------------------------------------------------

def ew(rt: Runtime, expr: str, operands: Sequence, out: WGTensor, cts: Sequence[str], rtype: str,
       coords: bool = False) -> WGTensor:
    """out = expr(a, b, ...): tensors broadcast to out's shape, scalars packed as words of their ct.

    The geometry work (broadcast, coalescing, kernel choice) is planned once per layout and cached on the
    runtime; a call with a known layout only fills in offsets and scalars."""
    key = (expr, out.shape, out.stride, out.dtype, out.offset & 3, tuple(cts), rtype, coords,
           tuple((o.shape, o.stride, o.dtype, o.offset & 3, o.storage is out.storage) if type(o) is WGTensor
                 else type(o) for o in operands))
    plan = rt.plans.get(key)
    if plan is None:
        if out.numel() == 0:
            return out
        plan = _ew_plan(rt, expr, operands, out, cts, rtype, coords)
        if len(rt.plans) > 50000:
            rt.plans.clear()
        rt.plans[key] = plan
    kernel, params, offset_at, vec, bound, scalars, groups = plan
    params = params.copy()
    tens = [out] + [o for o in operands if type(o) is WGTensor]
    for at, t in zip(offset_at, tens):
        params[at] = t.offset >> 2 if vec else t.offset
    for i, ct in scalars:
        params += words(operands[i], ct)
    rt.dispatch(kernel, [out.buf] + [operands[i].buf for i in bound], params, groups)
    return out


def _ew_plan(rt: Runtime, expr: str, operands: Sequence, out: WGTensor, cts: Sequence[str], rtype: str,
             coords: bool) -> tuple:
    numel = out.numel()
    cts = [native_ct(rt, c) for c in cts]
    rtype = native_ct(rt, rtype)
    if "i64" in cts or rtype == "i64":
        expr = _I_HELPER.sub(r"l_\1(", expr)
    expr = expr.replace("IT(", ("i64(" if "i64" in (rtype, *cts) else "i32("))
    shape = list(out.shape)
    tens = [out] + [o for o in operands if isinstance(o, WGTensor)]
    strides = [list(out.stride)] + [bcast_strides(t, shape) for t in tens[1:]]
    if coords:
        if len(shape) < 2:
            raise TapmlError("webgpu: row/col kernels need at least 2 dims")
        cshape, cstrides = shape, strides
    else:
        cshape, cstrides = coalesce(shape, strides)
    nd = len(cshape)
    if nd > MAXD:
        raise TapmlError(f"webgpu: elementwise over {nd} non-mergeable dims (max {MAXD})")
    vec = (not coords and nd == 1 and numel % 4 == 0 and all(s[0] == 1 for s in cstrides)
           and all(t.offset % 4 == 0 and t.info.size == 4 for t in tens))
    # An input in the output's buffer (in-place ops) is read through the output binding: WebGPU forbids
    # binding one buffer as read-write and read-only in the same dispatch.
    spec = tuple((("o" if o.storage is out.storage else "t"), o.info.storage, ct) if isinstance(o, WGTensor)
                 else ("s", ct) for o, ct in zip(operands, cts))
    ospec = (out.info.storage, out.info.wrap, rtype)
    bound = [i for i, o in enumerate(operands) if isinstance(o, WGTensor) and o.storage is not out.storage]
    kernel = rt.kernel(("ew", expr, spec, ospec, nd, vec, coords),
                       lambda: wgsl.elementwise(nd, spec, ospec, expr, vec, coords)[0], "w" + "r" * len(bound),
                       "elementwise")
    if vec:
        params = [numel // 4] + [0] * len(tens)
        offset_at = list(range(1, 1 + len(tens)))
        groups = -(-numel // 4 // 256)
    else:
        params, offset_at = [numel] + cshape, []
        for s in cstrides:
            offset_at.append(len(params))
            params += [0] + s
        groups = -(-numel // 256)
    scalars = [(i, ct) for i, (o, ct) in enumerate(zip(operands, cts)) if not isinstance(o, WGTensor)]
    return kernel, params, offset_at, vec, bound, scalars, rt.grid(groups)


def copy(rt: Runtime, src: WGTensor, dst: WGTensor) -> WGTensor:
    """dst[...] = src (broadcast, any strides, dtype conversion)."""
    ct = src.info.ct if src.info.ct != "bool" else ("bool" if dst.dtype == torch.bool else "i32")
    if ct in ("i32", "i64") and dst.info.ct == "i64":
        ct = "i64"
    return ew(rt, "a", [src], dst, [ct], ct)


def contiguous(rt: Runtime, x: WGTensor) -> WGTensor:
    if x.is_contiguous():
        return x
    return copy(rt, x, new(rt, x.shape, x.dtype))


def fill(rt: Runtime, out: WGTensor, value: float | bool) -> WGTensor:
    ct = out.info.ct
    return ew(rt, "a", [value], out, [ct], ct)


# --- reductions and rows -----------------------------------------------------------------------------------

def _dims(dims: Sequence[int] | None, nd: int) -> list[int]:
    if dims is None or len(dims) == 0:
        return list(range(nd))
    return sorted({d % nd if nd else 0 for d in dims})


def reduce(rt: Runtime, kind: str, x: WGTensor, dims: Sequence[int] | None, keepdim: bool,
           out_dtype: torch.dtype, ct: str, scalar: float | None = None) -> WGTensor | tuple[WGTensor, WGTensor]:
    """Reduce `x` over `dims` (None/empty: all). max/min return (values, int64 indices)."""
    nd = x.dim()
    red = _dims(dims, nd) if nd else []
    outer = [d for d in range(nd) if d not in red]
    out_shape = [1 if d in red else x.shape[d] for d in range(nd)] if keepdim else [x.shape[d] for d in outer]
    out = new(rt, out_shape, out_dtype)
    idx = new(rt, out_shape, torch.int64) if kind in ("max", "min") else None
    rows = math.prod(x.shape[d] for d in outer)
    n = math.prod(x.shape[d] for d in red)
    if rows == 0:
        return (out, idx) if idx is not None else out
    if n == 0:
        if kind in ("sum", "any", "norm2", "norm1", "norm0", "normp"):
            fill(rt, out, 0)
            return out
        if kind in ("prod", "all"):
            fill(rt, out, 1)
            return out
        raise TapmlError(f"webgpu: {kind} of an empty tensor")
    oshape, (ostr,) = coalesce([x.shape[d] for d in outer], [[x.stride[d] for d in outer]])
    rshape, (rstr,) = coalesce([x.shape[d] for d in red], [[x.stride[d] for d in red]])
    if rows == 1:
        oshape, ostr = [], []
    no, nr = len(oshape), len(rshape)
    if no > MAXD or nr > MAXD:
        raise TapmlError("webgpu: reduction over too many non-mergeable dims")
    wg = 256 if n >= 4096 else 64
    inp = (x.info.storage, native_ct(rt, ct))
    o = (out.info.storage, out.info.wrap)
    ist = idx.info.storage if idx is not None else "i32"
    k = rt.kernel(("reduce", kind, no, nr, inp, o, wg, ist), lambda: wgsl.reduce(kind, no, nr, inp, o, wg, ist)[0],
                  "wwr" if idx is not None else "wr", f"reduce-{kind}")
    params = [rows, n, x.offset, out.offset] + oshape + ostr + rshape + rstr
    if idx is not None:
        params.append(idx.offset)
    elif scalar is not None:
        params.append(fbits(scalar))
    bufs = [out.buf] + ([idx.buf] if idx is not None else []) + [x.buf]
    rt.dispatch(k, bufs, params, rows)
    return (out, idx) if idx is not None else out


def _rows(x: WGTensor, dim: int, out: WGTensor) -> tuple[list[int], int, int]:
    """Params of the row layout (see wgsl.rows_prelude) for rows along `dim`; returns (params, rows, no)."""
    nd = x.dim()
    outer = [d for d in range(nd) if d != dim]
    oshape, (xs, os_) = coalesce([x.shape[d] for d in outer], [[x.stride[d] for d in outer],
                                                               [out.stride[d] for d in outer]])
    rows = math.prod(x.shape[d] for d in outer)
    if rows == 1:
        oshape, xs, os_ = [], [], []
    n = x.shape[dim] if nd else 1
    xst = x.stride[dim] if nd else 0
    ost = out.stride[dim] if nd else 0
    return [rows, n, x.offset, xst, out.offset, ost] + oshape + xs + os_, rows, len(oshape)


def softmax(rt: Runtime, kind: str, x: WGTensor, dim: int, out_dtype: torch.dtype) -> WGTensor:
    out = new(rt, x.shape, out_dtype)
    if out.numel() == 0:
        return out
    dim = dim % x.dim() if x.dim() else 0
    params, rows, no = _rows(x, dim, out)
    wg = 256 if params[1] >= 4096 else 64
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    k = rt.kernel(("softmax", kind, no, st, ost, wrap, wg), lambda: wgsl.softmax(kind, no, st, ost, wrap, wg)[0],
                  "wr", kind)
    rt.dispatch(k, [out.buf, x.buf], params, rows)
    return out


def dense0(rt: Runtime, t: WGTensor) -> WGTensor:
    """`t` itself when contiguous at offset 0, else a fresh contiguous copy (kernels that index it flat)."""
    if t.offset == 0 and t.is_contiguous():
        return t
    return copy(rt, t, new(rt, t.shape, t.dtype))


def layer_norm(rt: Runtime, x: WGTensor, n_norm: int, weight: WGTensor | None, bias: WGTensor | None,
               eps: float) -> tuple[WGTensor, WGTensor, WGTensor]:
    """Normalize over the last `n_norm` dims. Returns (out, mean, rstd) with mean/rstd keeping those dims as 1."""
    nd = x.dim()
    lead = list(x.shape[: nd - n_norm])
    n = math.prod(x.shape[nd - n_norm:])
    inner = list(range(nd - n_norm, nd))
    ishape, (istr,) = coalesce([x.shape[d] for d in inner], [[x.stride[d] for d in inner]])
    if len(ishape) != 1:
        x = contiguous(rt, x)
        istr = [1]
    flat = x.view_as(lead + [n], [x.stride[d] for d in range(nd - n_norm)] + [istr[0]], x.offset)
    out = new(rt, x.shape, x.dtype)
    stat_shape = lead + [1] * n_norm
    mean, rstd = new(rt, stat_shape, x.dtype), new(rt, stat_shape, x.dtype)  # (torch: the input's dtype)
    rows = math.prod(lead)
    if rows == 0 or n == 0:
        return out, mean, rstd
    oflat = out.view_as(lead + [n], contiguous_strides(lead + [n]), 0)
    params, rows, no = _rows(flat, len(lead), oflat)
    params += [fbits(eps), 0]
    w = dense0(rt, weight) if weight is not None else None
    b = dense0(rt, bias) if bias is not None else None
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    hw, hb = w is not None, b is not None
    wg = 256 if n >= 4096 else 64
    k = rt.kernel(("layer_norm", no, st, ost, wrap, hw, hb, wg),
                  lambda: wgsl.layer_norm(no, st, ost, wrap, hw, hb, wg)[0], "www" + "r" * (1 + hw + hb),
                  "layer_norm")
    bufs = [out.buf, mean.buf, rstd.buf, flat.buf] + ([w.buf] if hw else []) + ([b.buf] if hb else [])
    rt.dispatch(k, bufs, params, rows)
    return out, mean, rstd


def cumulative(rt: Runtime, kind: str, x: WGTensor, dim: int, out_dtype: torch.dtype) -> WGTensor:
    out = new(rt, x.shape, out_dtype)
    if out.numel() == 0:
        return out
    dim = dim % x.dim() if x.dim() else 0
    params, rows, no = _rows(x, dim, out)
    ct = out.info.ct if out.info.ct != "bool" else "i32"
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    k = rt.kernel(("cum", kind, no, st, ct, ost, wrap), lambda: wgsl.cumulative(kind, no, st, ct, ost, wrap)[0],
                  "wr", kind)
    rt.dispatch(k, [out.buf, x.buf], params, -(-rows // 64))
    return out


def rank_sort(rt: Runtime, x: WGTensor, dim: int, k: int, descending: bool) -> tuple[WGTensor, WGTensor]:
    """The first k elements along `dim` in sorted order (stable) and their int64 indices."""
    dim = dim % x.dim() if x.dim() else 0
    shape = list(x.shape)
    if shape:
        shape[dim] = k
    vals, idx = new(rt, shape, x.dtype), new(rt, shape, torch.int64)
    if x.numel() == 0 or k == 0:
        return vals, idx
    params, rows, no = _rows(x, dim, vals)
    # indices share the values' (fresh, contiguous, same-shape) layout
    params += [k, int(descending), idx.offset, params[5]] + params[6 + 2 * no: 6 + 3 * no]
    ct = x.info.ct if x.info.ct != "bool" else "i32"
    st, ist = x.info.storage, idx.info.storage
    kern = rt.kernel(("rank", no, st, ct, vals.info.storage, vals.info.wrap, ist),
                     lambda: wgsl.rank_sort(no, st, ct, vals.info.storage, vals.info.wrap, ist)[0], "wwr", "sort")
    total = rows * (x.shape[dim] if x.dim() else 1)
    rt.dispatch(kern, [vals.buf, idx.buf, x.buf], params, -(-total // 64))
    return vals, idx


# --- matmul ------------------------------------------------------------------------------------------------

# (BM, BN, BK, TM, TN) of the register-blocked vec4 kernel: the best of a sweep on an H100 at 1024^3 and
# 4096^3 (benchmarks/webgpu_kernels.py --sweep prints the table).
FAST_CFG = (64, 128, 16, 8, 8)
FAST: tuple | None = None  # a fixed configuration to try instead (the sweep sets it)


def fast_cfg(m: int, n: int) -> tuple:
    return FAST or FAST_CFG


def _cfg(rt: Runtime, m: int, n: int) -> tuple[int, int, int, int, int]:
    """Tiles of the general (any strides, any size) kernel: thin for decode-shaped products."""
    if m <= 4:
        return (4, 64, 16, 1, 4)
    if m <= 16:
        return (16, 64, 16, 2, 4)
    if rt.is_cpu or m * n <= 128 * 128:
        return (32, 32, 16, 4, 4)
    return (64, 64, 16, 4, 4)


def matmul(rt: Runtime, a: WGTensor, b: WGTensor, bias: WGTensor | None = None, alpha: float = 1.0,
           beta: float = 1.0, out: WGTensor | None = None, fast: bool | None = None) -> WGTensor:
    """alpha * a @ b (+ beta * bias) for a [B?, M, K], b [B?, K, N] (any strides); bias broadcasts to the
    output. Returns a contiguous [B?, M, N] tensor (or writes `out`)."""
    batched = a.dim() == 3
    a3 = a if batched else a.view_as((1,) + a.shape, (0,) + a.stride, a.offset)
    b3 = b if batched else b.view_as((1,) + b.shape, (0,) + b.stride, b.offset)
    bt, m, kd = a3.shape
    n = b3.shape[2]
    if out is None:
        out = new(rt, (bt, m, n) if batched else (m, n), a.dtype)
    o3 = out if batched else out.view_as((1,) + out.shape, (0,) + out.stride, out.offset)
    if m == 0 or n == 0 or bt == 0:
        return out
    if kd == 0:
        if bias is not None and beta != 0:
            ew(rt, "a * b", [bias, float(beta)], out, ["f32", "f32"], "f32")
        else:
            fill(rt, out, 0.0)
        return out
    bcast_b = bias is not None and beta != 0
    f32 = all(t.dtype == torch.float32 for t in (a, b, out))
    fcfg = fast_cfg(m, n)
    bm, bn, bk, _, _ = fcfg
    aligned = (f32 and not bcast_b and a3.stride[2] == 1 and b3.stride[2] == 1 and o3.stride[2] == 1
               and m % bm == 0 and n % bn == 0 and kd % bk == 0
               and all(v % 4 == 0 for v in (a3.offset, a3.stride[0], a3.stride[1], b3.offset, b3.stride[0],
                                            b3.stride[1], o3.offset, o3.stride[0], o3.stride[1])))
    if fast is None:
        fast = aligned and not rt.is_cpu
    elif fast and not aligned:
        raise TapmlError("webgpu: the fast matmul needs aligned row-major f32 operands")
    params = [m, n, kd, 0, a3.offset, a3.stride[0], a3.stride[1], a3.stride[2],
              b3.offset, b3.stride[0], b3.stride[1], b3.stride[2],
              o3.offset, o3.stride[0], o3.stride[1], o3.stride[2]]
    if bcast_b:
        bs = bcast_strides(bias, o3.shape)
        params += [bias.offset] + bs
    else:
        params += [0, 0, 0, 0]
    params += [fbits(alpha), fbits(beta)]
    if fast:
        k = rt.kernel(("mm_fast", fcfg), lambda: wgsl.matmul_fast(fcfg)[0], "wrr", "matmul_fast")
        rt.dispatch(k, [out.buf, a.buf, b.buf], params, (n // bn, m // bm, bt))
        return out
    cfg = _cfg(rt, m, n)
    spec = cfg + (a3.stride[2] == 1 or a3.stride[1] != 1, b3.stride[2] == 1 or b3.stride[1] != 1)
    sa, sb = a.info.storage, b.info.storage
    sc = bias.info.storage if bcast_b else None
    so, wrap = out.info.storage, out.info.wrap
    k = rt.kernel(("mm", spec, sa, sb, sc, so, wrap), lambda: wgsl.matmul(spec, sa, sb, sc, so, wrap)[0],
                  "wrr" + ("r" if bcast_b else ""), "matmul")
    bufs = [out.buf, a.buf, b.buf] + ([bias.buf] if bcast_b else [])
    if bt > rt.max_groups:
        raise TapmlError(f"webgpu: batch of {bt} matrices exceeds the grid limit {rt.max_groups}")
    rt.dispatch(k, bufs, params, (-(-n // cfg[1]), -(-m // cfg[0]), bt))
    return out


def grouped_mm(rt: Runtime, a: WGTensor, b: WGTensor, offs: WGTensor) -> WGTensor:
    m, kd = a.shape
    g, _, n = b.shape
    out = new(rt, (m, n), a.dtype)
    if out.numel() == 0:
        return out
    st, ost, wrap = a.info.storage, out.info.storage, out.info.wrap
    gst = offs.info.storage
    k = rt.kernel(("gmm", st, ost, wrap, gst), lambda: wgsl.grouped_mm(st, ost, wrap, gst)[0], "wrrr", "grouped_mm")
    params = [m, n, kd, g, a.offset, a.stride[0], a.stride[1], b.offset, b.stride[0], b.stride[1], b.stride[2],
              offs.offset, offs.stride[0], 0, n, 1]
    rt.dispatch(k, [out.buf, a.buf, b.buf, offs.buf], params, -(-m * n // 64))
    return out


# --- attention, convolution, pooling -----------------------------------------------------------------------

def attention(rt: Runtime, q: WGTensor, k: WGTensor, v: WGTensor, mask: WGTensor | None, scale: float,
              causal: bool) -> tuple[WGTensor, WGTensor]:
    """softmax(q k^T * scale + mask) v for [B, H, L, E] inputs; returns (out [B,H,L,Ev], logsumexp [B,H,L])."""
    bsz, h, seq_l, e = q.shape
    hk, seq_s = k.shape[1], k.shape[2]
    ev = v.shape[3]
    out = new(rt, (bsz, h, seq_l, ev), q.dtype)
    lse = new(rt, (bsz, h, seq_l), torch.float32)
    if out.numel() == 0:
        return out, lse
    wg = 64
    ept = max(1, -(-max(e, ev) // wg))
    mkind = None
    params = [bsz, h, seq_l, seq_s, e, ev, h // hk, fbits(scale), int(causal)]
    params += [q.offset] + list(q.stride) + [k.offset] + list(k.stride) + [v.offset] + list(v.stride)
    bufs = [out.buf, lse.buf, q.buf, k.buf, v.buf]
    if mask is not None:
        mkind = "b" if mask.dtype == torch.bool else mask.info.storage
        params += [mask.offset] + bcast_strides(mask, (bsz, h, seq_l, seq_s))
        bufs.append(mask.buf)
    else:
        params += [0, 0, 0, 0, 0]
    params += [out.offset] + list(out.stride) + [lse.offset] + list(lse.stride)
    st = q.info.storage
    kern = rt.kernel(("attn", st, mkind, ept, wg), lambda: wgsl.attention(st, mkind, ept, wg)[0],
                     "wwrrr" + ("r" if mask is not None else ""), "attention")
    rt.dispatch(kern, bufs, params, bsz * h * seq_l)
    return out, lse


def conv2d(rt: Runtime, x: WGTensor, w: WGTensor, bias: WGTensor | None, stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int, out_shape: Sequence[int]) -> WGTensor:
    n, cin, hh, ww = x.shape
    cout, _, kh, kw = w.shape
    out = new(rt, out_shape, x.dtype)
    if out.numel() == 0:
        return out
    oh, ow = out_shape[2], out_shape[3]
    params = [n, cin, hh, ww, cout, oh, ow, kh, kw, stride[0], stride[1], padding[0], padding[1],
              dilation[0], dilation[1], groups]
    params += [x.offset] + list(x.stride) + [w.offset] + list(w.stride)
    params += [bias.offset, bias.stride[0]] if bias is not None else [0, 0]
    params += [out.offset] + list(out.stride)
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    k = rt.kernel(("conv2d", st, ost, wrap, bias is not None),
                  lambda: wgsl.conv2d(st, ost, wrap, bias is not None)[0], "wrr" + ("r" if bias is not None else ""),
                  "conv2d")
    bufs = [out.buf, x.buf, w.buf] + ([bias.buf] if bias is not None else [])
    rt.dispatch(k, bufs, params, -(-out.numel() // 64))
    return out


def pool2d(rt: Runtime, kind: str, x: WGTensor, out_hw: Sequence[int], kernel: Sequence[int] = (1, 1),
           stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
           count_include_pad: bool = True, divisor: int | None = None) -> tuple[WGTensor, WGTensor | None]:
    """x is [N, C, H, W] (a 3-d input is passed as N=1). Returns (out, indices or None)."""
    n, c, hh, ww = x.shape
    oh, ow = out_hw
    out = new(rt, (n, c, oh, ow), x.dtype)
    idx = new(rt, (n, c, oh, ow), torch.int64) if kind == "max" else None
    if out.numel() == 0:
        return out, idx
    params = [n * c, c, hh, ww, oh, ow, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1],
              dilation[0], dilation[1], int(count_include_pad), divisor or 0]
    params += [x.offset] + list(x.stride) + [out.offset, idx.offset if idx is not None else 0]
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    ist = idx.info.storage if idx is not None else "i32"
    k = rt.kernel(("pool", kind, st, ost, wrap, ist), lambda: wgsl.pool2d(kind, st, ost, wrap, ist)[0],
                  "wwr" if idx is not None else "wr", f"pool-{kind}")
    bufs = [out.buf] + ([idx.buf] if idx is not None else []) + [x.buf]
    rt.dispatch(k, bufs, params, -(-out.numel() // 64))
    return out, idx


# --- indexing ----------------------------------------------------------------------------------------------

def gather(rt: Runtime, src: WGTensor, shape: Sequence[int], src_coef: Sequence[int],
           index: Sequence[tuple[WGTensor, Sequence[int], int, int]], out: WGTensor | None = None,
           out_strides: Sequence[int] | None = None) -> WGTensor:
    """out[c] = src[off + sum c_d*coef_d + sum_k idx_k[c] * dimstride_k] over index space `shape`.

    index: (idx tensor, its strides over the index space, source dim stride, source dim size)."""
    if out is None:
        out = new(rt, shape, src.dtype)
    numel = math.prod(shape)
    if numel == 0:
        return out
    nd = len(shape)
    if nd > MAXD:
        raise TapmlError("webgpu: indexing over too many dims")
    ostr = list(out_strides) if out_strides is not None else list(out.stride)
    params = [numel] + list(shape) + [out.offset] + ostr + [src.offset] + list(src_coef)
    for t, strides, dstride, dsize in index:
        params += [t.offset] + list(strides) + [dstride, dsize]
    ct = src.info.ct if src.info.ct != "bool" else "i32"
    if out.dtype == torch.bool:
        ct = "bool"
    ist = tuple(t.info.storage for t, *_ in index)
    st, ost, wrap = src.info.storage, out.info.storage, out.info.wrap
    k = rt.kernel(("gather", nd, len(index), st, ct, ost, wrap, ist),
                  lambda: wgsl.gather(nd, len(index), st, ct, ost, wrap, ist, False)[0], "wr" + "r" * len(index),
                  "gather")
    rt.dispatch(k, [out.buf, src.buf] + [t.buf for t, *_ in index], params, -(-numel // 256))
    return out


def scatter(rt: Runtime, dst: WGTensor, values: WGTensor, shape: Sequence[int], dst_coef: Sequence[int],
            index: Sequence[tuple[WGTensor, Sequence[int], int, int]], accumulate: bool = False) -> WGTensor:
    """dst[off + sum c_d*coef_d + sum_k idx_k[c]*dimstride_k] (+)= values[c] over index space `shape`."""
    numel = math.prod(shape)
    if numel == 0:
        return dst
    if values.dtype != dst.dtype:
        values = copy(rt, values, new(rt, values.shape, dst.dtype))
    nd = len(shape)
    params = [numel] + list(shape) + [values.offset] + bcast_strides(values, shape) + [dst.offset] + list(dst_coef)
    for t, strides, dstride, dsize in index:
        params += [t.offset] + list(strides) + [dstride, dsize]
    ist = tuple(t.info.storage for t, *_ in index)
    st = dst.info.storage
    k = rt.kernel(("scatter", nd, len(index), st, ist, accumulate),
                  lambda: wgsl.gather(nd, len(index), st, "", st, "", ist, True, accumulate)[0],
                  "wr" + "r" * len(index), "scatter")
    rt.dispatch(k, [dst.buf, values.buf] + [t.buf for t, *_ in index], params, -(-numel // 256))
    return dst


def isin(rt: Runtime, x: WGTensor, test: WGTensor, invert: bool) -> WGTensor:
    xc, tc = contiguous(rt, x), contiguous(rt, test)
    out = new(rt, x.shape, torch.bool)
    if out.numel() == 0:
        return out
    ct = "f32" if x.info.ct == "f32" or test.info.ct == "f32" else (
        "i64" if "i64" in (x.info.ct, test.info.ct) else "i32")
    st, tst = xc.info.storage, tc.info.storage
    k = rt.kernel(("isin", st, tst, ct), lambda: wgsl.isin(st, tst, ct)[0], "wrr", "isin")
    rt.dispatch(k, [out.buf, xc.buf, tc.buf], [out.numel(), tc.numel(), xc.offset, tc.offset, int(invert)],
                -(-out.numel() // 256))
    return out


def histc(rt: Runtime, x: WGTensor, bins: int, lo: float, hi: float) -> WGTensor:
    xc = contiguous(rt, x)
    counts = new(rt, (bins,), torch.int32)
    fill(rt, counts, 0)
    st = xc.info.storage
    k = rt.kernel(("histc", st), lambda: wgsl.histc(st)[0], "wr", "histc")
    if xc.numel():
        rt.dispatch(k, [counts.buf, xc.buf], [xc.numel(), bins, xc.offset, fbits(lo), fbits(hi)],
                    -(-xc.numel() // 256))
    return copy(rt, counts, new(rt, (bins,), x.dtype))

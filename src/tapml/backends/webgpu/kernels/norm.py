"""Row normalizations: softmax / log_softmax / safe_softmax and layer norm, each WGSL beside its launcher.

They walk rows laid out by `rows.py`; ATen argument conventions (dims, dtypes, affine weights) stay in the
handlers.
"""

from __future__ import annotations

import math

import torch

from tapml.backends.webgpu.kernels.elementwise import contiguous, copy
from tapml.backends.webgpu.kernels.host import coalesce, fbits, new
from tapml.backends.webgpu.kernels.prelude import ENTRY, Slots, access, header, load, store, tree
from tapml.backends.webgpu.kernels.rows import ROWS, row_loop, row_values, rows_prelude
from tapml.backends.webgpu.runtime import Runtime, WGTensor, contiguous_strides

SOFTMAX = Slots(*ROWS)
# + eps, and the offset of the mean and rstd outputs (fresh tensors, indexed by row)
LAYER_NORM = Slots(*ROWS, "eps stat_off")


def softmax_wgsl(kind: str, no: int, st: str, ost: str, owrap: str, wg: int) -> tuple[str, str]:
    """kind: softmax, log_softmax or safe_softmax (rows of only -inf give zeros) along one dim.
    Three passes over the row, as torch forms it: the max, the sum of exp(x - max), the write."""
    p = SOFTMAX.bind(no=no)
    binds = [("o", "w", ost), ("x", "r", st)]
    src = [header(binds, wg), f"var<workgroup> sh: array<f32, {wg}>;\n", ENTRY.format(wg=wg)]
    src.append(f"  let row = wid.x + wid.y * nwg.x;\n  if (row >= {p.u.rows}) {{ return; }}\n"
               f"  let n = {p.u.n};\n")
    src.append(rows_prelude(p))
    ld = load(st, "f32", "x[xb + j * xs]")
    src.append("  var m = -f_inf();\n  {\n" + row_loop(ld, "m = f_max(m, v);") + "  }\n"
               "  sh[lid] = m;\n  workgroupBarrier();\n" + tree("sh", "f_max({a}, {b})")
               + "  m = sh[0];\n  workgroupBarrier();\n")
    src.append("  let mm = select(m, 0.0, is_inf(m) && m < 0.0);\n")
    src.append("  var s = 0.0;\n  {\n" + row_loop(ld, "s = s + t_exp(v - mm);") + "  }\n"
               "  sh[lid] = s;\n  workgroupBarrier();\n" + tree("sh", "{a} + {b}") + "  s = sh[0];\n")
    if kind == "log_softmax":
        val = "v - mm - t_log(s)"
    elif kind == "safe_softmax":
        val = "select(t_exp(v - mm) / s, 0.0, is_inf(m) && m < 0.0)"
    else:
        val = "t_exp(v - mm) / s"
    src.append("  {\n" + row_loop(ld, f"o[ob + j * os] = {store('f32', ost, owrap, val)};") + "  }\n}\n")
    return "".join(src), access(binds)


def layer_norm_wgsl(no: int, st: str, ost: str, owrap: str, affine_w: bool, affine_b: bool,
                    wg: int) -> tuple[str, str]:
    """Rows of n elements (stride xs): out = (x - mean) * rstd * w + b; also mean and rstd per row.
    Weight and bias are contiguous vectors of n. Params: LAYER_NORM."""
    binds = [("o", "w", ost), ("om", "w", ost), ("orr", "w", ost), ("x", "r", st)]
    if affine_w:
        binds.append(("w", "r", st))
    if affine_b:
        binds.append(("bb", "r", st))
    p = LAYER_NORM.bind(no=no)
    src = [header(binds, wg), f"var<workgroup> sh: array<f32, {wg}>;\n", ENTRY.format(wg=wg)]
    src.append(f"  let row = wid.x + wid.y * nwg.x;\n  if (row >= {p.u.rows}) {{ return; }}\n"
               f"  let n = {p.u.n};\n")
    src.append(rows_prelude(p))
    ld = load(st, "f32", "x[xb + j * xs]")
    src.append(f"  var s = 0.0;\n  for (var j = lid; j < n; j = j + WG) {{ s = s + {ld}; }}\n"
               "  sh[lid] = s;\n  workgroupBarrier();\n" + tree("sh", "{a} + {b}")
               + "  let mean = sh[0] / f32(n);\n  workgroupBarrier();\n")
    src.append(f"  var q = 0.0;\n  for (var j = lid; j < n; j = j + WG) {{ let d = {ld} - mean; q = q + d * d; }}\n"
               "  sh[lid] = q;\n  workgroupBarrier();\n" + tree("sh", "{a} + {b}")
               + f"  let rstd = 1.0 / sqrt(sh[0] / f32(n) + {p.f.eps});\n")
    val = "(v - mean) * rstd"
    if affine_w:
        val = f"{val} * {load(st, 'f32', 'w[j]')}"
    if affine_b:
        val = f"{val} + {load(st, 'f32', 'bb[j]')}"
    src.append(f"  for (var j = lid; j < n; j = j + WG) {{\n    let v = {ld};\n"
               f"    o[ob + j * os] = {store('f32', ost, owrap, val)};\n  }}\n"
               f"  if (lid == 0u) {{\n    om[{p.u.stat_off} + row] = {store('f32', ost, owrap, 'mean')};\n"
               f"    orr[{p.u.stat_off} + row] = {store('f32', ost, owrap, 'rstd')};\n  }}\n}}\n")
    return "".join(src), access(binds)


def softmax(rt: Runtime, kind: str, x: WGTensor, dim: int, out_dtype: torch.dtype) -> WGTensor:
    out = new(rt, x.shape, out_dtype)
    if out.numel() == 0:
        return out
    values, no = row_values(x, dim, out)
    wg = 256 if values["n"] >= 4096 else 64
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    k = rt.kernel(("softmax", kind, no, st, ost, wrap, wg),
                  lambda: softmax_wgsl(kind, no, st, ost, wrap, wg), kind)
    rt.dispatch(k, [out.buf, x.buf], SOFTMAX.bind(no=no).pack(**values), values["rows"])
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
    values, no = row_values(flat, len(lead), oflat)
    params = LAYER_NORM.bind(no=no).pack(**values, eps=fbits(eps), stat_off=0)
    w = dense0(rt, weight) if weight is not None else None
    b = dense0(rt, bias) if bias is not None else None
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    hw, hb = w is not None, b is not None
    wg = 256 if n >= 4096 else 64
    k = rt.kernel(("layer_norm", no, st, ost, wrap, hw, hb, wg),
                  lambda: layer_norm_wgsl(no, st, ost, wrap, hw, hb, wg), "layer_norm")
    bufs = [out.buf, mean.buf, rstd.buf, flat.buf] + ([w.buf] if hw else []) + ([b.buf] if hb else [])
    rt.dispatch(k, bufs, params, rows)
    return out, mean, rstd

"""Reductions over any set of dims (sum .. norms, var/std/logsumexp, argmax/argmin, max/min with indices):
the WGSL and its launcher. One workgroup per output element; ATen argument conventions stay in the handlers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tapml.backends.webgpu.kernels.elementwise import fill
from tapml.backends.webgpu.kernels.host import MAXD, coalesce, fbits, native_ct, new
from tapml.backends.webgpu.kernels.prelude import (
    ENTRY,
    ONE,
    ZERO,
    Slots,
    access,
    decompose,
    header,
    load,
    store,
    tree,
)
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.errors import TapmlError

# kind -> (accumulator type, init, combine of {a} and {b}, map of the loaded value x, final of acc);
# {ct} {zero} {one} {lowest} {highest} {max} {min} are filled per compute type; pf(SC) reads the `extra` slot.
REDUCE = {
    "sum": ("{ct}", "{zero}", "{a} + {b}", "x", "acc"),
    "mean": ("f32", "0.0", "{a} + {b}", "f32(x)", "acc / f32(n)"),
    "prod": ("{ct}", "{one}", "{a} * {b}", "x", "acc"),
    "amax": ("{ct}", "{lowest}", "{max}({a}, {b})", "x", "acc"),
    "amin": ("{ct}", "{highest}", "{min}({a}, {b})", "x", "acc"),
    "any": ("u32", "0u", "{a} | {b}", "select(0u, 1u, x)", "acc != 0u"),
    "all": ("u32", "1u", "{a} & {b}", "select(0u, 1u, x)", "acc != 0u"),
    "norm2": ("f32", "0.0", "{a} + {b}", "f32(x) * f32(x)", "sqrt(acc)"),
    "norm1": ("f32", "0.0", "{a} + {b}", "abs(f32(x))", "acc"),
    "norminf": ("f32", "0.0", "f_max({a}, {b})", "abs(f32(x))", "acc"),
    "norm-inf": ("f32", "f_inf()", "f_min({a}, {b})", "abs(f32(x))", "acc"),
    "norm0": ("f32", "0.0", "{a} + {b}", "select(1.0, 0.0, f32(x) == 0.0)", "acc"),
    "normp": ("f32", "0.0", "{a} + {b}", "t_pow(abs(f32(x)), pf(SC))", "t_pow(acc, 1.0 / pf(SC))"),
}
_RT = {"any": "bool", "all": "bool"}

# `rows` outputs, each reducing `n` elements: offsets, the outer (kept) dims and the reduced dims, each
# coalesced. `extra` is one word for the kinds in _EXTRA (else none): the norm order p, the var/std
# divisor n - correction, or the offset of max/min's index output.
SLOTS = Slots("rows n x_off o_off", "oshape:no ost:no rshape:nr rst:nr", "extra:ne")
_EXTRA = ("normp", "var", "std", "max", "min")


def reduce_wgsl(kind: str, no: int, nr: int, inp: tuple, out: tuple, wg: int,
                ist: str = "i32") -> tuple[str, str]:
    """One workgroup per output element: out[row] = reduce over the reduced dims.

    inp: (storage, ct); out: (storage, wrap). Params: SLOTS.
    Kinds: REDUCE, var/std/logsumexp (two passes), argmax/argmin, max/min (value and index outputs).
    """
    st, ct = inp
    ost, owrap = out
    p = SLOTS.bind(no=no, nr=nr, ne=int(kind in _EXTRA))
    two = kind in ("max", "min")
    binds = [("o", "w", ost)] + ([("oi", "w", ist)] if two else []) + [("x", "r", st)]
    head = header(binds, wg)
    body = [(f"  let row = wid.x + wid.y * nwg.x;\n  if (row >= {p.u.rows}) {{ return; }}\n"
             f"  let n = {p.u.n};\n"),
            decompose("row", p.u.oshape, "q"),
            f"  let base = {p.u.x_off}{''.join(f' + q{d} * {s}' for d, s in enumerate(p.u.ost))};\n"]
    dec = decompose("j", p.u.rshape, "k").replace("\n  ", "\n    ").strip()
    off = " + ".join(["base"] + [f"k{d} * {s}" for d, s in enumerate(p.u.rst)])
    item = f"    {dec}\n    let x = {load(st, ct, f'x[{off}]')};\n" if dec else f"    let x = {load(st, ct, f'x[{off}]')};\n"
    loop = "  for (var j = lid; j < n; j = j + WG) {{\n" + item.replace("{", "{{").replace("}", "}}") + "{body}  }}\n"
    lowest = {"f32": "-f_inf()", "i32": "(-2147483647 - 1)", "i64": "(-9223372036854775807li - 1li)",
              "bool": "false"}[ct]
    highest = {"f32": "f_inf()", "i32": "2147483647", "i64": "9223372036854775807li", "bool": "true"}[ct]
    if kind in ("argmax", "argmin", "max", "min"):
        gt = kind in ("argmax", "max")
        op = ">" if gt else "<"
        if ct == "f32":  # NaN wins (torch propagates it)
            better = f"(is_nan(X) && !is_nan(Y)) || (!is_nan(Y) && X {op} Y)"
        else:
            better = f"X {op} Y"
        init = lowest if gt else highest
        decl = f"var<workgroup> sv: array<{ct}, {wg}>;\nvar<workgroup> si: array<u32, {wg}>;\n"
        body.append(f"  var bv: {ct} = {init};\n  var bi: u32 = 0xffffffffu;\n")
        body.append(loop.format(body=f"    if (bi == 0xffffffffu || {better.replace('X', 'x').replace('Y', 'bv')}) "
                                     "{ bv = x; bi = j; }\n"))
        pick = better.replace("X", "ov").replace("Y", "sv[lid]")
        body.append("  sv[lid] = bv;\n  si[lid] = bi;\n  workgroupBarrier();\n"
                    "  for (var s = WG / 2u; s > 0u; s = s >> 1u) {\n    if (lid < s) {\n"
                    "      let ov = sv[lid + s];\n      let oi = si[lid + s];\n"
                    f"      if (oi != 0xffffffffu && (si[lid] == 0xffffffffu || ({pick}) || (ov == sv[lid] && oi < si[lid]))) {{\n"
                    "        sv[lid] = ov;\n        si[lid] = oi;\n      }\n    }\n    workgroupBarrier();\n  }\n")
        if two:
            body.append(f"  if (lid == 0u) {{\n    o[{p.u.o_off} + row] = {store(ct, ost, owrap, 'sv[0]')};\n"
                        f"    oi[{p.u.extra[0]} + row] = {ist}(si[0]);\n  }}\n}}\n")
        else:
            value = store("i32", ost, owrap, "i32(si[0])")
            body.append(f"  if (lid == 0u) {{ o[{p.u.o_off} + row] = {value}; }}\n}}\n")
        return head + decl + ENTRY.format(wg=wg) + "".join(body), access(binds)
    decl = f"var<workgroup> sh: array<{{t}}, {wg}>;\n"
    if kind in ("var", "std", "logsumexp"):
        if kind == "logsumexp":
            body.append("  var acc = -f_inf();\n" + loop.format(body="    acc = f_max(acc, f32(x));\n")
                        + "  sh[lid] = acc;\n  workgroupBarrier();\n" + tree("sh", "f_max({a}, {b})")
                        + "  let m = sh[0];\n  let mm = select(m, 0.0, is_inf(m));\n  workgroupBarrier();\n"
                        "  acc = 0.0;\n" + loop.format(body="    acc = acc + t_exp(f32(x) - mm);\n"))
            final = "t_log(sh[0]) + mm"
        else:
            body.append("  var acc = 0.0;\n" + loop.format(body="    acc = acc + f32(x);\n")
                        + "  sh[lid] = acc;\n  workgroupBarrier();\n" + tree("sh", "{a} + {b}")
                        + "  let mean = sh[0] / f32(n);\n  workgroupBarrier();\n  acc = 0.0;\n"
                        + loop.format(body="    let d = f32(x) - mean;\n    acc = acc + d * d;\n"))
            final = f"sh[0] / {p.f.extra[0]}" if kind == "var" else f"sqrt(sh[0] / {p.f.extra[0]})"
        body.append("  sh[lid] = acc;\n  workgroupBarrier();\n" + tree("sh", "{a} + {b}"))
        body.append(f"  if (lid == 0u) {{ o[{p.u.o_off} + row] = {store('f32', ost, owrap, final)}; }}\n}}\n")
        return head + decl.format(t="f32") + ENTRY.format(wg=wg) + "".join(body), access(binds)
    fill = dict(ct=ct, zero=ZERO[ct], one=ONE[ct], lowest=lowest,
                highest=highest, max="f_max" if ct == "f32" else "max", min="f_min" if ct == "f32" else "min")
    acc_t, init, comb, xmap, final = (s.format(**fill) if "{a}" not in s else s.replace("{max}", fill["max"])
                                      .replace("{min}", fill["min"]) for s in REDUCE[kind])
    if p.runs["extra"]:
        xmap, final = xmap.replace("pf(SC)", p.f.extra[0]), final.replace("pf(SC)", p.f.extra[0])
    # four loads in flight per thread (independent blocks), then the remainder one by one
    step = "".join(f"    {{\n      let j = j4 + {u}u * WG;\n" + item.replace("\n    ", "\n      ").replace("    let", "      let", 1)
                   + f"      acc = {comb.format(a='acc', b=xmap)};\n    }}\n" for u in range(4))
    body.append(f"  var acc: {acc_t} = {init};\n  var j4 = lid;\n"
                f"  for (; j4 + 3u * WG < n; j4 = j4 + 4u * WG) {{\n{step}  }}\n"
                + loop.replace("var j = lid;", "var j = j4;").format(body=f"    acc = {comb.format(a='acc', b=xmap)};\n")
                + "  sh[lid] = acc;\n  workgroupBarrier();\n" + tree("sh", comb)
                + f"  if (lid == 0u) {{\n    let acc = sh[0];\n"
                f"    o[{p.u.o_off} + row] = {store(_RT.get(kind, acc_t), ost, owrap, final)};\n  }}\n}}\n")
    return head + decl.format(t=acc_t) + ENTRY.format(wg=wg) + "".join(body), access(binds)


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
    k = rt.kernel(("reduce", kind, no, nr, inp, o, wg, ist),
                  lambda: reduce_wgsl(kind, no, nr, inp, o, wg, ist), f"reduce-{kind}")
    extra = [idx.offset] if idx is not None else [fbits(scalar)] if scalar is not None else []
    params = SLOTS.bind(no=no, nr=nr, ne=int(kind in _EXTRA)).pack(
        rows=rows, n=n, x_off=x.offset, o_off=out.offset, oshape=oshape, ost=ostr, rshape=rshape, rst=rstr,
        extra=extra)
    bufs = [out.buf] + ([idx.buf] if idx is not None else []) + [x.buf]
    rt.dispatch(k, bufs, params, rows)
    return (out, idx) if idx is not None else out

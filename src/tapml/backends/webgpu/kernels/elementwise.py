"""The elementwise kernel (one expression over broadcast, strided operands and scalars), its launcher `ew`
and what is built on it (copy, contiguous, fill). It must not know ATen ops: handlers hand it expressions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from tapml.backends.webgpu.kernels.host import MAXD, bcast_strides, coalesce, native_ct, new, words
from tapml.backends.webgpu.kernels.prelude import ENTRY, decompose, header, load, offset, store
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.errors import TapmlError

LETTERS = "abcdefgh"


def elementwise_wgsl(nd: int, operands: tuple, out: tuple, expr: str, vec: bool, coords: bool = False) -> tuple[str, str]:
    """out = expr(a, b, ...) over a strided N-d index space (broadcasting = stride 0).

    operands: ('t', storage, ct) tensors or ('s', ct) scalars from the parameter window; out: (storage, wrap,
    result type). Params: [0] numel (vec4 count when `vec`), [1..nd] shape, then per tensor (out first) an
    offset and nd strides, then one word per scalar. `vec`: 1-d unit-stride operands, four lanes per thread.
    `idx` (the linear index, u32) and, with `coords`, `row`/`col` (last two coordinates) are in scope.
    """
    ostore, owrap, rt = out
    tensors = [o for o in operands if o[0] in "to"]
    binds = [("o", "w", f"vec4<{ostore}>" if vec else ostore)]
    names, nb = [], 0
    for o in tensors:  # 'o' operands live in the output's buffer and are read through its binding
        names.append("o" if o[0] == "o" else f"i{nb}")
        nb += o[0] == "t"
    binds += [(f"i{k}", "r", f"vec4<{o[1]}>" if vec else o[1]) for k, o in enumerate(t for t in tensors if t[0] == "t")]
    wg = 256
    src = [header(binds, wg), ENTRY.format(wg=wg)]
    src.append("  let idx = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (idx >= pu(0u)) { return; }\n")
    per = 1 if vec else 1 + nd
    base = 1 if vec else 1 + nd
    sc_at = base + per * (len(tensors) + 1)
    if vec:
        offs = [f"pu({base + k}u) + idx" for k in range(len(tensors) + 1)]
    else:
        src.append(decompose(nd, "idx", 1))
        offs = [offset(nd, base + k * per) for k in range(len(tensors) + 1)]
        if coords:
            src.append(f"  let row = i32(c{nd - 2});\n  let col = i32(c{nd - 1});\n")
    for k in range(len(tensors)):
        src.append(f"  let v{k} = {names[k]}[{offs[k + 1]}];\n")
    lanes = range(4) if vec else [None]
    results = []
    for lane in lanes:
        sfx = "" if lane is None else f"[{lane}]"
        body, t, s = [], 0, 0
        for j, o in enumerate(operands):
            if o[0] in "to":
                body.append(f"    let {LETTERS[j]} = {load(o[1], o[2], f'v{t}{sfx}')};")
                t += 1
            else:
                k = sc_at + s
                raw = {"f32": f"pf({k}u)", "i32": f"pi({k}u)", "bool": f"(pi({k}u) != 0)",
                       "i64": f"((i64(pi({k + 1}u)) << 32u) | i64(pu({k}u)))"}
                body.append(f"    let {LETTERS[j]} = {raw[o[1]]};")
                s += 2 if o[1] == "i64" else 1
        if vec:
            body.insert(0, f"    let idx = idx * 4u + {lane}u;")
        name = f"r{lane if lane is not None else ''}"
        src.append(f"  var {name}: {ostore};\n  {{\n" + "\n".join(body)
                   + f"\n    {name} = {store(rt, ostore, owrap, f'({expr})')};\n  }}\n")
        results.append(name)
    value = f"vec4<{ostore}>({', '.join(results)})" if vec else results[0]
    src.append(f"  o[{offs[0]}] = {value};\n}}\n")
    return "".join(src), "w" + "r" * len(tensors)


_I_HELPER = re.compile(r"\bi_(pow|floordiv|rem|fmod)\(")

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
                       lambda: elementwise_wgsl(nd, spec, ospec, expr, vec, coords)[0], "w" + "r" * len(bound),
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

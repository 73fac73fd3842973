"""The elementwise kernel (one expression over broadcast, strided operands and scalars), its launcher `ew`
and what is built on it (copy, contiguous, fill). It must not know ATen ops: handlers hand it expressions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

from tapml.backends.webgpu.kernels.host import MAXD, bcast_strides, coalesce, native_ct, new, words
from tapml.backends.webgpu.kernels.prelude import (
    ENTRY,
    Layout,
    Slots,
    access,
    decompose,
    header,
    load,
    offset,
    store,
)
from tapml.backends.webgpu.runtime import Kernel, Runtime, WGTensor
from tapml.errors import TapmlError

LETTERS = "abcdefgh"


@cache
def ew_slots(operands: tuple, nd: int, vec: bool) -> Layout:
    """The parameter words of one elementwise kernel: numel (the vec4 count when `vec`), the shape, per tensor
    (out first) its offset and strides (only the offset when `vec`: unit strides), then each scalar operand
    (two words for i64)."""
    ntensors = 1 + sum(o[0] in "to" for o in operands)
    tensors = [f"off{k}" if vec else f"off{k} st{k}:nd" for k in range(ntensors)]
    scalars = [f"s{j}:2" if o[1] == "i64" else f"s{j}" for j, o in enumerate(operands) if o[0] == "s"]
    return Slots("numel", "" if vec else "shape:nd", *tensors, *scalars).bind(nd=nd)


def elementwise_wgsl(nd: int, operands: tuple, out: tuple, expr: str, vec: bool,
                     coords: bool = False) -> tuple[str, str]:
    """out = expr(a, b, ...) over a strided N-d index space (broadcasting = stride 0).

    operands: ('t', storage, ct) tensors, ('o', storage, ct) tensors in the output's buffer, or ('s', ct)
    scalars from the parameter window; out: (storage, wrap, result type). Params: `ew_slots`. `vec`: 1-d
    unit-stride operands, four lanes per thread.
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
    p = ew_slots(operands, nd, vec)
    src = [header(binds, wg), ENTRY.format(wg=wg)]
    src.append(f"  let idx = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (idx >= {p.u.numel}) {{ return; }}\n")
    if vec:
        offs = [f"{p.u[f'off{k}']} + idx" for k in range(len(tensors) + 1)]
    else:
        src.append(decompose("idx", p.u.shape))
        offs = [offset(p.u[f"off{k}"], p.u[f"st{k}"]) for k in range(len(tensors) + 1)]
        if coords:
            src.append(f"  let row = i32(c{nd - 2});\n  let col = i32(c{nd - 1});\n")
    for k in range(len(tensors)):
        src.append(f"  let v{k} = {names[k]}[{offs[k + 1]}];\n")
    lanes = range(4) if vec else [None]
    results = []
    for lane in lanes:
        sfx = "" if lane is None else f"[{lane}]"
        body, t = [], 0
        for j, o in enumerate(operands):
            if o[0] in "to":
                body.append(f"    let {LETTERS[j]} = {load(o[1], o[2], f'v{t}{sfx}')};")
                t += 1
            elif o[1] == "i64":  # (low word, high word)
                lo, hi = p.u[f"s{j}"][0], p.i[f"s{j}"][1]
                # The low word masked: i64(u32) sign-extended a word whose top bit is set (naga on lavapipe),
                # which turned `x + 2**31` into `x - 2**31`.
                body.append(f"    let {LETTERS[j]} = ((i64({hi}) << 32u) | (i64({lo}) & 0xffffffffli));")
            else:
                s = f"s{j}"
                raw = {"f32": p.f[s], "i32": p.i[s], "bool": f"({p.i[s]} != 0)"}
                body.append(f"    let {LETTERS[j]} = {raw[o[1]]};")
        if vec:
            body.insert(0, f"    let idx = idx * 4u + {lane}u;")
        name = f"r{lane if lane is not None else ''}"
        src.append(f"  var {name}: {ostore};\n  {{\n" + "\n".join(body)
                   + f"\n    {name} = {store(rt, ostore, owrap, f'({expr})')};\n  }}\n")
        results.append(name)
    value = f"vec4<{ostore}>({', '.join(results)})" if vec else results[0]
    src.append(f"  o[{offs[0]}] = {value};\n}}\n")
    return "".join(src), access(binds)


_I_HELPER = re.compile(r"\bi_(pow|floordiv|rem|fmod)\(")


@dataclass(slots=True)
class Plan:
    """How one elementwise layout launches, worked out once (broadcast, coalescing, kernel choice) and cached
    on the runtime by layout: a call fills in only the tensors' offsets and the scalars."""

    kernel: Kernel
    params: list[int]  # the parameter words, with offsets and scalars left 0
    offsets: list[int]  # the word of each tensor's offset, out first (counted in vec4s when `vec`)
    vec: bool
    bound: list[int]  # the operands bound as buffers after out (tensors not in out's storage)
    scalars: list[tuple[int, str, int]]  # (operand index, compute type, first word)
    grid: tuple[int, int, int]

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
    params = plan.params.copy()
    tens = [out] + [o for o in operands if type(o) is WGTensor]
    for at, t in zip(plan.offsets, tens):
        params[at] = t.offset >> 2 if plan.vec else t.offset
    for i, ct, at in plan.scalars:
        w = words(operands[i], ct)
        params[at: at + len(w)] = w
    rt.dispatch(plan.kernel, [out.buf] + [operands[i].buf for i in plan.bound], params, plan.grid)
    return out


def _ew_plan(rt: Runtime, expr: str, operands: Sequence, out: WGTensor, cts: Sequence[str], rtype: str,
             coords: bool) -> Plan:
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
                       lambda: elementwise_wgsl(nd, spec, ospec, expr, vec, coords), "elementwise")
    p = ew_slots(spec, nd, vec)
    # offsets and scalars are left 0 in the plan: each call fills them in
    words_of = {f"s{i}": [0, 0] if o[1] == "i64" else 0 for i, o in enumerate(spec) if o[0] == "s"}
    words_of.update({f"off{k}": 0 for k in range(len(tens))}, numel=numel // 4 if vec else numel)
    if not vec:
        words_of.update({f"st{k}": s for k, s in enumerate(cstrides)}, shape=cshape)
    groups = -(-numel // 4 // 256) if vec else -(-numel // 256)
    scalars = [(i, o[1], p.at[f"s{i}"]) for i, o in enumerate(spec) if o[0] == "s"]
    return Plan(kernel, p.pack(**words_of), [p.at[f"off{k}"] for k in range(len(tens))], vec, bound, scalars,
                rt.grid(groups))


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

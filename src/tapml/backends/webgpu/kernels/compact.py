"""Stream compaction: an exclusive prefix count over a tensor's elements in row-major order, and what is built
on it (nonzero's coordinates, masked_scatter, repeat_interleave's expansion). WGSL beside launchers.

The prefix is one workgroup: each of its threads counts a contiguous chunk, the chunk totals are scanned in
workgroup memory, then each thread writes its chunk's running positions (deterministic, one dispatch). Nothing
here reads a count back: a handler that needs an output size reads `pos[n]` itself.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from tapml.backends.webgpu.kernels.elementwise import contiguous
from tapml.backends.webgpu.kernels.host import MAXD, bcast_strides, new
from tapml.backends.webgpu.kernels.prelude import (
    ENTRY,
    Layout,
    Slots,
    access,
    decompose,
    header,
    load,
    offset,
)
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.errors import TapmlError

_WG = 256
EXPAND = Slots("total n p_off o_off").bind()


@cache
def prefix_slots(nd: int) -> Layout:
    """n elements over `shape`, the input's offset and strides (the positions are a fresh [n + 1] int32)."""
    return Slots("n shape:nd x_off x_st:nd").bind(nd=nd)


@cache
def nonzero_slots(nd: int) -> Layout:
    """prefix_slots + the output's offset (a fresh [count, nd] tensor)."""
    return Slots("n shape:nd x_off x_st:nd o_off").bind(nd=nd)


@cache
def masked_scatter_slots(nd: int) -> Layout:
    """numel over `shape` (out is fresh), self's and the mask's offsets and strides (broadcast), the source's
    offset (contiguous)."""
    return Slots("n shape:nd x_off x_st:nd m_off m_st:nd s_off").bind(nd=nd)


def _value(p: Layout, st: str, mode: str) -> str:
    """`fn val(i)`: what element i (row-major over `shape`) counts: 1 if nonzero ("nonzero"), or its value
    ("count", an integer tensor)."""
    at = f"x[{offset(p.u.x_off, p.u.x_st)}]"
    v = f"select(0, 1, {load(st, 'bool', at)})" if mode == "nonzero" else load(st, "i32", at)
    return f"fn val(i: u32) -> i32 {{\n{decompose('i', p.u.shape)}  return {v};\n}}\n"


def prefix_wgsl(nd: int, st: str, mode: str) -> tuple[str, str]:
    """pos[i] = sum of val(j) for j < i, pos[n] = the total; one workgroup. Params: `prefix_slots`."""
    p = prefix_slots(nd)
    binds = [("pos", "w", "i32"), ("x", "r", st)]
    src = [header(binds, _WG), f"var<workgroup> part: array<i32, {_WG}>;\n", _value(p, st, mode),
           ENTRY.format(wg=_WG)]
    src.append(f"""  let n = {p.u.n};
  let chunk = (n + WG - 1u) / WG;
  let lo = min(lid * chunk, n);
  let hi = min(lo + chunk, n);
  var c = 0;
  for (var i = lo; i < hi; i = i + 1u) {{ c = c + val(i); }}
  part[lid] = c;
  workgroupBarrier();
  if (lid == 0u) {{
    var run = 0;
    for (var t = 0u; t < WG; t = t + 1u) {{ let v = part[t]; part[t] = run; run = run + v; }}
  }}
  workgroupBarrier();
  var run = part[lid];
  for (var i = lo; i < hi; i = i + 1u) {{ pos[i] = run; run = run + val(i); }}
  if (lid == WG - 1u) {{ pos[n] = run; }}
}}
""")
    return "".join(src), access(binds)


def nonzero_wgsl(nd: int, st: str, ost: str) -> tuple[str, str]:
    """Element i, when nonzero, writes its coordinates as row pos[i] of out. Params: `nonzero_slots`."""
    p = nonzero_slots(nd)
    binds = [("o", "w", ost), ("x", "r", st), ("pos", "r", "i32")]
    src = [header(binds, _WG), _value(p, st, "nonzero"), ENTRY.format(wg=_WG)]
    src.append(f"  let i = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (i >= {p.u.n} || val(i) == 0) {{ return; }}\n"
               f"  let row = u32(pos[i]) * {nd}u + {p.u.o_off};\n")
    src.append(decompose("i", p.u.shape))
    src.extend(f"  o[row + {d}u] = {ost}(c{d});\n" for d in range(nd))
    src.append("}\n")
    return "".join(src), access(binds)


def masked_scatter_wgsl(nd: int, st: str, mst: str) -> tuple[str, str]:
    """out[c] = mask[c] ? src[pos[c]] : self[c], the k-th selected element taking the source's k-th. The
    values are moved as stored (no conversion). Params: `masked_scatter_slots`."""
    p = masked_scatter_slots(nd)
    u = p.u
    binds = [("o", "w", st), ("x", "r", st), ("m", "r", mst), ("pos", "r", "i32"), ("s", "r", st)]
    src = [header(binds, _WG), ENTRY.format(wg=_WG)]
    src.append(f"  let i = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (i >= {u.n}) {{ return; }}\n")
    src.append(decompose("i", u.shape))
    src.append(f"  if ({load(mst, 'bool', f'm[{offset(u.m_off, u.m_st)}]')}) {{\n"
               f"    o[i] = s[{u.s_off} + u32(pos[i])];\n  }} else {{\n"
               f"    o[i] = x[{offset(u.x_off, u.x_st)}];\n  }}\n}}\n")
    return "".join(src), access(binds)


def expand_wgsl(ost: str) -> tuple[str, str]:
    """repeat_interleave's indices: out[j] = the i with pos[i] <= j < pos[i + 1] (binary search over the
    exclusive prefix of the repeats). Params: EXPAND."""
    u = EXPAND.u
    binds = [("o", "w", ost), ("pos", "r", "i32")]
    src = [header(binds, _WG), ENTRY.format(wg=_WG)]
    src.append(f"""  let j = (wid.x + wid.y * nwg.x) * WG + lid;
  if (j >= {u.total}) {{ return; }}
  let base = {u.p_off};
  var lo = 0u;
  var hi = {u.n} - 1u;
  loop {{
    if (lo >= hi) {{ break; }}
    let mid = (lo + hi + 1u) / 2u;
    if (u32(pos[base + mid]) <= j) {{ lo = mid; }} else {{ hi = mid - 1u; }}
  }}
  o[{u.o_off} + j] = {ost}(lo);
}}
""")
    return "".join(src), access(binds)


def _geometry(x: WGTensor, shape: tuple[int, ...] | None = None) -> tuple[list[int], list[int]]:
    shape = list(x.shape if shape is None else shape)
    if len(shape) > MAXD:
        raise TapmlError(f"webgpu: compaction over {len(shape)} dims (max {MAXD})")
    return shape, bcast_strides(x, shape)


def prefix(rt: Runtime, x: WGTensor, mode: str, shape: tuple[int, ...] | None = None) -> WGTensor:
    """int32 [n + 1]: the exclusive prefix over x's elements in row-major order of `shape` (x broadcast to it;
    default x's own) of 1 per nonzero element (mode "nonzero") or of the values ("count"); pos[n] is the total."""
    shp, strides = _geometry(x, shape)
    n = math.prod(shp)
    pos = new(rt, (n + 1,), torch.int32)
    nd, st = len(shp), x.info.storage
    k = rt.kernel(("prefix", nd, st, mode), lambda: prefix_wgsl(nd, st, mode), f"prefix-{mode}")
    rt.dispatch(k, [pos.buf, x.buf], prefix_slots(nd).pack(n=n, shape=shp, x_off=x.offset, x_st=strides), 1)
    return pos


def nonzero(rt: Runtime, x: WGTensor, pos: WGTensor, count: int) -> WGTensor:
    """int64 [count, x.dim()]: the coordinates of x's nonzero elements in row-major order (`pos`: `prefix`'s
    "nonzero" positions, `count` its total)."""
    shp, strides = _geometry(x)
    out = new(rt, (count, len(shp)), torch.int64)
    if count == 0 or not shp:
        return out
    nd, st, ost = len(shp), x.info.storage, out.info.storage
    k = rt.kernel(("nonzero", nd, st, ost), lambda: nonzero_wgsl(nd, st, ost), "nonzero")
    n = math.prod(shp)
    params = nonzero_slots(nd).pack(n=n, shape=shp, x_off=x.offset, x_st=strides, o_off=out.offset)
    rt.dispatch(k, [out.buf, x.buf, pos.buf], params, -(-n // _WG))
    return out


def masked_scatter(rt: Runtime, x: WGTensor, mask: WGTensor, source: WGTensor, shape: tuple[int, ...]) -> WGTensor:
    """A fresh `shape` tensor: x where the mask (both broadcast to `shape`) is false, the source's elements in
    row-major order where it is true."""
    out = new(rt, shape, x.dtype)
    n = out.numel()
    if n == 0:
        return out
    pos = prefix(rt, mask, "nonzero", shape)
    shp, xst = _geometry(x, shape)
    _, mst = _geometry(mask, shape)
    src = contiguous(rt, source)
    nd, st, mt = len(shp), x.info.storage, mask.info.storage
    k = rt.kernel(("masked_scatter", nd, st, mt), lambda: masked_scatter_wgsl(nd, st, mt), "masked_scatter")
    params = masked_scatter_slots(nd).pack(n=n, shape=shp, x_off=x.offset, x_st=xst, m_off=mask.offset,
                                           m_st=mst, s_off=src.offset)
    rt.dispatch(k, [out.buf, x.buf, mask.buf, pos.buf, src.buf], params, -(-n // _WG))
    return out


def expand(rt: Runtime, pos: WGTensor, n: int, total: int, dtype: torch.dtype) -> WGTensor:
    """[total] of `dtype`: index i repeated pos[i + 1] - pos[i] times, in order (`pos`: `prefix` "count" of the
    n repeats)."""
    out = new(rt, (total,), dtype)
    if total == 0 or n == 0:
        return out
    ost = out.info.storage
    k = rt.kernel(("expand", ost), lambda: expand_wgsl(ost), "repeat_interleave")
    rt.dispatch(k, [out.buf, pos.buf], EXPAND.pack(total=total, n=n, p_off=pos.offset, o_off=out.offset),
                -(-total // _WG))
    return out

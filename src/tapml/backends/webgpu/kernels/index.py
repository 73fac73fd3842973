"""Indexing kernels: gather and scatter (advanced indexing, index_put_), isin and histc, WGSL beside
launchers. Index spaces arrive planned by the handlers; nothing here reads an index back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

from tapml.backends.webgpu.kernels.elementwise import contiguous, copy, fill
from tapml.backends.webgpu.kernels.host import MAXD, bcast_strides, fbits, new
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
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.errors import TapmlError

ISIN = Slots("n nt x_off t_off invert").bind()
HISTC = Slots("n bins x_off lo hi").bind()


@cache
def gather_slots(nd: int, nidx: int) -> Layout:
    """numel and the index space's shape; o (the output, or the values when scattering): offset and strides
    over the index space; s (the source, or self when scattering): offset and coefficients; then per index
    tensor its offset, its strides over the index space, and the indexed dim's stride and size (negative
    indices wrap by it)."""
    index = [f"ix{k}_off ix{k}_st:nd ix{k}_dim_st ix{k}_dim_n" for k in range(nidx)]
    return Slots("numel shape:nd", "o_off o_st:nd s_off s_coef:nd", *index).bind(nd=nd)


@cache
def _index_names(k: int) -> tuple[str, str, str, str]:
    return f"ix{k}_off", f"ix{k}_st", f"ix{k}_dim_st", f"ix{k}_dim_n"


def _index_words(index: Sequence[tuple[WGTensor, Sequence[int], int, int]]) -> dict[str, Any]:
    """The index tensors' slots of `gather_slots`."""
    words: dict[str, Any] = {}
    for k, (t, strides, dstride, dsize) in enumerate(index):
        off, st, dim_st, dim_n = _index_names(k)
        words[off], words[st], words[dim_st], words[dim_n] = t.offset, strides, dstride, dsize
    return words


def gather_wgsl(nd: int, nidx: int, st: str, ct: str, ost: str, owrap: str, idx_st: tuple, scatter: bool,
           accumulate: bool = False) -> tuple[str, str]:
    """Advanced indexing in one shape: for every point c of an N-d index space,
    src = S.off + sum_d c_d * S.coef_d + sum_k wrap(idx_k[I_k.off + sum_d c_d * I_k.coef_d]) * dimstride_k.
    Gather: out[O(c)] = src[src]. Scatter (index_put_): self[src] = values[V(c)] (`accumulate`: +=, atomics
    for int32 storage). Params: `gather_slots`."""
    p = gather_slots(nd, nidx)
    u = p.u
    binds = []
    if scatter:
        elem = "atomic<i32>" if accumulate else st
        binds += [("s", "w", elem), ("vals", "r", st)]
    else:
        binds += [("o", "w", ost), ("s", "r", st)]
    binds += [(f"ix{k}", "r", t) for k, t in enumerate(idx_st)]
    src = [header(binds, 256), ENTRY.format(wg=256)]
    src.append(f"  let idx = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (idx >= {u.numel}) {{ return; }}\n")
    src.append(decompose("idx", u.shape))
    src.append(f"  var so = {offset(u.s_off, u.s_coef)};\n")
    for k in range(nidx):
        src.append(f"  {{\n    let iv = i32(ix{k}[{offset(u[f'ix{k}_off'], u[f'ix{k}_st'])}]);\n"
                   f"    let w = select(iv, iv + {p.i[f'ix{k}_dim_n']}, iv < 0);\n"
                   f"    so = so + u32(w) * {u[f'ix{k}_dim_st']};\n  }}\n")
    if scatter:
        v = f"vals[{offset(u.o_off, u.o_st)}]"
        if accumulate:
            src.append(f"  atomicAdd(&s[so], {v});\n}}\n")
        else:
            src.append(f"  s[so] = {v};\n}}\n")
        return "".join(src), access(binds)
    src.append(f"  o[{offset(u.o_off, u.o_st)}] = {store(ct, ost, owrap, load(st, ct, 's[so]'))};\n}}\n")
    return "".join(src), access(binds)


def isin_wgsl(st: str, tst: str, ct: str) -> tuple[str, str]:
    """out[i] = any_j (x[i] == t[j]) (xor invert). x and t contiguous. Params: ISIN."""
    u = ISIN.u
    binds = [("o", "w", "u32"), ("x", "r", st), ("tt", "r", tst)]
    src = [header(binds, 256), ENTRY.format(wg=256)]
    src.append(f"""  let i = (wid.x + wid.y * nwg.x) * WG + lid;
  if (i >= {u.n}) {{ return; }}
  let v = {load(st, ct, f'x[{u.x_off} + i]')};
  var hit = false;
  for (var j = 0u; j < {u.nt}; j = j + 1u) {{
    if ({load(tst, ct, f'tt[{u.t_off} + j]')} == v) {{ hit = true; break; }}
  }}
  o[i] = select(0u, 1u, hit != ({u.invert} != 0u));
}}
""")
    return "".join(src), access(binds)


def histc_wgsl(st: str) -> tuple[str, str]:
    """Counts into an atomic i32 histogram: bin = int((x - lo) * bins / (hi - lo)), hi inclusive.
    Params: HISTC (lo and hi as f32)."""
    p = HISTC
    binds = [("cnt", "w", "atomic<i32>"), ("x", "r", st)]
    src = [header(binds, 256), ENTRY.format(wg=256)]
    src.append(f"""  let i = (wid.x + wid.y * nwg.x) * WG + lid;
  if (i >= {p.u.n}) {{ return; }}
  let v = {load(st, 'f32', f'x[{p.u.x_off} + i]')};
  let lo = {p.f.lo}; let hi = {p.f.hi}; let nb = {p.u.bins};
  if (is_nan(v) || v < lo || v > hi) {{ return; }}
  var b = u32((v - lo) * f32(nb) / (hi - lo));
  if (b >= nb) {{ b = nb - 1u; }}
  atomicAdd(&cnt[b], 1);
}}
""")
    return "".join(src), access(binds)


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
    params = gather_slots(nd, len(index)).pack(numel=numel, shape=shape, o_off=out.offset, o_st=ostr,
                                               s_off=src.offset, s_coef=src_coef, **_index_words(index))
    ct = src.info.ct if src.info.ct != "bool" else "i32"
    if out.dtype == torch.bool:
        ct = "bool"
    ist = tuple(t.info.storage for t, *_ in index)
    st, ost, wrap = src.info.storage, out.info.storage, out.info.wrap
    k = rt.kernel(("gather", nd, len(index), st, ct, ost, wrap, ist),
                  lambda: gather_wgsl(nd, len(index), st, ct, ost, wrap, ist, False), "gather")
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
    params = gather_slots(nd, len(index)).pack(numel=numel, shape=shape, o_off=values.offset,
                                               o_st=bcast_strides(values, shape), s_off=dst.offset,
                                               s_coef=dst_coef, **_index_words(index))
    ist = tuple(t.info.storage for t, *_ in index)
    st = dst.info.storage
    k = rt.kernel(("scatter", nd, len(index), st, ist, accumulate),
                  lambda: gather_wgsl(nd, len(index), st, "", st, "", ist, True, accumulate), "scatter")
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
    k = rt.kernel(("isin", st, tst, ct), lambda: isin_wgsl(st, tst, ct), "isin")
    params = ISIN.pack(n=out.numel(), nt=tc.numel(), x_off=xc.offset, t_off=tc.offset,
                              invert=int(invert))
    rt.dispatch(k, [out.buf, xc.buf, tc.buf], params, -(-out.numel() // 256))
    return out


def histc(rt: Runtime, x: WGTensor, bins: int, lo: float, hi: float) -> WGTensor:
    xc = contiguous(rt, x)
    counts = new(rt, (bins,), torch.int32)
    fill(rt, counts, 0)
    st = xc.info.storage
    k = rt.kernel(("histc", st), lambda: histc_wgsl(st), "histc")
    if xc.numel():
        params = HISTC.pack(n=xc.numel(), bins=bins, x_off=xc.offset, lo=fbits(lo), hi=fbits(hi))
        rt.dispatch(k, [counts.buf, xc.buf], params, -(-xc.numel() // 256))
    return copy(rt, counts, new(rt, (bins,), x.dtype))

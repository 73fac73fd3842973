"""Indexing kernels: gather and scatter (advanced indexing, index_put_), isin and histc, WGSL beside launchers.

Index spaces arrive planned by the handlers (`structured.py`); nothing here reads an index back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tapml.backends.webgpu.kernels.elementwise import contiguous, copy, fill
from tapml.backends.webgpu.kernels.host import MAXD, bcast_strides, fbits, new
from tapml.backends.webgpu.kernels.prelude import ENTRY, decompose, header, load, offset, store
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.errors import TapmlError


def gather_wgsl(nd: int, nidx: int, st: str, ct: str, ost: str, owrap: str, idx_st: tuple, scatter: bool,
           accumulate: bool = False) -> tuple[str, str]:
    """Advanced indexing in one shape: for every point c of an N-d index space,
    src = S.off + sum_d c_d * S.coef_d + sum_k wrap(idx_k[I_k.off + sum_d c_d * I_k.coef_d]) * dimstride_k.
    Gather: out[O(c)] = src[src]. Scatter (index_put_): self[src] = values[V(c)] (`accumulate`: +=, atomics
    for int32 storage). Params: [0] numel [1..nd] shape; O (or V) off + nd; S off + nd; per index tensor:
    off + nd strides, dim stride, dim size."""
    per = 1 + nd
    o_at, s_at = 1 + nd, 1 + nd + per
    binds = []
    if scatter:
        elem = "atomic<i32>" if accumulate else st
        binds += [("s", "w", elem), ("vals", "r", st)]
    else:
        binds += [("o", "w", ost), ("s", "r", st)]
    binds += [(f"ix{k}", "r", t) for k, t in enumerate(idx_st)]
    src = [header(binds, 256), ENTRY.format(wg=256)]
    src.append("  let idx = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (idx >= pu(0u)) { return; }\n")
    src.append(decompose(nd, "idx", 1))
    src.append(f"  var so = {offset(nd, s_at)};\n")
    for k in range(nidx):
        at = s_at + per + k * (per + 2)
        src.append(f"  {{\n    let iv = i32(ix{k}[{offset(nd, at)}]);\n"
                   f"    let w = select(iv, iv + pi({at + per + 1}u), iv < 0);\n"
                   f"    so = so + u32(w) * pu({at + per}u);\n  }}\n")
    if scatter:
        v = f"vals[{offset(nd, o_at)}]"
        if accumulate:
            src.append(f"  atomicAdd(&s[so], {v});\n}}\n")
        else:
            src.append(f"  s[so] = {v};\n}}\n")
        return "".join(src), "wr" + "r" * nidx
    src.append(f"  o[{offset(nd, o_at)}] = {store(ct, ost, owrap, load(st, ct, 's[so]'))};\n}}\n")
    return "".join(src), "wr" + "r" * nidx


def isin_wgsl(st: str, tst: str, ct: str) -> tuple[str, str]:
    """out[i] = any_j (x[i] == t[j]) (xor invert). x and t contiguous. Params: [0] n [1] nt [2] x off
    [3] t off [4] invert."""
    src = [header([("o", "w", "u32"), ("x", "r", st), ("tt", "r", tst)], 256), ENTRY.format(wg=256)]
    src.append(f"""  let i = (wid.x + wid.y * nwg.x) * WG + lid;
  if (i >= pu(0u)) {{ return; }}
  let v = {load(st, ct, 'x[pu(2u) + i]')};
  var hit = false;
  for (var j = 0u; j < pu(1u); j = j + 1u) {{
    if ({load(tst, ct, 'tt[pu(3u) + j]')} == v) {{ hit = true; break; }}
  }}
  o[i] = select(0u, 1u, hit != (pu(4u) != 0u));
}}
""")
    return "".join(src), "wrr"


def histc_wgsl(st: str) -> tuple[str, str]:
    """Counts into an atomic i32 histogram: bin = int((x - lo) * bins / (hi - lo)), hi inclusive.
    Params: [0] n [1] bins [2] x off [3] lo (f32) [4] hi (f32)."""
    src = [header([("cnt", "w", "atomic<i32>"), ("x", "r", st)], 256), ENTRY.format(wg=256)]
    src.append(f"""  let i = (wid.x + wid.y * nwg.x) * WG + lid;
  if (i >= pu(0u)) {{ return; }}
  let v = {load(st, 'f32', 'x[pu(2u) + i]')};
  let lo = pf(3u); let hi = pf(4u); let nb = pu(1u);
  if (is_nan(v) || v < lo || v > hi) {{ return; }}
  var b = u32((v - lo) * f32(nb) / (hi - lo));
  if (b >= nb) {{ b = nb - 1u; }}
  atomicAdd(&cnt[b], 1);
}}
""")
    return "".join(src), "wr"


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
                  lambda: gather_wgsl(nd, len(index), st, ct, ost, wrap, ist, False)[0], "wr" + "r" * len(index),
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
                  lambda: gather_wgsl(nd, len(index), st, "", st, "", ist, True, accumulate)[0],
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
    k = rt.kernel(("isin", st, tst, ct), lambda: isin_wgsl(st, tst, ct)[0], "wrr", "isin")
    rt.dispatch(k, [out.buf, xc.buf, tc.buf], [out.numel(), tc.numel(), xc.offset, tc.offset, int(invert)],
                -(-out.numel() // 256))
    return out


def histc(rt: Runtime, x: WGTensor, bins: int, lo: float, hi: float) -> WGTensor:
    xc = contiguous(rt, x)
    counts = new(rt, (bins,), torch.int32)
    fill(rt, counts, 0)
    st = xc.info.storage
    k = rt.kernel(("histc", st), lambda: histc_wgsl(st)[0], "wr", "histc")
    if xc.numel():
        rt.dispatch(k, [counts.buf, xc.buf], [xc.numel(), bins, xc.offset, fbits(lo), fbits(hi)],
                    -(-xc.numel() // 256))
    return copy(rt, counts, new(rt, (bins,), x.dtype))

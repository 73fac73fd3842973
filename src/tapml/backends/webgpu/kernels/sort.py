"""Sort and topk by rank along one dim: each element counts what orders before it and writes itself there.

The WGSL beside its launcher, over the row layout of `rows.py`; ATen argument conventions stay in the
handlers.
"""

from __future__ import annotations

import torch

from tapml.backends.webgpu.kernels.host import new
from tapml.backends.webgpu.kernels.prelude import ENTRY, Slots, access, header, load, store
from tapml.backends.webgpu.kernels.rows import ROWS, row_values, rows_prelude
from tapml.backends.webgpu.runtime import Runtime, WGTensor

# + k, descending, and the index output's offset, stride along the dim and outer strides
SLOTS = Slots(*ROWS, "k desc i_off i_st i_outer:no")


def rank_sort_wgsl(no: int, st: str, ct: str, ost: str, owrap: str, ist: str) -> tuple[str, str]:
    """Sort/topk by rank: thread (row, j) counts the elements that order before x_j (stable: ties by index)
    and writes x_j and j at that position if it is < k. Params: SLOTS."""
    p = SLOTS.bind(no=no)
    binds = [("o", "w", ost), ("oi", "w", ist), ("x", "r", st)]
    src = [header(binds, 64), ENTRY.format(wg=64)]
    src.append(f"  let t = (wid.x + wid.y * nwg.x) * WG + lid;\n  let n = {p.u.n};\n"
               f"  if (t >= {p.u.rows} * n) {{ return; }}\n  let row = t / n;\n  let j = t % n;\n")
    src.append(rows_prelude(p))
    ib = " + ".join([p.u.i_off] + [f"q{d} * {s}" for d, s in enumerate(p.u.i_outer)])
    if ct == "f32":
        before = ("((is_nan(y) && !is_nan(v)) || (!is_nan(y) && !is_nan(v) && (y > v)))",
                  "((is_nan(v) && !is_nan(y)) || (!is_nan(y) && !is_nan(v) && (y < v)))")
        same = "(y == v || (is_nan(y) && is_nan(v)))"
    else:
        before, same = ("(y > v)", "(y < v)"), "(y == v)"
    src.append(f"  let v = {load(st, ct, 'x[xb + j * xs]')};\n  let desc = {p.i.desc} != 0;\n"
               "  var r = 0u;\n  for (var i = 0u; i < n; i = i + 1u) {\n"
               f"    let y = {load(st, ct, 'x[xb + i * xs]')};\n"
               f"    let b = select({before[1]}, {before[0]}, desc);\n"
               f"    if (b || ({same} && i < j)) {{ r = r + 1u; }}\n  }}\n"
               f"  if (r < {p.u.k}) {{\n    o[ob + r * os] = {store(ct, ost, owrap, 'v')};\n"
               f"    oi[{ib} + r * {p.u.i_st}] = {ist}(j);\n  }}\n}}\n")
    return "".join(src), access(binds)


def rank_sort(rt: Runtime, x: WGTensor, dim: int, k: int, descending: bool) -> tuple[WGTensor, WGTensor]:
    """The first k elements along `dim` in sorted order (stable) and their int64 indices."""
    dim = dim % x.dim() if x.dim() else 0
    shape = list(x.shape)
    if shape:
        shape[dim] = k
    vals, idx = new(rt, shape, x.dtype), new(rt, shape, torch.int64)
    if x.numel() == 0 or k == 0:
        return vals, idx
    row, no = row_values(x, dim, vals)
    # indices share the values' (fresh, contiguous, same-shape) layout
    params = SLOTS.bind(no=no).pack(**row, k=k, desc=int(descending), i_off=idx.offset, i_st=row["o_st"],
                                    i_outer=row["o_outer"])
    ct = x.info.ct if x.info.ct != "bool" else "i32"
    st, ist = x.info.storage, idx.info.storage
    kern = rt.kernel(("rank", no, st, ct, vals.info.storage, vals.info.wrap, ist),
                     lambda: rank_sort_wgsl(no, st, ct, vals.info.storage, vals.info.wrap, ist), "sort")
    total = row["rows"] * (x.shape[dim] if x.dim() else 1)
    rt.dispatch(kern, [vals.buf, idx.buf, x.buf], params, -(-total // 64))
    return vals, idx

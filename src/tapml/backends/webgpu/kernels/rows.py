"""The row layout the row kernels share (`norm`, `scan`, `sort`): one dim walked per row, the others
coalesced.

It declares those parameter words and their WGSL prelude; it must hold no kernel of its own.
"""

from __future__ import annotations

import math
from typing import Any

from tapml.backends.webgpu.kernels.host import coalesce
from tapml.backends.webgpu.kernels.prelude import Layout, decompose
from tapml.backends.webgpu.runtime import WGTensor

# `rows` rows of `n` elements along one dim: x and out each an offset, a stride along the dim and strides
# over the outer dims (coalesced to shape `oshape`). A row kernel's Slots start with these, then its own.
ROWS = ("rows n x_off x_st o_off o_st", "oshape:no x_outer:no o_outer:no")


def rows_prelude(p: Layout) -> str:
    """Row `row`'s coordinates q0.. and its first element and stride in x (xb, xs) and out (ob, os)."""
    coords = decompose("row", p.u.oshape, "q")
    xb = " + ".join([p.u.x_off] + [f"q{d} * {s}" for d, s in enumerate(p.u.x_outer)])
    ob = " + ".join([p.u.o_off] + [f"q{d} * {s}" for d, s in enumerate(p.u.o_outer)])
    return coords + f"  let xb = {xb};\n  let xs = {p.u.x_st};\n  let ob = {ob};\n  let os = {p.u.o_st};\n"


def row_loop(ld: str, body: str) -> str:
    """`for j in lid, lid+WG, ... < n: let v = ld(j); body`, four loads in flight per thread."""
    step = "".join(f"    {{\n      let j = j4 + {u}u * WG;\n      let v = {ld};\n      {body}\n    }}\n" for u in range(4))
    return (f"  var j4 = lid;\n  for (; j4 + 3u * WG < n; j4 = j4 + 4u * WG) {{\n{step}  }}\n"
            f"  for (var j = j4; j < n; j = j + WG) {{\n    let v = {ld};\n    {body}\n  }}\n")


def row_values(x: WGTensor, dim: int, out: WGTensor) -> tuple[dict[str, Any], int]:
    """The values of the ROWS slots for rows along `dim` (negative counts from the end), and the outer rank
    `no` they are bound with."""
    nd = x.dim()
    dim = dim % nd if nd else 0
    outer = [d for d in range(nd) if d != dim]
    oshape, (xs, os_) = coalesce([x.shape[d] for d in outer], [[x.stride[d] for d in outer],
                                                               [out.stride[d] for d in outer]])
    rows = math.prod(x.shape[d] for d in outer)
    if rows == 1:
        oshape, xs, os_ = [], [], []
    n = x.shape[dim] if nd else 1
    xst = x.stride[dim] if nd else 0
    ost = out.stride[dim] if nd else 0
    return dict(rows=rows, n=n, x_off=x.offset, x_st=xst, o_off=out.offset, o_st=ost, oshape=oshape,
                x_outer=xs, o_outer=os_), len(oshape)

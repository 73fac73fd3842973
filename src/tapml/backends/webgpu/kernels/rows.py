"""The row layout the row kernels share (`norm`, `scan`, `sort`): one dim walked per row, the others coalesced.

It declares those parameter words and their WGSL prelude; it must hold no kernel of its own.
"""

from __future__ import annotations

import math

from tapml.backends.webgpu.kernels.host import coalesce
from tapml.backends.webgpu.kernels.prelude import decompose
from tapml.backends.webgpu.runtime import WGTensor


def rows_prelude(no: int) -> str:
    """Row coordinates. Params: [0] rows, [1] n, [2] x off, [3] x stride, [4] o off, [5] o stride,
    [6..] outer shape (no), x outer strides (no), o outer strides (no)."""
    s = decompose(no, "row", 6, "q")
    xb = " + ".join(["pu(2u)"] + [f"q{d} * pu({6 + no + d}u)" for d in range(no)])
    ob = " + ".join(["pu(4u)"] + [f"q{d} * pu({6 + 2 * no + d}u)" for d in range(no)])
    return s + f"  let xb = {xb};\n  let xs = pu(3u);\n  let ob = {ob};\n  let os = pu(5u);\n"


def row_loop(ld: str, body: str) -> str:
    """`for j in lid, lid+WG, ... < n: let v = ld(j); body`, four loads in flight per thread."""
    step = "".join(f"    {{\n      let j = j4 + {u}u * WG;\n      let v = {ld};\n      {body}\n    }}\n" for u in range(4))
    return (f"  var j4 = lid;\n  for (; j4 + 3u * WG < n; j4 = j4 + 4u * WG) {{\n{step}  }}\n"
            f"  for (var j = j4; j < n; j = j + WG) {{\n    let v = {ld};\n    {body}\n  }}\n")


def row_params(x: WGTensor, dim: int, out: WGTensor) -> tuple[list[int], int, int]:
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

"""Cumulative sum and product along one dim, one thread per row walking it in order (as torch does).

The WGSL beside its launcher, over the row layout of `rows.py`; ATen argument conventions stay in the
handlers.
"""

from __future__ import annotations

import torch

from tapml.backends.webgpu.kernels.host import new
from tapml.backends.webgpu.kernels.prelude import ENTRY, ONE, ZERO, Slots, access, header, load, store
from tapml.backends.webgpu.kernels.rows import ROWS, row_values, rows_prelude
from tapml.backends.webgpu.runtime import Runtime, WGTensor

# + `zero`: a word that is 0 at run time, unknown when the shader compiles (see `cumulative_wgsl`)
SLOTS = Slots(*ROWS, "zero")


def cumulative_wgsl(kind: str, no: int, st: str, ct: str, ost: str, owrap: str) -> tuple[str, str]:
    """One thread per row, in order (as torch does): cumsum (compensated in f32) or cumprod."""
    p = SLOTS.bind(no=no)
    binds = [("o", "w", ost), ("x", "r", st)]
    src = [header(binds, 64), ENTRY.format(wg=64)]
    src.append(f"  let row = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (row >= {p.u.rows}) {{ return; }}\n"
               f"  let n = {p.u.n};\n")
    src.append(rows_prelude(p))
    ld = load(st, ct, "x[xb + j * xs]")
    if kind == "cumsum" and ct == "f32":
        # Two-sum compensation approximates torch's double accumulator on the CPU. Shader compilers may
        # reassociate float math (Mesa's NIR folds `(s + v) - s` to `v`), which cancels the compensation: every
        # step passes through `exact`, which ORs a word the compiler cannot know is 0 into the bits.
        z = p.u.zero

        def exact(e: str) -> str:
            return f"bitcast<f32>(bitcast<u32>({e}) | {z})"

        body = (f"    let v = {ld};\n    let t = {exact('s + v')};\n    let bp = {exact('t - s')};\n"
                f"    let ap = {exact('t - bp')};\n"
                f"    c = c + {exact(exact('s - ap') + ' + ' + exact('v - bp'))};\n    s = t;\n"
                f"    o[ob + j * os] = {store('f32', ost, owrap, 's + c')};\n")
        src.append("  var s = 0.0;\n  var c = 0.0;\n  for (var j = 0u; j < n; j = j + 1u) {\n" + body + "  }\n}\n")
    else:
        op = "+" if kind == "cumsum" else "*"
        init = ZERO[ct] if kind == "cumsum" else ONE[ct]
        src.append(f"  var s = {init};\n  for (var j = 0u; j < n; j = j + 1u) {{\n    s = s {op} {ld};\n"
                   f"    o[ob + j * os] = {store(ct, ost, owrap, 's')};\n  }}\n}}\n")
    return "".join(src), access(binds)


def cumulative(rt: Runtime, kind: str, x: WGTensor, dim: int, out_dtype: torch.dtype) -> WGTensor:
    out = new(rt, x.shape, out_dtype)
    if out.numel() == 0:
        return out
    values, no = row_values(x, dim, out)
    ct = out.info.ct if out.info.ct != "bool" else "i32"
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    k = rt.kernel(("cum", kind, no, st, ct, ost, wrap),
                  lambda: cumulative_wgsl(kind, no, st, ct, ost, wrap), kind)
    rt.dispatch(k, [out.buf, x.buf], SLOTS.bind(no=no).pack(**values, zero=0), -(-values["rows"] // 64))
    return out

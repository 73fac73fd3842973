"""Bit reinterpretation between dtypes (`view.dtype`), one thread per output element: each element's bytes are
assembled from the source elements that hold them (little-endian), as torch's view lays them.

On the device narrow integers live widened to i32 and bfloat16 as f32, so a dtype view is a repacking kernel
here, not metadata (the handler keeps the metadata view where the stored words already hold the same bits).
"""

from __future__ import annotations

import math
from functools import cache

import torch

from tapml.backends.webgpu.kernels.host import MAXD, new
from tapml.backends.webgpu.kernels.prelude import ENTRY, Layout, Slots, access, decompose, header
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.errors import TapmlError

# bytes per element of the dtypes a view can reinterpret (8-byte and bool views are refused by the handler)
SIZES = {torch.uint8: 1, torch.int8: 1, torch.int16: 2, torch.float16: 2, torch.bfloat16: 2, torch.int32: 4,
         torch.float32: 4}


@cache
def bitcast_slots(nd: int) -> Layout:
    """n output elements over `shape` (out fresh, contiguous); the source's offset and strides."""
    return Slots("n shape:nd x_off x_st:nd").bind(nd=nd)


def _bits(dt: torch.dtype, e: str) -> str:
    """The logical bits (u32, low bytes) of source element `e` (an element index) of dtype `dt`; float16 is
    read through a u32 binding of its buffer, two halves a word (naga mistypes bitcasts of vec2<f16>)."""
    if dt == torch.float16:
        return f"((x[({e}) >> 1u] >> ((({e}) & 1u) * 16u)) & 0xffffu)"
    if dt == torch.bfloat16:
        return f"(bitcast<u32>(x[{e}]) >> 16u)"
    mask = {1: " & 0xffu", 2: " & 0xffffu", 4: ""}[SIZES[dt]]
    return f"(bitcast<u32>(x[{e}]){mask})"


def _value(dt: torch.dtype, b: str) -> str:
    """The stored element of dtype `dt` whose logical bits are `b` (float16: not here, see `bitcast_wgsl`)."""
    return {torch.uint8: f"i32({b} & 0xffu)", torch.int8: f"wrap_i8(i32({b}))", torch.int16: f"wrap_i16(i32({b}))",
            torch.int32: f"bitcast<i32>({b})", torch.float32: f"bitcast<f32>({b})",
            torch.bfloat16: f"bitcast<f32>({b} << 16u)"}[dt]


def bitcast_wgsl(nd: int, src: tuple, dst: tuple) -> tuple[str, str]:
    """out[.., j] = the bytes [j*sb, (j+1)*sb) of the source's last dim reinterpreted. src, dst: (dtype,
    storage). A float16 output is written a u32 word (two elements) per thread. Params: `bitcast_slots`."""
    (sdt, sst), (ddt, dst_st) = src, dst
    sa, sb = SIZES[sdt], SIZES[ddt]
    half_out = ddt == torch.float16
    p = bitcast_slots(nd)
    u = p.u
    binds = [("o", "w", "u32" if half_out else dst_st), ("x", "r", "u32" if sdt == torch.float16 else sst)]
    out = [header(binds, 256)]
    base = " + ".join([u.x_off] + [f"c{d} * {s}" for d, s in enumerate(u.x_st[:-1])])
    last = f"c{nd - 1}"
    at = f"{base} + (E) * {u.x_st[-1]}"
    if sb >= sa:
        r = sb // sa
        parts = " | ".join(f"({_bits(sdt, at.replace('E', f'{last} * {r}u + {t}u'))} << {t * sa * 8}u)"
                           for t in range(r))
    else:
        r = sa // sb
        parts = f"({_bits(sdt, at.replace('E', f'{last} / {r}u'))} >> (({last} % {r}u) * {sb * 8}u))"
    out.append(f"fn bits_of(i: u32) -> u32 {{\n{decompose('i', u.shape)}  return {parts};\n}}\n")
    out.append(ENTRY.format(wg=256))
    out.append("  let i = (wid.x + wid.y * nwg.x) * WG + lid;\n")
    if half_out:
        out.append(f"  if (2u * i >= {u.n}) {{ return; }}\n  let lo = bits_of(2u * i) & 0xffffu;\n"
                   f"  var hi = 0u;\n  if (2u * i + 1u < {u.n}) {{ hi = bits_of(2u * i + 1u) & 0xffffu; }}\n"
                   "  o[i] = lo | (hi << 16u);\n}\n")
    else:
        out.append(f"  if (i >= {u.n}) {{ return; }}\n  o[i] = {_value(ddt, 'bits_of(i)')};\n}}\n")
    return "".join(out), access(binds)


def reinterpret(rt: Runtime, x: WGTensor, dtype: torch.dtype, shape: tuple[int, ...]) -> WGTensor:
    """A fresh `shape` tensor of `dtype` holding x's bytes (its last dim rescaled by the element sizes)."""
    out = new(rt, shape, dtype)
    n = out.numel()
    if n == 0:
        return out
    xs, xst = (list(x.shape), list(x.stride)) if x.dim() else ([1], [0])
    oshape = list(shape) if shape else [1]
    nd = len(oshape)
    if nd > MAXD:
        raise TapmlError(f"webgpu: a dtype view over {nd} dims (max {MAXD})")
    if math.prod(xs) * SIZES[x.dtype] != n * SIZES[dtype] or xs[:-1] != oshape[:-1]:
        raise TapmlError(f"webgpu: view of {x.dtype}{xs} as {dtype}{oshape} does not keep its bytes")
    spec = ((x.dtype, x.info.storage), (dtype, out.info.storage))
    k = rt.kernel(("bitcast", nd, spec), lambda: bitcast_wgsl(nd, *spec), "bitcast")
    threads = -(-n // 2) if dtype == torch.float16 else n
    rt.dispatch(k, [out.buf, x.buf], bitcast_slots(nd).pack(n=n, shape=oshape, x_off=x.offset, x_st=xst),
                -(-threads // 256))
    return out

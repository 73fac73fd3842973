"""Convolution over 1 to 3 spatial dims and 2-d pooling (max with indices, avg, adaptive avg), one thread per
output: WGSL beside launchers. Shapes arrive computed (output size, padding per side); ATen conventions stay in
the handlers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tapml.backends.webgpu.kernels.host import new
from tapml.backends.webgpu.kernels.prelude import ENTRY, Slots, access, header, load, store
from tapml.backends.webgpu.runtime import Runtime, WGTensor

# Sizes, (d, h, w) triples of stride, padding and dilation, groups; then each tensor's offset and strides
# (b: the bias). 1-d and 2-d convolutions run as 3-d ones with unit leading spatial dims.
CONV = Slots("N Cin D H W Cout OD OH OW KD KH KW stride:3 pad:3 dil:3 groups",
             "x_off x_st:5 w_off w_st:5 b_off b_st o_off o_st:5").bind()
# NC = N * C; count_pad: avg counts padding; divisor: avg's divisor_override (0: none); out and index
# outputs are fresh (offsets only).
POOL2D = Slots("NC C H W OH OW KH KW stride:2 pad:2 dil:2 count_pad divisor",
               "x_off x_st:4 o_off i_off").bind()


def conv_wgsl(st: str, ost: str, owrap: str, bias: bool) -> tuple[str, str]:
    """Direct convolution, one thread per output (n, co, od, oh, ow), groups/stride/padding/dilation, the
    products summed in (ci, kd, kh, kw) order. Params: CONV."""
    p = CONV
    u = p.u
    binds = [("o", "w", ost), ("x", "r", st), ("w", "r", st)] + ([("bb", "r", st)] if bias else [])
    src = [header(binds, 64), ENTRY.format(wg=64)]
    binit = load(st, "f32", f"bb[{u.b_off} + co * {u.b_st}]") if bias else "0.0"
    o_at = (f"{u.o_off} + nb * {u.o_st[0]} + co * {u.o_st[1]} + od * {u.o_st[2]} + oh * {u.o_st[3]}"
            f" + ow * {u.o_st[4]}")
    src.append(f"""  let t = (wid.x + wid.y * nwg.x) * WG + lid;
  let N = {u.N}; let Cin = {u.Cin}; let D = i32({u.D}); let H = i32({u.H}); let W = i32({u.W});
  let Cout = {u.Cout}; let OD = {u.OD}; let OH = {u.OH}; let OW = {u.OW};
  let KD = {u.KD}; let KH = {u.KH}; let KW = {u.KW};
  if (t >= N * Cout * OD * OH * OW) {{ return; }}
  let ow = t % OW; let oh = (t / OW) % OH; let od = (t / (OW * OH)) % OD;
  let co = (t / (OW * OH * OD)) % Cout; let nb = t / (OW * OH * OD * Cout);
  let cin_g = Cin / {u.groups}; let cout_g = Cout / {u.groups};
  let g = co / cout_g;
  var acc = 0.0;
  for (var ci = 0u; ci < cin_g; ci = ci + 1u) {{
    let xc = {u.x_off} + nb * {u.x_st[0]} + (g * cin_g + ci) * {u.x_st[1]};
    let wc = {u.w_off} + co * {u.w_st[0]} + ci * {u.w_st[1]};
    for (var kd = 0u; kd < KD; kd = kd + 1u) {{
      let id = i32(od * {u.stride[0]} + kd * {u.dil[0]}) - {p.i.pad[0]};
      if (id < 0 || id >= D) {{ continue; }}
      for (var kh = 0u; kh < KH; kh = kh + 1u) {{
        let ih = i32(oh * {u.stride[1]} + kh * {u.dil[1]}) - {p.i.pad[1]};
        if (ih < 0 || ih >= H) {{ continue; }}
        for (var kw = 0u; kw < KW; kw = kw + 1u) {{
          let iw = i32(ow * {u.stride[2]} + kw * {u.dil[2]}) - {p.i.pad[2]};
          if (iw < 0 || iw >= W) {{ continue; }}
          let xi = xc + u32(id) * {u.x_st[2]} + u32(ih) * {u.x_st[3]} + u32(iw) * {u.x_st[4]};
          let wi = wc + kd * {u.w_st[2]} + kh * {u.w_st[3]} + kw * {u.w_st[4]};
          acc = fma({load(st, 'f32', 'x[xi]')}, {load(st, 'f32', 'w[wi]')}, acc);
        }}
      }}
    }}
  }}
  o[{o_at}] = {store('f32', ost, owrap, f'acc + {binit}')};
}}
""")
    return "".join(src), access(binds)


def pool2d_wgsl(kind: str, st: str, ost: str, owrap: str, ist: str = "i32") -> tuple[str, str]:
    """kind: max (values + flat h*W+w indices), avg, adaptive_avg. One thread per output (n*c, oh, ow).
    Params: POOL2D."""
    p = POOL2D
    u, i = p.u, p.i
    binds = [("o", "w", ost)] + ([("oi", "w", ist)] if kind == "max" else []) + [("x", "r", st)]
    src = [header(binds, 64), ENTRY.format(wg=64)]
    src.append(f"""  let t = (wid.x + wid.y * nwg.x) * WG + lid;
  let NC = {u.NC}; let C = {u.C}; let H = i32({u.H}); let W = i32({u.W}); let OH = {u.OH}; let OW = {u.OW};
  if (t >= NC * OH * OW) {{ return; }}
  let ow = t % OW; let oh = (t / OW) % OH; let nc = t / (OW * OH);
  let xb = {u.x_off} + (nc / C) * {u.x_st[0]} + (nc % C) * {u.x_st[1]};
""")
    ld = load(st, "f32", f"x[xb + u32(ih) * {u.x_st[2]} + u32(iw) * {u.x_st[3]}]")
    h0, w0 = f"i32(oh * {u.stride[0]}) - {i.pad[0]}", f"i32(ow * {u.stride[1]}) - {i.pad[1]}"  # window corner
    if kind == "max":
        src.append(f"""  let h0 = {h0}; let w0 = {w0};
  var best = -f_inf();
  var bi = -1;
  for (var kh = 0u; kh < {u.KH}; kh = kh + 1u) {{
    let ih = h0 + i32(kh * {u.dil[0]});
    if (ih < 0 || ih >= H) {{ continue; }}
    for (var kw = 0u; kw < {u.KW}; kw = kw + 1u) {{
      let iw = w0 + i32(kw * {u.dil[1]});
      if (iw < 0 || iw >= W) {{ continue; }}
      let v = {ld};
      if (bi < 0 || v > best || (is_nan(v) && !is_nan(best))) {{ best = v; bi = ih * W + iw; }}
    }}
  }}
  o[{u.o_off} + t] = {store('f32', ost, owrap, 'best')};
  oi[{u.i_off} + t] = {ist}(bi);
}}
""")
    elif kind == "avg":
        src.append(f"""  var hs = {h0}; var ws = {w0};
  var he = min(hs + i32({u.KH}), H + {i.pad[0]}); var we = min(ws + i32({u.KW}), W + {i.pad[1]});
  let pool = (he - hs) * (we - ws);
  hs = max(hs, 0); ws = max(ws, 0); he = min(he, H); we = min(we, W);
  var s = 0.0;
  for (var ih = hs; ih < he; ih = ih + 1) {{
    for (var iw = ws; iw < we; iw = iw + 1) {{ s = s + {ld}; }}
  }}
  var div = f32(select((he - hs) * (we - ws), pool, {u.count_pad} != 0u));
  if ({i.divisor} != 0) {{ div = f32({i.divisor}); }}
  o[{u.o_off} + t] = {store('f32', ost, owrap, 's / div')};
}}
""")
    else:
        src.append(f"""  let OHi = i32(OH); let OWi = i32(OW);
  let hs = (i32(oh) * H) / OHi; let he = ((i32(oh) + 1) * H + OHi - 1) / OHi;
  let ws = (i32(ow) * W) / OWi; let we = ((i32(ow) + 1) * W + OWi - 1) / OWi;
  var s = 0.0;
  for (var ih = hs; ih < he; ih = ih + 1) {{
    for (var iw = ws; iw < we; iw = iw + 1) {{ s = s + {ld}; }}
  }}
  o[{u.o_off} + t] = {store('f32', ost, owrap, 's / f32((he - hs) * (we - ws))')};
}}
""")
    return "".join(src), access(binds)


def _spatial3(t: WGTensor) -> WGTensor:
    """An [N, C, *spatial] tensor (1 to 3 spatial dims) as [N, C, D, H, W], unit dims in front."""
    lead = 5 - t.dim()
    return t.view_as(t.shape[:2] + (1,) * lead + t.shape[2:], t.stride[:2] + (0,) * lead + t.stride[2:], t.offset)


def convolution(rt: Runtime, x: WGTensor, w: WGTensor, bias: WGTensor | None, stride: Sequence[int],
         padding: Sequence[int], dilation: Sequence[int], groups: int, out_shape: Sequence[int]) -> WGTensor:
    """Convolution over 1 to 3 spatial dims (x [N, C, *spatial], w [Cout, C/groups, *kernel]); stride, padding
    and dilation one per spatial dim; `out_shape` computed by the caller."""
    out = new(rt, out_shape, x.dtype)
    if out.numel() == 0:
        return out
    lead = 5 - x.dim()
    x5, w5, o5 = _spatial3(x), _spatial3(w), _spatial3(out)
    stride, padding, dilation = ([1] * lead + list(stride), [0] * lead + list(padding), [1] * lead + list(dilation))
    n, cin, dd, hh, ww = x5.shape
    cout, _, kd, kh, kw = w5.shape
    params = CONV.pack(N=n, Cin=cin, D=dd, H=hh, W=ww, Cout=cout, OD=o5.shape[2], OH=o5.shape[3], OW=o5.shape[4],
                       KD=kd, KH=kh, KW=kw, stride=stride, pad=padding, dil=dilation, groups=groups,
                       x_off=x5.offset, x_st=x5.stride, w_off=w5.offset, w_st=w5.stride,
                       b_off=bias.offset if bias is not None else 0,
                       b_st=bias.stride[0] if bias is not None else 0, o_off=o5.offset, o_st=o5.stride)
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    k = rt.kernel(("conv", st, ost, wrap, bias is not None),
                  lambda: conv_wgsl(st, ost, wrap, bias is not None), "conv")
    bufs = [out.buf, x.buf, w.buf] + ([bias.buf] if bias is not None else [])
    rt.dispatch(k, bufs, params, -(-out.numel() // 64))
    return out


def pool2d(rt: Runtime, kind: str, x: WGTensor, out_hw: Sequence[int], kernel: Sequence[int] = (1, 1),
           stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
           count_include_pad: bool = True, divisor: int | None = None) -> tuple[WGTensor, WGTensor | None]:
    """x is [N, C, H, W] (a 3-d input is passed as N=1). Returns (out, indices or None)."""
    n, c, hh, ww = x.shape
    oh, ow = out_hw
    out = new(rt, (n, c, oh, ow), x.dtype)
    idx = new(rt, (n, c, oh, ow), torch.int64) if kind == "max" else None
    if out.numel() == 0:
        return out, idx
    params = POOL2D.pack(NC=n * c, C=c, H=hh, W=ww, OH=oh, OW=ow, KH=kernel[0], KW=kernel[1],
                                stride=stride, pad=padding, dil=dilation, count_pad=int(count_include_pad),
                                divisor=divisor or 0, x_off=x.offset, x_st=x.stride, o_off=out.offset,
                                i_off=idx.offset if idx is not None else 0)
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    ist = idx.info.storage if idx is not None else "i32"
    k = rt.kernel(("pool", kind, st, ost, wrap, ist), lambda: pool2d_wgsl(kind, st, ost, wrap, ist),
                  f"pool-{kind}")
    bufs = [out.buf] + ([idx.buf] if idx is not None else []) + [x.buf]
    rt.dispatch(k, bufs, params, -(-out.numel() // 64))
    return out, idx

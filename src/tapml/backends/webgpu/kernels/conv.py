"""2-d convolution and pooling (max with indices, avg, adaptive avg), one thread per output: WGSL beside launchers.

Shapes arrive computed (output size, padding per side); ATen argument conventions stay in the handlers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tapml.backends.webgpu.kernels.host import new
from tapml.backends.webgpu.kernels.prelude import ENTRY, header, load, store
from tapml.backends.webgpu.runtime import Runtime, WGTensor


def conv2d_wgsl(st: str, ost: str, owrap: str, bias: bool) -> tuple[str, str]:
    """Direct convolution, one thread per output (n, co, oh, ow), groups/stride/padding/dilation.
    Params: [0] N [1] Cin [2] H [3] W [4] Cout [5] OH [6] OW [7] KH [8] KW [9] sh [10] sw [11] ph [12] pw
    [13] dh [14] dw [15] groups; x off + 4 strides 16..20; w off + 4 strides 21..25; bias off/stride 26..27;
    out off + 4 strides 28..32."""
    binds = [("o", "w", ost), ("x", "r", st), ("w", "r", st)] + ([("bb", "r", st)] if bias else [])
    src = [header(binds, 64), ENTRY.format(wg=64)]
    binit = load(st, "f32", "bb[pu(26u) + co * pu(27u)]") if bias else "0.0"
    src.append(f"""  let t = (wid.x + wid.y * nwg.x) * WG + lid;
  let N = pu(0u); let Cin = pu(1u); let H = i32(pu(2u)); let W = i32(pu(3u)); let Cout = pu(4u);
  let OH = pu(5u); let OW = pu(6u); let KH = pu(7u); let KW = pu(8u);
  if (t >= N * Cout * OH * OW) {{ return; }}
  let ow = t % OW; let oh = (t / OW) % OH; let co = (t / (OW * OH)) % Cout; let nb = t / (OW * OH * Cout);
  let cin_g = Cin / pu(15u); let cout_g = Cout / pu(15u);
  let g = co / cout_g;
  var acc = 0.0;
  for (var ci = 0u; ci < cin_g; ci = ci + 1u) {{
    let xc = pu(16u) + nb * pu(17u) + (g * cin_g + ci) * pu(18u);
    let wc = pu(21u) + co * pu(22u) + ci * pu(23u);
    for (var kh = 0u; kh < KH; kh = kh + 1u) {{
      let ih = i32(oh * pu(9u) + kh * pu(13u)) - pi(11u);
      if (ih < 0 || ih >= H) {{ continue; }}
      for (var kw = 0u; kw < KW; kw = kw + 1u) {{
        let iw = i32(ow * pu(10u) + kw * pu(14u)) - pi(12u);
        if (iw < 0 || iw >= W) {{ continue; }}
        acc = fma({load(st, 'f32', 'x[xc + u32(ih) * pu(19u) + u32(iw) * pu(20u)]')},
                  {load(st, 'f32', 'w[wc + kh * pu(24u) + kw * pu(25u)]')}, acc);
      }}
    }}
  }}
  o[pu(28u) + nb * pu(29u) + co * pu(30u) + oh * pu(31u) + ow * pu(32u)] = {store('f32', ost, owrap, f'acc + {binit}')};
}}
""")
    return "".join(src), "wrr" + ("r" if bias else "")


def pool2d_wgsl(kind: str, st: str, ost: str, owrap: str, ist: str = "i32") -> tuple[str, str]:
    """kind: max (values + flat h*W+w indices), avg, adaptive_avg. One thread per output (n*c, oh, ow).
    Params: [0] NC [1] C [2] H [3] W [4] OH [5] OW [6] KH [7] KW [8] sh [9] sw [10] ph [11] pw [12] dh [13] dw
    [14] count_include_pad [15] divisor (0 = none); x off/sn/sc/sh/sw 16..20; out off 21; idx off 22."""
    binds = [("o", "w", ost)] + ([("oi", "w", ist)] if kind == "max" else []) + [("x", "r", st)]
    src = [header(binds, 64), ENTRY.format(wg=64)]
    src.append("""  let t = (wid.x + wid.y * nwg.x) * WG + lid;
  let NC = pu(0u); let C = pu(1u); let H = i32(pu(2u)); let W = i32(pu(3u)); let OH = pu(4u); let OW = pu(5u);
  if (t >= NC * OH * OW) { return; }
  let ow = t % OW; let oh = (t / OW) % OH; let nc = t / (OW * OH);
  let xb = pu(16u) + (nc / C) * pu(17u) + (nc % C) * pu(18u);
""")
    ld = load(st, "f32", "x[xb + u32(ih) * pu(19u) + u32(iw) * pu(20u)]")
    if kind == "max":
        src.append(f"""  let h0 = i32(oh * pu(8u)) - pi(10u); let w0 = i32(ow * pu(9u)) - pi(11u);
  var best = -f_inf();
  var bi = -1;
  for (var kh = 0u; kh < pu(6u); kh = kh + 1u) {{
    let ih = h0 + i32(kh * pu(12u));
    if (ih < 0 || ih >= H) {{ continue; }}
    for (var kw = 0u; kw < pu(7u); kw = kw + 1u) {{
      let iw = w0 + i32(kw * pu(13u));
      if (iw < 0 || iw >= W) {{ continue; }}
      let v = {ld};
      if (bi < 0 || v > best || (is_nan(v) && !is_nan(best))) {{ best = v; bi = ih * W + iw; }}
    }}
  }}
  o[pu(21u) + t] = {store('f32', ost, owrap, 'best')};
  oi[pu(22u) + t] = {ist}(bi);
}}
""")
    elif kind == "avg":
        src.append(f"""  var hs = i32(oh * pu(8u)) - pi(10u); var ws = i32(ow * pu(9u)) - pi(11u);
  var he = min(hs + i32(pu(6u)), H + pi(10u)); var we = min(ws + i32(pu(7u)), W + pi(11u));
  let pool = (he - hs) * (we - ws);
  hs = max(hs, 0); ws = max(ws, 0); he = min(he, H); we = min(we, W);
  var s = 0.0;
  for (var ih = hs; ih < he; ih = ih + 1) {{
    for (var iw = ws; iw < we; iw = iw + 1) {{ s = s + {ld}; }}
  }}
  var div = f32(select((he - hs) * (we - ws), pool, pu(14u) != 0u));
  if (pi(15u) != 0) {{ div = f32(pi(15u)); }}
  o[pu(21u) + t] = {store('f32', ost, owrap, 's / div')};
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
  o[pu(21u) + t] = {store('f32', ost, owrap, 's / f32((he - hs) * (we - ws))')};
}}
""")
    return "".join(src), "w" + ("w" if kind == "max" else "") + "r"


def conv2d(rt: Runtime, x: WGTensor, w: WGTensor, bias: WGTensor | None, stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int, out_shape: Sequence[int]) -> WGTensor:
    n, cin, hh, ww = x.shape
    cout, _, kh, kw = w.shape
    out = new(rt, out_shape, x.dtype)
    if out.numel() == 0:
        return out
    oh, ow = out_shape[2], out_shape[3]
    params = [n, cin, hh, ww, cout, oh, ow, kh, kw, stride[0], stride[1], padding[0], padding[1],
              dilation[0], dilation[1], groups]
    params += [x.offset] + list(x.stride) + [w.offset] + list(w.stride)
    params += [bias.offset, bias.stride[0]] if bias is not None else [0, 0]
    params += [out.offset] + list(out.stride)
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    k = rt.kernel(("conv2d", st, ost, wrap, bias is not None),
                  lambda: conv2d_wgsl(st, ost, wrap, bias is not None)[0], "wrr" + ("r" if bias is not None else ""),
                  "conv2d")
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
    params = [n * c, c, hh, ww, oh, ow, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1],
              dilation[0], dilation[1], int(count_include_pad), divisor or 0]
    params += [x.offset] + list(x.stride) + [out.offset, idx.offset if idx is not None else 0]
    st, ost, wrap = x.info.storage, out.info.storage, out.info.wrap
    ist = idx.info.storage if idx is not None else "i32"
    k = rt.kernel(("pool", kind, st, ost, wrap, ist), lambda: pool2d_wgsl(kind, st, ost, wrap, ist)[0],
                  "wwr" if idx is not None else "wr", f"pool-{kind}")
    bufs = [out.buf] + ([idx.buf] if idx is not None else []) + [x.buf]
    rt.dispatch(k, bufs, params, -(-out.numel() // 64))
    return out, idx

"""Scaled dot-product attention, flash-style (keys in chunks, online softmax): the WGSL and its launcher.

It computes what `_scaled_dot_product_*_attention` asks; argument conventions (dropout, GQA shapes) stay in the handlers.
"""

from __future__ import annotations

import torch

from tapml.backends.webgpu.kernels.host import bcast_strides, fbits, new
from tapml.backends.webgpu.kernels.prelude import ENTRY, header, load, store, tree
from tapml.backends.webgpu.runtime import Runtime, WGTensor


def attention_wgsl(st: str, mask: str | None, ept: int, wg: int) -> tuple[str, str]:
    """Flash-style attention, one workgroup per (b, h, query row): keys in chunks of WG, online softmax.

    mask: None, 'f' (additive, any float storage) or 'b' (bool, keep where true). Each thread owns `ept`
    output features (e = lid + i * WG). Params: [0] B [1] H [2] L [3] S [4] E [5] Ev [6] H/Hk
    [7] scale (f32) [8] causal; q off + 4 strides 9..13; k 14..18; v 19..23; mask 24..28; out off + 4 strides
    29..33; lse off + 3 strides 34..37.
    """
    binds = [("o", "w", st), ("lse", "w", "f32"), ("q", "r", st), ("k", "r", st), ("v", "r", st)]
    if mask:
        binds.append(("mk", "r", mask if mask != "b" else "u32"))
    src = [header(binds, wg), (f"var<workgroup> qs: array<f32, {ept * wg}>;\nvar<workgroup> ps: array<f32, {wg}>;\n"
           f"var<workgroup> red: array<f32, {wg}>;\n"), ENTRY.format(wg=wg)]
    if mask == "b":
        madd = "select(-f_inf(), 0.0, mk[pu(24u) + bi * pu(25u) + hi * pu(26u) + li * pu(27u) + j * pu(28u)] != 0u)"
    elif mask:
        madd = load(mask, "f32", "mk[pu(24u) + bi * pu(25u) + hi * pu(26u) + li * pu(27u) + j * pu(28u)]")
    else:
        madd = "0.0"
    src.append(f"""  let r = wid.x + wid.y * nwg.x;
  let B = pu(0u); let H = pu(1u); let L = pu(2u); let S = pu(3u); let E = pu(4u); let Ev = pu(5u);
  if (r >= B * H * L) {{ return; }}
  let li = r % L; let hi = (r / L) % H; let bi = r / (L * H);
  let hk = hi / pu(6u);
  let scale = pf(7u);
  let causal = pu(8u) != 0u;
  let qb = pu(9u) + bi * pu(10u) + hi * pu(11u) + li * pu(12u);
  for (var i = 0u; i < {ept}u; i = i + 1u) {{
    let e = lid + i * WG;
    if (e < E) {{ qs[e] = {load(st, 'f32', 'q[qb + e * pu(13u)]')}; }}
  }}
  workgroupBarrier();
  let kb = pu(14u) + bi * pu(15u) + hk * pu(16u);
  let vb = pu(19u) + bi * pu(20u) + hk * pu(21u);
  var m = -f_inf();
  var l = 0.0;
  var acc: array<f32, {ept}>;
  for (var i = 0u; i < {ept}u; i = i + 1u) {{ acc[i] = 0.0; }}
  for (var j0 = 0u; j0 < S; j0 = j0 + WG) {{
    let j = j0 + lid;
    var s = -f_inf();
    if (j < S && !(causal && j > li)) {{
      var d = 0.0;
      for (var e = 0u; e < E; e = e + 1u) {{ d = fma(qs[e], {load(st, 'f32', 'k[kb + j * pu(17u) + e * pu(18u)]')}, d); }}
      s = d * scale + {madd};
    }}
    red[lid] = s;
    workgroupBarrier();
{tree("red", "f_max({a}, {b})")}    let mb = red[0];
    let mn = f_max(m, mb);
    let mu = select(mn, 0.0, is_inf(mn) && mn < 0.0);
    let p = select(t_exp(s - mu), 0.0, is_inf(s) && s < 0.0);
    workgroupBarrier();
    ps[lid] = p;
    red[lid] = p;
    workgroupBarrier();
{tree("red", "{a} + {b}")}    let corr = select(t_exp(m - mu), 0.0, is_inf(m) && m < 0.0);
    l = l * corr + red[0];
    let cnt = min(WG, S - j0);
    for (var i = 0u; i < {ept}u; i = i + 1u) {{
      let e = lid + i * WG;
      if (e < Ev) {{
        var a2 = acc[i] * corr;
        for (var jj = 0u; jj < cnt; jj = jj + 1u) {{
          a2 = fma(ps[jj], {load(st, 'f32', 'v[vb + (j0 + jj) * pu(22u) + e * pu(23u)]')}, a2);
        }}
        acc[i] = a2;
      }}
    }}
    m = mn;
    workgroupBarrier();
  }}
  let ob = pu(29u) + bi * pu(30u) + hi * pu(31u) + li * pu(32u);
  for (var i = 0u; i < {ept}u; i = i + 1u) {{
    let e = lid + i * WG;
    if (e < Ev) {{ o[ob + e * pu(33u)] = {store('f32', st, '', 'select(acc[i] / l, 0.0, l == 0.0)')}; }}
  }}
  // a row with every key masked gives zeros (and logsumexp 0), as torch's CPU kernel does
  if (lid == 0u) {{ lse[pu(34u) + bi * pu(35u) + hi * pu(36u) + li * pu(37u)] = select(m + t_log(l), 0.0, l == 0.0); }}
}}
""")
    return "".join(src), "wwrrr" + ("r" if mask else "")


def attention(rt: Runtime, q: WGTensor, k: WGTensor, v: WGTensor, mask: WGTensor | None, scale: float,
              causal: bool) -> tuple[WGTensor, WGTensor]:
    """softmax(q k^T * scale + mask) v for [B, H, L, E] inputs; returns (out [B,H,L,Ev], logsumexp [B,H,L])."""
    bsz, h, seq_l, e = q.shape
    hk, seq_s = k.shape[1], k.shape[2]
    ev = v.shape[3]
    out = new(rt, (bsz, h, seq_l, ev), q.dtype)
    lse = new(rt, (bsz, h, seq_l), torch.float32)
    if out.numel() == 0:
        return out, lse
    wg = 64
    ept = max(1, -(-max(e, ev) // wg))
    mkind = None
    params = [bsz, h, seq_l, seq_s, e, ev, h // hk, fbits(scale), int(causal)]
    params += [q.offset] + list(q.stride) + [k.offset] + list(k.stride) + [v.offset] + list(v.stride)
    bufs = [out.buf, lse.buf, q.buf, k.buf, v.buf]
    if mask is not None:
        mkind = "b" if mask.dtype == torch.bool else mask.info.storage
        params += [mask.offset] + bcast_strides(mask, (bsz, h, seq_l, seq_s))
        bufs.append(mask.buf)
    else:
        params += [0, 0, 0, 0, 0]
    params += [out.offset] + list(out.stride) + [lse.offset] + list(lse.stride)
    st = q.info.storage
    kern = rt.kernel(("attn", st, mkind, ept, wg), lambda: attention_wgsl(st, mkind, ept, wg)[0],
                     "wwrrr" + ("r" if mask is not None else ""), "attention")
    rt.dispatch(kern, bufs, params, bsz * h * seq_l)
    return out, lse

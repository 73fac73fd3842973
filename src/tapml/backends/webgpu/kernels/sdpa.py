"""Scaled dot-product attention, flash-style (keys in chunks, online softmax): the WGSL and its launcher.

It computes what `_scaled_dot_product_*_attention` asks; argument conventions (dropout, GQA shapes) stay
in the handlers.
"""

from __future__ import annotations

import torch

from tapml.backends.webgpu.kernels.host import bcast_strides, fbits, new
from tapml.backends.webgpu.kernels.prelude import ENTRY, Slots, access, header, load, store, tree
from tapml.backends.webgpu.runtime import Runtime, WGTensor

# Sizes (batch, heads, query and key lengths, feature sizes of q/k and of v), heads per kv head, the scale and
# causal; then each tensor's offset and strides ([B, H, L, E] order; the mask broadcast to [B, H, L, S]).
SLOTS = Slots("B H L S E Ev group scale causal", "q_off q_st:4 k_off k_st:4 v_off v_st:4",
              "m_off m_st:4 o_off o_st:4 lse_off lse_st:3").bind()


def attention_wgsl(st: str, mask: str | None, ept: int, wg: int) -> tuple[str, str]:
    """Flash-style attention, one workgroup per (b, h, query row): keys in chunks of WG, online softmax.

    mask: None, 'f' (additive, any float storage) or 'b' (bool, keep where true). Each thread owns `ept`
    output features (e = lid + i * WG). Params: SLOTS.
    """
    p = SLOTS
    u = p.u
    binds = [("o", "w", st), ("lse", "w", "f32"), ("q", "r", st), ("k", "r", st), ("v", "r", st)]
    if mask:
        binds.append(("mk", "r", mask if mask != "b" else "u32"))
    src = [header(binds, wg), (f"var<workgroup> qs: array<f32, {ept * wg}>;\nvar<workgroup> ps: array<f32, {wg}>;\n"
           f"var<workgroup> red: array<f32, {wg}>;\n"), ENTRY.format(wg=wg)]
    kj = load(st, "f32", f"k[kb + j * {u.k_st[2]} + e * {u.k_st[3]}]")
    lse_at = f"{u.lse_off} + bi * {u.lse_st[0]} + hi * {u.lse_st[1]} + li * {u.lse_st[2]}"
    mk = f"mk[{u.m_off} + bi * {u.m_st[0]} + hi * {u.m_st[1]} + li * {u.m_st[2]} + j * {u.m_st[3]}]"
    if mask == "b":
        madd = f"select(-f_inf(), 0.0, {mk} != 0u)"
    elif mask:
        madd = load(mask, "f32", mk)
    else:
        madd = "0.0"
    src.append(f"""  let r = wid.x + wid.y * nwg.x;
  let B = {u.B}; let H = {u.H}; let L = {u.L}; let S = {u.S}; let E = {u.E}; let Ev = {u.Ev};
  if (r >= B * H * L) {{ return; }}
  let li = r % L; let hi = (r / L) % H; let bi = r / (L * H);
  let hk = hi / {u.group};
  let scale = {p.f.scale};
  let causal = {u.causal} != 0u;
  let qb = {u.q_off} + bi * {u.q_st[0]} + hi * {u.q_st[1]} + li * {u.q_st[2]};
  for (var i = 0u; i < {ept}u; i = i + 1u) {{
    let e = lid + i * WG;
    if (e < E) {{ qs[e] = {load(st, 'f32', f'q[qb + e * {u.q_st[3]}]')}; }}
  }}
  workgroupBarrier();
  let kb = {u.k_off} + bi * {u.k_st[0]} + hk * {u.k_st[1]};
  let vb = {u.v_off} + bi * {u.v_st[0]} + hk * {u.v_st[1]};
  var m = -f_inf();
  var l = 0.0;
  var acc: array<f32, {ept}>;
  for (var i = 0u; i < {ept}u; i = i + 1u) {{ acc[i] = 0.0; }}
  for (var j0 = 0u; j0 < S; j0 = j0 + WG) {{
    let j = j0 + lid;
    var s = -f_inf();
    if (j < S && !(causal && j > li)) {{
      var d = 0.0;
      for (var e = 0u; e < E; e = e + 1u) {{ d = fma(qs[e], {kj}, d); }}
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
          a2 = fma(ps[jj], {load(st, 'f32', f'v[vb + (j0 + jj) * {u.v_st[2]} + e * {u.v_st[3]}]')}, a2);
        }}
        acc[i] = a2;
      }}
    }}
    m = mn;
    workgroupBarrier();
  }}
  let ob = {u.o_off} + bi * {u.o_st[0]} + hi * {u.o_st[1]} + li * {u.o_st[2]};
  for (var i = 0u; i < {ept}u; i = i + 1u) {{
    let e = lid + i * WG;
    if (e < Ev) {{ o[ob + e * {u.o_st[3]}] = {store('f32', st, '', 'select(acc[i] / l, 0.0, l == 0.0)')}; }}
  }}
  // a row with every key masked gives zeros (and logsumexp 0), as torch's CPU kernel does
  if (lid == 0u) {{ lse[{lse_at}] = select(m + t_log(l), 0.0, l == 0.0); }}
}}
""")
    return "".join(src), access(binds)


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
    mkind = None if mask is None else "b" if mask.dtype == torch.bool else mask.info.storage
    m_off, m_st = 0, (0,) * 4
    if mask is not None:
        m_off, m_st = mask.offset, bcast_strides(mask, (bsz, h, seq_l, seq_s))
    params = SLOTS.pack(B=bsz, H=h, L=seq_l, S=seq_s, E=e, Ev=ev, group=h // hk, scale=fbits(scale),
                               causal=int(causal), q_off=q.offset, q_st=q.stride, k_off=k.offset,
                               k_st=k.stride, v_off=v.offset, v_st=v.stride, m_off=m_off, m_st=m_st,
                               o_off=out.offset, o_st=out.stride, lse_off=lse.offset, lse_st=lse.stride)
    bufs = [out.buf, lse.buf, q.buf, k.buf, v.buf] + ([mask.buf] if mask is not None else [])
    st = q.info.storage
    kern = rt.kernel(("attn", st, mkind, ept, wg), lambda: attention_wgsl(st, mkind, ept, wg), "attention")
    rt.dispatch(kern, bufs, params, bsz * h * seq_l)
    return out, lse

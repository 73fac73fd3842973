"""Reductions into data-chosen destinations (index_add, scatter_add, scatter_reduce, bincount): contributions
bucketed by destination, then each destination reduces its own bucket in contribution order. WGSL beside
launchers.

WGSL has no floating-point atomics, and atomics would make a float sum's rounding depend on thread timing.
So `bucket` is a stable counting sort by destination key: an integer atomic counts each key and hands every
contribution a provisional slot, an exclusive prefix (`compact.prefix`) turns the counts into bucket offsets,
and each contribution then takes its final place by counting the bucket members with a smaller contribution
index (O(bucket size) each). `segment_reduce` runs one thread per destination element over its bucket, in
that order: the result is deterministic and a float sum adds in index order, as torch's CPU loop does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import torch

from tapml.backends.webgpu.kernels.compact import prefix
from tapml.backends.webgpu.kernels.elementwise import fill
from tapml.backends.webgpu.kernels.host import MAXD, new, word
from tapml.backends.webgpu.kernels.prelude import ENTRY, Layout, Slots, access, decompose, header, load, store
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.errors import TapmlError

_WG = 256
PLACE = Slots("n").bind()

# kind -> (identity, combine of acc and v); {max}/{min} are NaN-propagating for floats
REDUCE = {"sum": ("0", "acc + v"), "mean": ("0", "acc + v"), "prod": ("1", "acc * v"),
          "amax": ("LOWEST", "{max}(acc, v)"), "amin": ("HIGHEST", "{min}(acc, v)")}


@cache
def keys_slots(nd: int, nidx: int) -> Layout:
    """n contributions over the index space `shape`; a contribution's key is sum_d c_d * kc_d plus, per index
    tensor k (its offset and strides over the index space), wrap(index_k) * mul_k, wrap adding `wrap_k` to a
    negative index; `m` keys (a key outside [0, m) drops the contribution)."""
    index = [f"ix{k}_off ix{k}_st:nd ix{k}_mul ix{k}_wrap" for k in range(nidx)]
    return Slots("n shape:nd kc:nd m", *index).bind(nd=nd)


@cache
def reduce_slots(no: int, ni: int) -> Layout:
    """n destination elements over `oshape` (out fresh, contiguous): self's offset and strides, the key of a
    destination (sum_d c_d * ke_d), the source's offset, its coefficients per destination coordinate (sa) and
    per coordinate of a contribution over the index space `ishape` (sb); alpha (sum only) and include_self (0:
    no, 1: self reduced and counted, 2: reduced but not counted by mean, as segment_reduce's `initial`)."""
    return Slots("n oshape:no x_off x_st:no ke:no", "s_off sa:no ishape:ni sb:ni alpha include_self").bind(
        no=no, ni=ni)


def keys_wgsl(nd: int, ists: tuple[str, ...]) -> tuple[str, str]:
    """Each contribution's key, and a provisional slot in its bucket from an integer atomic count (-1 keys:
    out of range, dropped). `ists`: the index tensors' storage types. Params: `keys_slots`."""
    p = keys_slots(nd, len(ists))
    u = p.u
    binds = [("cnt", "w", "atomic<i32>"), ("slot", "w", "i32"), ("key", "w", "i32")]
    binds += [(f"ix{k}", "r", t) for k, t in enumerate(ists)]
    src = [header(binds, _WG), ENTRY.format(wg=_WG)]
    src.append(f"  let i = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (i >= {u.n}) {{ return; }}\n")
    src.append(decompose("i", u.shape))
    kc = "".join(f" + i32(c{d} * {s})" for d, s in enumerate(u.kc))
    src.append(f"  var k = 0{kc};\n  var valid = true;\n")
    for k in range(len(ists)):
        at = " + ".join([u[f"ix{k}_off"]] + [f"c{d} * {s}" for d, s in enumerate(u[f"ix{k}_st"])])
        src.append(f"  {{\n    let iv = i32(ix{k}[{at}]);\n    let w = select(iv, iv + {p.i[f'ix{k}_wrap']}, iv < 0);\n"
                   f"    valid = valid && w >= 0;\n    k = k + w * {p.i[f'ix{k}_mul']};\n  }}\n")
    src.append(f"""  if (!valid || k < 0 || k >= {p.i.m}) {{ key[i] = -1; return; }}
  key[i] = k;
  slot[i] = atomicAdd(&cnt[k], 1);
}}
""")
    return "".join(src), access(binds)


def place_wgsl(final: bool) -> tuple[str, str]:
    """Provisional (`final` False): tmp[offs[key] + slot] = i. Final: perm[offs[key] + rank] = i, rank the
    number of the bucket's members with a smaller contribution index (a stable order). Params: PLACE."""
    u = PLACE.u
    binds = ([("perm", "w", "i32"), ("tmp", "r", "i32")] if final else [("tmp", "w", "i32"), ("slot", "r", "i32")])
    binds += [("key", "r", "i32"), ("offs", "r", "i32")]
    src = [header(binds, _WG), ENTRY.format(wg=_WG)]
    src.append(f"  let i = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (i >= {u.n}) {{ return; }}\n"
               "  let k = key[i];\n  if (k < 0) { return; }\n  let b0 = u32(offs[k]);\n")
    if final:
        src.append("  let b1 = u32(offs[k + 1]);\n  var r = 0u;\n"
                   "  for (var t = b0; t < b1; t = t + 1u) { if (tmp[t] < i32(i)) { r = r + 1u; } }\n"
                   "  perm[b0 + r] = i32(i);\n}\n")
    else:
        src.append("  tmp[b0 + u32(slot[i])] = i32(i);\n}\n")
    return "".join(src), access(binds)


def segment_wgsl(kind: str, no: int, ni: int, st: str, sst: str, ct: str, ost: str, owrap: str) -> tuple[str, str]:
    """One thread per destination element: its bucket's contributions reduced in order, onto self when
    include_self; a destination no contribution reaches keeps self. Params: `reduce_slots`."""
    p = reduce_slots(no, ni)
    u = p.u
    binds = [("o", "w", ost), ("x", "r", st), ("s", "r", sst), ("perm", "r", "i32"), ("offs", "r", "i32")]
    src = [header(binds, _WG), ENTRY.format(wg=_WG)]
    src.append(f"  let e = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (e >= {u.n}) {{ return; }}\n")
    src.append(decompose("e", u.oshape))
    key = " + ".join(["0u"] + [f"c{d} * {s}" for d, s in enumerate(u.ke)])
    base = " + ".join([u.s_off] + [f"c{d} * {s}" for d, s in enumerate(u.sa)])
    xat = " + ".join([u.x_off] + [f"c{d} * {s}" for d, s in enumerate(u.x_st)])
    inner = decompose("j", u.ishape, "q").replace("\n  ", "\n    ")
    sat = " + ".join(["base"] + [f"q{d} * {s}" for d, s in enumerate(u.sb)])
    ident, comb = REDUCE[kind]
    lowest = {"f32": "-f_inf()", "i32": "(-2147483647 - 1)", "i64": "(-9223372036854775807li - 1li)"}[ct]
    highest = {"f32": "f_inf()", "i32": "2147483647", "i64": "9223372036854775807li"}[ct]
    ident = {"0": f"{ct}(0)", "1": f"{ct}(1)", "LOWEST": lowest, "HIGHEST": highest}[ident]
    comb = comb.format(max="f_max" if ct == "f32" else "max", min="f_min" if ct == "f32" else "min")
    alpha = {"f32": p.f.alpha, "i32": p.i.alpha, "i64": f"i64({p.i.alpha})"}[ct]
    scale = f" * {alpha}" if kind == "sum" else ""
    src.append(f"""  let k = {key};
  let base = {base};
  let self_v = {load(st, ct, f'x[{xat}]')};
  let b0 = u32(offs[k]);
  let b1 = u32(offs[k + 1u]);
  let inc = {u.include_self} != 0u;
  var acc = select({ident}, self_v, inc);
  for (var t = b0; t < b1; t = t + 1u) {{
    let j = u32(perm[t]);
  {inner}    let v = {load(sst, ct, f's[{sat}]')}{scale};
    acc = {comb};
  }}
""")
    if kind == "mean":
        src.append(f"  let cnt = b1 - b0 + select(0u, 1u, {u.include_self} == 1u);\n"
                   f"  if (cnt > 0u) {{ acc = acc / {ct}(cnt); }}\n")
    src.append(f"  if (b1 == b0 && !inc) {{ acc = self_v; }}\n  o[e] = {store(ct, ost, owrap, 'acc')};\n}}\n")
    return "".join(src), access(binds)


def bucket(rt: Runtime, shape: Sequence[int], kc: Sequence[int],
           index: Sequence[tuple[WGTensor, Sequence[int], int, int]], m: int,
           counts_only: bool = False) -> tuple[WGTensor, WGTensor, WGTensor]:
    """Contributions over the index space `shape` keyed by destination (`keys_slots`; index: per index tensor
    (tensor, its strides over the index space, its multiplier, the size a negative index wraps by, 0: none)),
    sorted stably by key: (offs [m + 1] int32, the bucket offsets; perm [n] int32, contribution indices bucket
    by bucket in index order; cnt [m] int32, the bucket sizes). `counts_only`: the sizes alone (offs and perm
    left unwritten). Placing costs O(bucket size) per contribution: n^2 when every one goes to one destination."""
    nd, n = len(shape), math.prod(shape)
    if nd > MAXD:
        raise TapmlError(f"webgpu: scatter over {nd} dims (max {MAXD})")
    cnt = fill(rt, new(rt, (m,), torch.int32), 0)
    slot, key = new(rt, (n,), torch.int32), new(rt, (n,), torch.int32)
    tmp, perm = new(rt, (n,), torch.int32), new(rt, (n,), torch.int32)
    ists = tuple(t.info.storage for t, *_ in index)
    groups = -(-n // _WG)
    words: dict[str, object] = {}
    for k, (t, strides, mul, wrap) in enumerate(index):
        words.update({f"ix{k}_off": t.offset, f"ix{k}_st": list(strides), f"ix{k}_mul": mul, f"ix{k}_wrap": wrap})
    k = rt.kernel(("seg-keys", nd, ists), lambda: keys_wgsl(nd, ists), "segment-keys")
    rt.dispatch(k, [cnt.buf, slot.buf, key.buf] + [t.buf for t, *_ in index],
                keys_slots(nd, len(index)).pack(n=n, shape=list(shape), kc=list(kc), m=m, **words), groups)
    if counts_only:
        return cnt, perm, cnt
    offs = prefix(rt, cnt, "count")
    k = rt.kernel(("seg-place", False), lambda: place_wgsl(False), "segment-place")
    rt.dispatch(k, [tmp.buf, slot.buf, key.buf, offs.buf], PLACE.pack(n=n), groups)
    k = rt.kernel(("seg-place", True), lambda: place_wgsl(True), "segment-rank")
    rt.dispatch(k, [perm.buf, tmp.buf, key.buf, offs.buf], PLACE.pack(n=n), groups)
    return offs, perm, cnt


def segment_reduce(rt: Runtime, kind: str, x: WGTensor, src: WGTensor, offs: WGTensor, perm: WGTensor,
                   ke: Sequence[int], sa: Sequence[int], ishape: Sequence[int], sb: Sequence[int],
                   alpha: float = 1, include_self: bool | int = True,
                   out_dtype: torch.dtype | None = None) -> WGTensor:
    """A fresh tensor of x's shape: each element reduces (REDUCE kind) the source elements of its bucket
    (`bucket`'s offs/perm) onto x's value (include_self) or alone; see `reduce_slots` for the geometry."""
    out = new(rt, x.shape, out_dtype or x.dtype)
    n = out.numel()
    if n == 0:
        return out
    oshape = list(x.shape)
    no, ni = len(oshape), len(ishape)
    if no > MAXD or ni > MAXD:
        raise TapmlError(f"webgpu: scatter over {max(no, ni)} dims (max {MAXD})")
    ct = out.info.ct
    if ct == "bool":
        raise TapmlError("webgpu: a reduction into bool destinations")
    st, sst, ost, wrap = x.info.storage, src.info.storage, out.info.storage, out.info.wrap
    k = rt.kernel(("segment", kind, no, ni, st, sst, ct, ost, wrap),
                  lambda: segment_wgsl(kind, no, ni, st, sst, ct, ost, wrap), f"segment-{kind}")
    params = reduce_slots(no, ni).pack(n=n, oshape=oshape, x_off=x.offset, x_st=list(x.stride), ke=list(ke),
                                       s_off=src.offset, sa=list(sa), ishape=list(ishape), sb=list(sb),
                                       alpha=word(alpha, "f32" if ct == "f32" else "i32"),
                                       include_self=int(include_self))
    rt.dispatch(k, [out.buf, x.buf, src.buf, perm.buf, offs.buf], params, -(-n // _WG))
    return out

"""Matrix products: the tiled any-stride matmul, the fast aligned f32 kernel and grouped_mm, WGSL beside
launchers. Tile choices live here; ATen conventions (addmm's alpha/beta, bmm's batch) stay in the handlers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tapml.backends.webgpu.kernels.elementwise import ew, fill
from tapml.backends.webgpu.kernels.host import bcast_strides, fbits, new
from tapml.backends.webgpu.kernels.prelude import ENTRY, Slots, access, header, load, store
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.errors import TapmlError


class Tile(NamedTuple):
    """A matmul kernel's blocking: a BM x BN output tile per workgroup, stepping BK along k, TM x TN outputs
    per thread."""

    bm: int
    bn: int
    bk: int
    tm: int
    tn: int


# Both matmul kernels (the fast one reads a subset): each operand's offset and its (batch, row, column)
# strides; c is the bias (zeros when there is none). Word 3 is unused, so each operand's words start a vec4.
MATMUL = Slots("M N K pad", "a_off a_st:3 b_off b_st:3 o_off o_st:3 c_off c_st:3",
               "alpha beta").bind()
# offs is the int tensor of the groups' end rows
GROUPED_MM = Slots("M N K G", "a_off a_st:2 b_off b_st:3 offs_off offs_st o_off o_st:2").bind()


def matmul_wgsl(tile: Tile, a_kfast: bool, b_nfast: bool, st_a: str, st_b: str, st_c: str | None, ost: str,
                owrap: str) -> tuple[str, str]:
    """C[b] = alpha * A[b] @ B[b] (+ beta * bias[b]) with arbitrary strides, tiled through workgroup memory and
    register-blocked (each thread owns TM x TN outputs).

    a_kfast, b_nfast: the load order follows whichever stride is 1 so global reads coalesce. Params: MATMUL.
    """
    bm, bn, bk, tm, tn = tile
    p = MATMUL
    tx, ty = bn // tn, bm // tm
    nt = tx * ty
    binds = [("o", "w", ost), ("a", "r", st_a), ("b", "r", st_b)] + ([("c", "r", st_c)] if st_c else [])
    src = [header(binds, nt), f"var<workgroup> As: array<f32, {bk * bm}>;\nvar<workgroup> Bs: array<f32, {bk * bn}>;\n",
           ENTRY.format(wg=nt)]
    a_idx = (f"let kk = id % {bk}u; let m = id / {bk}u;" if a_kfast else f"let m = id % {bm}u; let kk = id / {bm}u;")
    b_idx = (f"let n = id % {bn}u; let kk = id / {bn}u;" if b_nfast else f"let kk = id % {bk}u; let n = id / {bk}u;")
    a_st, b_st, o_st, c_st = p.u.a_st, p.u.b_st, p.u.o_st, p.u.c_st
    src.append(f"""  let M = {p.u.M}; let N = {p.u.N}; let K = {p.u.K};
  let bz = wid.z;
  let tile_m = wid.y * {bm}u; let tile_n = wid.x * {bn}u;
  let tx = lid % {tx}u; let ty = lid / {tx}u;
  let abase = {p.u.a_off} + bz * {a_st[0]};
  let bbase = {p.u.b_off} + bz * {b_st[0]};
  var acc: array<f32, {tm * tn}>;
  for (var i = 0u; i < {tm * tn}u; i = i + 1u) {{ acc[i] = 0.0; }}
  for (var k0 = 0u; k0 < K; k0 = k0 + {bk}u) {{
    for (var e = 0u; e < {(bm * bk + nt - 1) // nt}u; e = e + 1u) {{
      let id = lid + e * {nt}u;
      if (id < {bm * bk}u) {{
        {a_idx}
        let gm = tile_m + m; let gk = k0 + kk;
        var v = 0.0;
        if (gm < M && gk < K) {{ v = {load(st_a, 'f32', f'a[abase + gm * {a_st[1]} + gk * {a_st[2]}]')}; }}
        As[kk * {bm}u + m] = v;
      }}
    }}
    for (var e = 0u; e < {(bn * bk + nt - 1) // nt}u; e = e + 1u) {{
      let id = lid + e * {nt}u;
      if (id < {bn * bk}u) {{
        {b_idx}
        let gn = tile_n + n; let gk = k0 + kk;
        var v = 0.0;
        if (gn < N && gk < K) {{ v = {load(st_b, 'f32', f'b[bbase + gk * {b_st[1]} + gn * {b_st[2]}]')}; }}
        Bs[kk * {bn}u + n] = v;
      }}
    }}
    workgroupBarrier();
    for (var kk = 0u; kk < {bk}u; kk = kk + 1u) {{
      var ra: array<f32, {tm}>;
      var rb: array<f32, {tn}>;
      for (var i = 0u; i < {tm}u; i = i + 1u) {{ ra[i] = As[kk * {bm}u + ty * {tm}u + i]; }}
      for (var j = 0u; j < {tn}u; j = j + 1u) {{ rb[j] = Bs[kk * {bn}u + tx * {tn}u + j]; }}
      for (var i = 0u; i < {tm}u; i = i + 1u) {{
        for (var j = 0u; j < {tn}u; j = j + 1u) {{ acc[i * {tn}u + j] = fma(ra[i], rb[j], acc[i * {tn}u + j]); }}
      }}
    }}
    workgroupBarrier();
  }}
""")
    bias = (f"v = v + {p.f.beta} * "
            f"{load(st_c, 'f32', f'c[{p.u.c_off} + bz * {c_st[0]} + gm * {c_st[1]} + gn * {c_st[2]}]')};"
            if st_c else "")
    src.append(f"""  for (var i = 0u; i < {tm}u; i = i + 1u) {{
    let gm = tile_m + ty * {tm}u + i;
    for (var j = 0u; j < {tn}u; j = j + 1u) {{
      let gn = tile_n + tx * {tn}u + j;
      if (gm < M && gn < N) {{
        var v = {p.f.alpha} * acc[i * {tn}u + j];
        {bias}
        o[{p.u.o_off} + bz * {o_st[0]} + gm * {o_st[1]} + gn * {o_st[2]}] = {store('f32', ost, owrap, 'v')};
      }}
    }}
  }}
}}
""")
    return "".join(src), access(binds)


def matmul_fast_wgsl(tile: Tile) -> tuple[str, str]:
    """f32 row-major C = alpha * A @ B for aligned shapes (M % BM == N % BN == K % BK == 0, offsets and leading
    dims % 4 == 0): vec4 global loads prefetched into registers, double-buffered workgroup tiles (one barrier
    per tile), and a TM x TN register block per thread, fully unrolled into named registers (a private
    array indexed in a loop would live in slow local memory).

    Thread (tx, ty) owns rows (ty + i*TY)*4.. and vec4 columns tx + j*TX, so neighbouring threads read
    neighbouring workgroup words and write neighbouring output vectors. Params: MATMUL (the row strides are
    the leading dimensions; column strides are 1 and the bias is absent).
    """
    bm, bn, bk, tm, tn = tile
    p = MATMUL
    if tm % 4 or tn % 4 or bk % 4:
        raise ValueError(f"matmul_fast needs TM, TN and BK multiples of 4, got {tuple(tile)}")
    tx, ty = bn // tn, bm // tm
    nt = tx * ty
    mi, nj = tm // 4, tn // 4  # vec4 blocks per thread along m and n
    a_vecs, b_vecs = bm * bk // 4, bn * bk // 4
    ra, rb = -(-a_vecs // nt), -(-b_vecs // nt)
    bm4, bn4, bk4 = bm // 4, bn // 4, bk // 4

    def guard(e: int, total: int) -> str:
        return "" if (e + 1) * nt <= total else f"if (lid + {e * nt}u < {total}u) "

    def load_a(e: int, k0: str) -> str:
        return (f"    {guard(e, a_vecs)}{{ let id = lid + {e * nt}u; "
                f"pa{e} = a[abase + (tile_m + id / {bk4}u) * lda + {k0} + id % {bk4}u]; }}\n")

    def load_b(e: int, k0: str) -> str:
        return (f"    {guard(e, b_vecs)}{{ let id = lid + {e * nt}u; "
                f"pb{e} = b[bbase + ({k0} + id / {bn4}u) * ldb + tile_n / 4u + id % {bn4}u]; }}\n")

    def store(buf: str) -> str:
        out = []
        for e in range(ra):
            out.append(f"    {guard(e, a_vecs)}{{\n      let id = lid + {e * nt}u; let m = id / {bk4}u; "
                       f"let k = (id % {bk4}u) * 4u;\n")
            for c, comp in enumerate("xyzw"):
                out.append(f"      As[{buf} * {bk * bm4}u + (k + {c}u) * {bm4}u + m / 4u][m % 4u] = pa{e}.{comp};\n")
            out.append("    }\n")
        for e in range(rb):
            out.append(f"    {guard(e, b_vecs)}{{ let id = lid + {e * nt}u; Bs[{buf} * {bk * bn4}u + id] = pb{e}; }}\n")
        return "".join(out)

    binds = [("o", "w", "vec4<f32>"), ("a", "r", "vec4<f32>"), ("b", "r", "vec4<f32>")]
    src = [header(binds, nt)]
    src.append(f"var<workgroup> As: array<vec4<f32>, {2 * bk * bm4}>;\n"
               f"var<workgroup> Bs: array<vec4<f32>, {2 * bk * bn4}>;\n")
    src.append(ENTRY.format(wg=nt))
    src.append(f"""  let K = {p.u.K};
  let bz = wid.z;
  let tile_m = wid.y * {bm}u; let tile_n = wid.x * {bn}u;
  let tx = lid % {tx}u; let ty = lid / {tx}u;
  let lda = {p.u.a_st[1]} / 4u;
  let ldb = {p.u.b_st[1]} / 4u;
  let abase = ({p.u.a_off} + bz * {p.u.a_st[0]}) / 4u;
  let bbase = ({p.u.b_off} + bz * {p.u.b_st[0]}) / 4u;
""")
    src += [f"  var c{i}_{j} = vec4<f32>(0.0);\n" for i in range(tm) for j in range(nj)]
    src += [f"  var pa{e} = vec4<f32>(0.0);\n" for e in range(ra)]
    src += [f"  var pb{e} = vec4<f32>(0.0);\n" for e in range(rb)]
    src += [load_a(e, "0u") for e in range(ra)] + [load_b(e, "0u") for e in range(rb)]
    src.append(store("0u"))
    src.append(f"""  workgroupBarrier();
  let ntiles = K / {bk}u;
  for (var t = 0u; t < ntiles; t = t + 1u) {{
    let cur = t % 2u;
    let more = t + 1u < ntiles;
    if (more) {{
      let k0 = (t + 1u) * {bk}u;
""")
    src += [load_a(e, "k0 / 4u") for e in range(ra)] + [load_b(e, "k0") for e in range(rb)]
    src.append("    }\n")
    src.append(f"    let sa = cur * {bk * bm4}u + ty;\n    let sb = cur * {bk * bn4}u + tx;\n")
    for kk in range(bk):
        for i4 in range(mi):
            src.append(f"    let a{kk}_{i4} = As[sa + {kk * bm4 + i4 * ty}u];\n")
        for j in range(nj):
            src.append(f"    let b{kk}_{j} = Bs[sb + {kk * bn4 + j * tx}u];\n")
        for i in range(tm):
            comp = "xyzw"[i % 4]
            for j in range(nj):
                src.append(f"    c{i}_{j} = fma(vec4<f32>(a{kk}_{i // 4}.{comp}), b{kk}_{j}, c{i}_{j});\n")
    src.append("    if (more) {\n")
    src.append(store("(1u - cur)"))
    src.append("    }\n    workgroupBarrier();\n  }\n")
    src.append(f"""  let ldo = {p.u.o_st[1]} / 4u;
  let obase = ({p.u.o_off} + bz * {p.u.o_st[0]}) / 4u + tile_n / 4u + tx;
  let alpha = {p.f.alpha};
""")
    for i in range(tm):
        row = f"tile_m + (ty + {(i // 4) * ty}u) * 4u + {i % 4}u"
        for j in range(nj):
            src.append(f"  o[obase + ({row}) * ldo + {j * tx}u] = alpha * c{i}_{j};\n")
    src.append("}\n")
    return "".join(src), access(binds)


def grouped_mm_wgsl(st: str, ost: str, owrap: str, gst: str = "i32") -> tuple[str, str]:
    """out[m, n] = sum_k a[m, k] * b[g(m), k, n], g(m) = the group whose offs range holds row m (rows past
    the last offset are zero). Params: GROUPED_MM."""
    u = GROUPED_MM.u
    b_at = f"{u.b_off} + grp * {u.b_st[0]} + k * {u.b_st[1]} + n * {u.b_st[2]}"
    binds = [("o", "w", ost), ("a", "r", st), ("b", "r", st), ("g", "r", gst)]
    src = [header(binds, 64), ENTRY.format(wg=64)]
    src.append(f"""  let t = (wid.x + wid.y * nwg.x) * WG + lid;
  let M = {u.M}; let N = {u.N}; let K = {u.K}; let G = {u.G};
  if (t >= M * N) {{ return; }}
  let m = t / N; let n = t % N;
  var grp = 0u;
  loop {{
    if (grp >= G || i32(m) < i32(g[{u.offs_off} + grp * {u.offs_st}])) {{ break; }}
    grp = grp + 1u;
  }}
  var acc = 0.0;
  if (grp < G) {{
    for (var k = 0u; k < K; k = k + 1u) {{
      acc = fma({load(st, 'f32', f'a[{u.a_off} + m * {u.a_st[0]} + k * {u.a_st[1]}]')},
                {load(st, 'f32', f'b[{b_at}]')}, acc);
    }}
  }}
  o[{u.o_off} + m * {u.o_st[0]} + n * {u.o_st[1]}] = {store('f32', ost, owrap, 'acc')};
}}
""")
    return "".join(src), access(binds)


# (BM, BN, BK, TM, TN) of the register-blocked vec4 kernel: the best of a sweep on an H100 at 1024^3 and
# 4096^3 (benchmarks/webgpu_kernels.py --sweep prints the table).
FAST_CFG = Tile(64, 128, 16, 8, 8)
FAST: Tile | None = None  # a fixed configuration to try instead (the sweep sets it)


def fast_cfg(m: int, n: int) -> Tile:
    return FAST or FAST_CFG


# Tiles of the general (any strides, any size) kernel: thin for decode-shaped products.
_THIN4 = Tile(4, 64, 16, 1, 4)
_THIN16 = Tile(16, 64, 16, 2, 4)
_SMALL = Tile(32, 32, 16, 4, 4)
_LARGE = Tile(64, 64, 16, 4, 4)


def _cfg(rt: Runtime, m: int, n: int) -> Tile:
    if m <= 4:
        return _THIN4
    if m <= 16:
        return _THIN16
    if rt.is_cpu or m * n <= 128 * 128:
        return _SMALL
    return _LARGE


def matmul(rt: Runtime, a: WGTensor, b: WGTensor, bias: WGTensor | None = None, alpha: float = 1.0,
           beta: float = 1.0, out: WGTensor | None = None, fast: bool | None = None) -> WGTensor:
    """alpha * a @ b (+ beta * bias) for a [B?, M, K], b [B?, K, N] (any strides); bias broadcasts to the
    output. Returns a contiguous [B?, M, N] tensor (or writes `out`)."""
    batched = a.dim() == 3
    a3 = a if batched else a.view_as((1,) + a.shape, (0,) + a.stride, a.offset)
    b3 = b if batched else b.view_as((1,) + b.shape, (0,) + b.stride, b.offset)
    bt, m, kd = a3.shape
    n = b3.shape[2]
    if out is None:
        out = new(rt, (bt, m, n) if batched else (m, n), a.dtype)
    o3 = out if batched else out.view_as((1,) + out.shape, (0,) + out.stride, out.offset)
    if m == 0 or n == 0 or bt == 0:
        return out
    if kd == 0:
        if bias is not None and beta != 0:
            ew(rt, "a * b", [bias, float(beta)], out, ["f32", "f32"], "f32")
        else:
            fill(rt, out, 0.0)
        return out
    bcast_b = bias is not None and beta != 0
    f32 = all(t.dtype == torch.float32 for t in (a, b, out))
    fcfg = fast_cfg(m, n)
    aligned = (f32 and not bcast_b and a3.stride[2] == 1 and b3.stride[2] == 1 and o3.stride[2] == 1
               and m % fcfg.bm == 0 and n % fcfg.bn == 0 and kd % fcfg.bk == 0
               and all(v % 4 == 0 for v in (a3.offset, a3.stride[0], a3.stride[1], b3.offset, b3.stride[0],
                                            b3.stride[1], o3.offset, o3.stride[0], o3.stride[1])))
    if fast is None:
        fast = aligned and not rt.is_cpu
    elif fast and not aligned:
        raise TapmlError("webgpu: the fast matmul needs aligned row-major f32 operands")
    params = MATMUL.pack(M=m, N=n, K=kd, pad=0, a_off=a3.offset, a_st=a3.stride, b_off=b3.offset,
                                b_st=b3.stride, o_off=o3.offset, o_st=o3.stride,
                                c_off=bias.offset if bcast_b else 0,
                                c_st=bcast_strides(bias, o3.shape) if bcast_b else (0, 0, 0),
                                alpha=fbits(alpha), beta=fbits(beta))
    if fast:
        k = rt.kernel(("mm_fast", fcfg), lambda: matmul_fast_wgsl(fcfg), "matmul_fast")
        rt.dispatch(k, [out.buf, a.buf, b.buf], params, (n // fcfg.bn, m // fcfg.bm, bt))
        return out
    tile = _cfg(rt, m, n)
    a_kfast, b_nfast = a3.stride[2] == 1 or a3.stride[1] != 1, b3.stride[2] == 1 or b3.stride[1] != 1
    sa, sb = a.info.storage, b.info.storage
    sc = bias.info.storage if bcast_b else None
    so, wrap = out.info.storage, out.info.wrap
    k = rt.kernel(("mm", tile + (a_kfast, b_nfast), sa, sb, sc, so, wrap),
                  lambda: matmul_wgsl(tile, a_kfast, b_nfast, sa, sb, sc, so, wrap), "matmul")
    bufs = [out.buf, a.buf, b.buf] + ([bias.buf] if bcast_b else [])
    if bt > rt.max_groups:
        raise TapmlError(f"webgpu: batch of {bt} matrices exceeds the grid limit {rt.max_groups}")
    rt.dispatch(k, bufs, params, (-(-n // tile.bn), -(-m // tile.bm), bt))
    return out


def grouped_mm(rt: Runtime, a: WGTensor, b: WGTensor, offs: WGTensor) -> WGTensor:
    m, kd = a.shape
    g, _, n = b.shape
    out = new(rt, (m, n), a.dtype)
    if out.numel() == 0:
        return out
    st, ost, wrap = a.info.storage, out.info.storage, out.info.wrap
    gst = offs.info.storage
    k = rt.kernel(("gmm", st, ost, wrap, gst), lambda: grouped_mm_wgsl(st, ost, wrap, gst), "grouped_mm")
    params = GROUPED_MM.pack(M=m, N=n, K=kd, G=g, a_off=a.offset, a_st=a.stride, b_off=b.offset,
                                    b_st=b.stride, offs_off=offs.offset, offs_st=offs.stride[0], o_off=0,
                                    o_st=(n, 1))
    rt.dispatch(k, [out.buf, a.buf, b.buf, offs.buf], params, -(-m * n // 64))
    return out

"""Matrix products: the tiled any-stride matmul, the fast aligned f32 kernel and grouped_mm, WGSL beside launchers.

Tile configurations live here (and only here); ATen conventions (addmm's alpha/beta, bmm's batch) stay in the handlers.
"""

from __future__ import annotations

import torch

from tapml.backends.webgpu.kernels.elementwise import ew, fill
from tapml.backends.webgpu.kernels.host import bcast_strides, fbits, new
from tapml.backends.webgpu.kernels.prelude import ENTRY, header, load, store
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.errors import TapmlError


def matmul_wgsl(cfg: tuple, st_a: str, st_b: str, st_c: str | None, ost: str, owrap: str) -> tuple[str, str]:
    """C[b] = alpha * A[b] @ B[b] (+ beta * bias[b]) with arbitrary strides, tiled through workgroup memory and
    register-blocked (each thread owns TM x TN outputs).

    cfg = (BM, BN, BK, TM, TN, a_kfast, b_nfast): the load order follows whichever stride is 1 so global reads
    coalesce. Params: [0] M [1] N [2] K; A off/sb/sm/sk at 4..7; B off/sb/sk/sn at 8..11; out off/sb/sm/sn at
    12..15; bias off/sb/sm/sn at 16..19; [20] alpha [21] beta (f32).
    """
    bm, bn, bk, tm, tn, a_kfast, b_nfast = cfg
    tx, ty = bn // tn, bm // tm
    nt = tx * ty
    binds = [("o", "w", ost), ("a", "r", st_a), ("b", "r", st_b)] + ([("c", "r", st_c)] if st_c else [])
    src = [header(binds, nt), f"var<workgroup> As: array<f32, {bk * bm}>;\nvar<workgroup> Bs: array<f32, {bk * bn}>;\n",
           ENTRY.format(wg=nt)]
    a_idx = (f"let kk = id % {bk}u; let m = id / {bk}u;" if a_kfast else f"let m = id % {bm}u; let kk = id / {bm}u;")
    b_idx = (f"let n = id % {bn}u; let kk = id / {bn}u;" if b_nfast else f"let kk = id % {bk}u; let n = id / {bk}u;")
    src.append(f"""  let M = pu(0u); let N = pu(1u); let K = pu(2u);
  let bz = wid.z;
  let tile_m = wid.y * {bm}u; let tile_n = wid.x * {bn}u;
  let tx = lid % {tx}u; let ty = lid / {tx}u;
  let abase = pu(4u) + bz * pu(5u);
  let bbase = pu(8u) + bz * pu(9u);
  var acc: array<f32, {tm * tn}>;
  for (var i = 0u; i < {tm * tn}u; i = i + 1u) {{ acc[i] = 0.0; }}
  for (var k0 = 0u; k0 < K; k0 = k0 + {bk}u) {{
    for (var e = 0u; e < {(bm * bk + nt - 1) // nt}u; e = e + 1u) {{
      let id = lid + e * {nt}u;
      if (id < {bm * bk}u) {{
        {a_idx}
        let gm = tile_m + m; let gk = k0 + kk;
        var v = 0.0;
        if (gm < M && gk < K) {{ v = {load(st_a, 'f32', 'a[abase + gm * pu(6u) + gk * pu(7u)]')}; }}
        As[kk * {bm}u + m] = v;
      }}
    }}
    for (var e = 0u; e < {(bn * bk + nt - 1) // nt}u; e = e + 1u) {{
      let id = lid + e * {nt}u;
      if (id < {bn * bk}u) {{
        {b_idx}
        let gn = tile_n + n; let gk = k0 + kk;
        var v = 0.0;
        if (gn < N && gk < K) {{ v = {load(st_b, 'f32', 'b[bbase + gk * pu(10u) + gn * pu(11u)]')}; }}
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
    bias = (f"v = v + pf(21u) * {load(st_c, 'f32', 'c[pu(16u) + bz * pu(17u) + gm * pu(18u) + gn * pu(19u)]')};"
            if st_c else "")
    src.append(f"""  for (var i = 0u; i < {tm}u; i = i + 1u) {{
    let gm = tile_m + ty * {tm}u + i;
    for (var j = 0u; j < {tn}u; j = j + 1u) {{
      let gn = tile_n + tx * {tn}u + j;
      if (gm < M && gn < N) {{
        var v = pf(20u) * acc[i * {tn}u + j];
        {bias}
        o[pu(12u) + bz * pu(13u) + gm * pu(14u) + gn * pu(15u)] = {store('f32', ost, owrap, 'v')};
      }}
    }}
  }}
}}
""")
    return "".join(src), "wrr" + ("r" if st_c else "")


def matmul_fast_wgsl(cfg: tuple) -> tuple[str, str]:
    """f32 row-major C = alpha * A @ B for aligned shapes (M % BM == N % BN == K % BK == 0, offsets and leading
    dims % 4 == 0): vec4 global loads prefetched into registers, double-buffered workgroup tiles (one barrier
    per tile), and a TM x TN register block per thread, fully unrolled into named registers (a private
    array indexed in a loop would live in slow local memory).

    cfg = (BM, BN, BK, TM, TN). Thread (tx, ty) owns rows (ty + i*TY)*4.. and vec4 columns tx + j*TX, so
    neighbouring threads read neighbouring workgroup words and write neighbouring output vectors.
    Params as `matmul`: A off/sb/lda at 4..6, B off/sb/ldb at 8..10, out off/sb/ldo at 12..14, alpha at 20.
    """
    bm, bn, bk, tm, tn = cfg
    if tm % 4 or tn % 4 or bk % 4:
        raise ValueError(f"matmul_fast needs TM, TN and BK multiples of 4, got {cfg}")
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

    src = [header([("o", "w", "vec4<f32>"), ("a", "r", "vec4<f32>"), ("b", "r", "vec4<f32>")], nt)]
    src.append(f"var<workgroup> As: array<vec4<f32>, {2 * bk * bm4}>;\n"
               f"var<workgroup> Bs: array<vec4<f32>, {2 * bk * bn4}>;\n")
    src.append(ENTRY.format(wg=nt))
    src.append(f"""  let K = pu(2u);
  let bz = wid.z;
  let tile_m = wid.y * {bm}u; let tile_n = wid.x * {bn}u;
  let tx = lid % {tx}u; let ty = lid / {tx}u;
  let lda = pu(6u) / 4u;
  let ldb = pu(10u) / 4u;
  let abase = (pu(4u) + bz * pu(5u)) / 4u;
  let bbase = (pu(8u) + bz * pu(9u)) / 4u;
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
    src.append("""  let ldo = pu(14u) / 4u;
  let obase = (pu(12u) + bz * pu(13u)) / 4u + tile_n / 4u + tx;
  let alpha = pf(20u);
""")
    for i in range(tm):
        row = f"tile_m + (ty + {(i // 4) * ty}u) * 4u + {i % 4}u"
        for j in range(nj):
            src.append(f"  o[obase + ({row}) * ldo + {j * tx}u] = alpha * c{i}_{j};\n")
    src.append("}\n")
    return "".join(src), "wrr"


def grouped_mm_wgsl(st: str, ost: str, owrap: str, gst: str = "i32") -> tuple[str, str]:
    """out[m, n] = sum_k a[m, k] * b[g(m), k, n], g(m) = the group whose offs range holds row m (rows past
    the last offset are zero). Params: [0] M [1] N [2] K [3] G, a off/sm/sk 4..6, b off/sg/sk/sn 7..10,
    offs off/stride 11..12, out off/sm/sn 13..15."""
    src = [header([("o", "w", ost), ("a", "r", st), ("b", "r", st), ("g", "r", gst)], 64), ENTRY.format(wg=64)]
    src.append(f"""  let t = (wid.x + wid.y * nwg.x) * WG + lid;
  let M = pu(0u); let N = pu(1u); let K = pu(2u); let G = pu(3u);
  if (t >= M * N) {{ return; }}
  let m = t / N; let n = t % N;
  var grp = 0u;
  loop {{
    if (grp >= G || i32(m) < i32(g[pu(11u) + grp * pu(12u)])) {{ break; }}
    grp = grp + 1u;
  }}
  var acc = 0.0;
  if (grp < G) {{
    for (var k = 0u; k < K; k = k + 1u) {{
      acc = fma({load(st, 'f32', 'a[pu(4u) + m * pu(5u) + k * pu(6u)]')},
                {load(st, 'f32', 'b[pu(7u) + grp * pu(8u) + k * pu(9u) + n * pu(10u)]')}, acc);
    }}
  }}
  o[pu(13u) + m * pu(14u) + n * pu(15u)] = {store('f32', ost, owrap, 'acc')};
}}
""")
    return "".join(src), "wrrr"


# (BM, BN, BK, TM, TN) of the register-blocked vec4 kernel: the best of a sweep on an H100 at 1024^3 and
# 4096^3 (benchmarks/webgpu_kernels.py --sweep prints the table).
FAST_CFG = (64, 128, 16, 8, 8)
FAST: tuple | None = None  # a fixed configuration to try instead (the sweep sets it)


def fast_cfg(m: int, n: int) -> tuple:
    return FAST or FAST_CFG


def _cfg(rt: Runtime, m: int, n: int) -> tuple[int, int, int, int, int]:
    """Tiles of the general (any strides, any size) kernel: thin for decode-shaped products."""
    if m <= 4:
        return (4, 64, 16, 1, 4)
    if m <= 16:
        return (16, 64, 16, 2, 4)
    if rt.is_cpu or m * n <= 128 * 128:
        return (32, 32, 16, 4, 4)
    return (64, 64, 16, 4, 4)


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
    bm, bn, bk, _, _ = fcfg
    aligned = (f32 and not bcast_b and a3.stride[2] == 1 and b3.stride[2] == 1 and o3.stride[2] == 1
               and m % bm == 0 and n % bn == 0 and kd % bk == 0
               and all(v % 4 == 0 for v in (a3.offset, a3.stride[0], a3.stride[1], b3.offset, b3.stride[0],
                                            b3.stride[1], o3.offset, o3.stride[0], o3.stride[1])))
    if fast is None:
        fast = aligned and not rt.is_cpu
    elif fast and not aligned:
        raise TapmlError("webgpu: the fast matmul needs aligned row-major f32 operands")
    params = [m, n, kd, 0, a3.offset, a3.stride[0], a3.stride[1], a3.stride[2],
              b3.offset, b3.stride[0], b3.stride[1], b3.stride[2],
              o3.offset, o3.stride[0], o3.stride[1], o3.stride[2]]
    if bcast_b:
        bs = bcast_strides(bias, o3.shape)
        params += [bias.offset] + bs
    else:
        params += [0, 0, 0, 0]
    params += [fbits(alpha), fbits(beta)]
    if fast:
        k = rt.kernel(("mm_fast", fcfg), lambda: matmul_fast_wgsl(fcfg)[0], "wrr", "matmul_fast")
        rt.dispatch(k, [out.buf, a.buf, b.buf], params, (n // bn, m // bm, bt))
        return out
    cfg = _cfg(rt, m, n)
    spec = cfg + (a3.stride[2] == 1 or a3.stride[1] != 1, b3.stride[2] == 1 or b3.stride[1] != 1)
    sa, sb = a.info.storage, b.info.storage
    sc = bias.info.storage if bcast_b else None
    so, wrap = out.info.storage, out.info.wrap
    k = rt.kernel(("mm", spec, sa, sb, sc, so, wrap), lambda: matmul_wgsl(spec, sa, sb, sc, so, wrap)[0],
                  "wrr" + ("r" if bcast_b else ""), "matmul")
    bufs = [out.buf, a.buf, b.buf] + ([bias.buf] if bcast_b else [])
    if bt > rt.max_groups:
        raise TapmlError(f"webgpu: batch of {bt} matrices exceeds the grid limit {rt.max_groups}")
    rt.dispatch(k, bufs, params, (-(-n // cfg[1]), -(-m // cfg[0]), bt))
    return out


def grouped_mm(rt: Runtime, a: WGTensor, b: WGTensor, offs: WGTensor) -> WGTensor:
    m, kd = a.shape
    g, _, n = b.shape
    out = new(rt, (m, n), a.dtype)
    if out.numel() == 0:
        return out
    st, ost, wrap = a.info.storage, out.info.storage, out.info.wrap
    gst = offs.info.storage
    k = rt.kernel(("gmm", st, ost, wrap, gst), lambda: grouped_mm_wgsl(st, ost, wrap, gst)[0], "wrrr", "grouped_mm")
    params = [m, n, kd, g, a.offset, a.stride[0], a.stride[1], b.offset, b.stride[0], b.stride[1], b.stride[2],
              offs.offset, offs.stride[0], 0, n, 1]
    rt.dispatch(k, [out.buf, a.buf, b.buf, offs.buf], params, -(-m * n // 64))
    return out

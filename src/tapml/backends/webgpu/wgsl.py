"""Every WGSL kernel of the WebGPU backend, as templates specialized by dtype, rank and tile shape.

The single source of truth for kernel text: each function returns WGSL source for one specialization; it
must not touch the device (`runtime.py` compiles and caches) or know ATen semantics (`ops.py`).
Conventions: storage bindings come first in the order the launcher passes buffers; the uniform parameter
window `P` (256 i32 words, floats bit-cast) follows. Workgroups are linearized as wid.x + wid.y * nwg.x.
It is longer than a module should be because all kernel text shares these conventions and the math
library: split across files, a change to one would have to be mirrored by hand in the others.
"""

from __future__ import annotations

# --- shared pieces -----------------------------------------------------------------------------------------

PARAMS = """
struct Params {{ v: array<vec4<i32>, 64>, }};
@group(0) @binding({pb}) var<uniform> P: Params;
fn pi(i: u32) -> i32 {{ return P.v[i >> 2u][i & 3u]; }}
fn pu(i: u32) -> u32 {{ return bitcast<u32>(P.v[i >> 2u][i & 3u]); }}
fn pf(i: u32) -> f32 {{ return bitcast<f32>(P.v[i >> 2u][i & 3u]); }}
"""

ENTRY = ("@compute @workgroup_size({wg})\n"
         "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,\n"
         "        @builtin(local_invocation_index) lid: u32) {{\n")

# Accurate f32 math (cephes-style range reduction + minimax polynomials, ≤ ~2 ulp on the tested ranges):
# WGSL's built-in exp/log/sin/cos/tanh have loose, device-dependent precision, which would make verdicts
# differ between lavapipe and a GPU.
MATH = """
fn f_inf() -> f32 { let u = 0x7f800000u; return bitcast<f32>(u); }
fn f_nan() -> f32 { let u = 0x7fc00000u; return bitcast<f32>(u); }
fn is_nan(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }
fn is_inf(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) == 0x7f800000u; }
fn t_exp(x: f32) -> f32 {
  if (is_nan(x)) { return x; }
  if (x > 88.72283935546875) { return f_inf(); }
  if (x < -104.0) { return 0.0; }
  let n = round(x * 1.44269504088896341);
  var r = x - n * 0.693359375;
  r = r - n * -2.12194440e-4;
  let z = r * r;
  var p = 1.9875691500e-4;
  p = p * r + 1.3981999507e-3;
  p = p * r + 8.3334519073e-3;
  p = p * r + 4.1665795894e-2;
  p = p * r + 1.6666665459e-1;
  p = p * r + 5.0000001201e-1;
  let y = p * z + r + 1.0;
  let ni = i32(n);
  return ldexp(ldexp(y, ni / 2), ni - ni / 2);
}
fn t_log(x: f32) -> f32 {
  if (is_nan(x) || x < 0.0) { return f_nan(); }
  if (x == 0.0) { return -f_inf(); }
  if (is_inf(x)) { return x; }
  let fr = frexp(x);
  var m = fr.fract;
  var e = f32(fr.exp);
  if (m < 0.707106781186547524) { m = m + m - 1.0; e = e - 1.0; } else { m = m - 1.0; }
  let z = m * m;
  var y = 7.0376836292e-2;
  y = y * m - 1.1514610310e-1;
  y = y * m + 1.1676998740e-1;
  y = y * m - 1.2420140846e-1;
  y = y * m + 1.4249322787e-1;
  y = y * m - 1.6668057665e-1;
  y = y * m + 2.0000714765e-1;
  y = y * m - 2.4999993993e-1;
  y = y * m + 3.3333331174e-1;
  y = y * m * z;
  y = y + e * -2.12194440e-4;
  y = y - 0.5 * z;
  return (m + y) + e * 0.693359375;
}
fn t_sincos(x: f32, want_cos: bool) -> f32 {
  if (is_nan(x) || is_inf(x)) { return f_nan(); }
  var sgn = 1.0;
  let ax = abs(x);
  if (!want_cos && x < 0.0) { sgn = -1.0; }
  var j = u32(ax * 1.27323954473516);
  j = (j + 1u) & ~1u;
  let y = f32(j);
  let r = ((ax - y * 0.78515625) - y * 2.4187564849853515625e-4) - y * 3.77489497744594108e-8;
  j = j & 7u;
  if (j > 3u) { sgn = -sgn; j = j - 4u; }
  var use_cos = (j == 1u || j == 2u);
  if (want_cos) {
    if (j > 1u) { sgn = -sgn; }
    use_cos = !use_cos;
  }
  let z = r * r;
  var v: f32;
  if (use_cos) {
    v = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0;
  } else {
    v = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r;
  }
  return sgn * v;
}
fn t_sin(x: f32) -> f32 { return t_sincos(x, false); }
fn t_cos(x: f32) -> f32 { return t_sincos(x, true); }
fn t_tanh(x: f32) -> f32 {
  let ax = abs(x);
  if (ax >= 0.625) {
    if (ax > 44.0) { return select(1.0, -1.0, x < 0.0); }
    let r = 1.0 - 2.0 / (t_exp(2.0 * ax) + 1.0);
    return select(r, -r, x < 0.0);
  }
  let z = x * x;
  return ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
          - 3.33332819422e-1) * z * x + x;
}
fn t_erf(a: f32) -> f32 {
  let t = abs(a);
  let s = a * a;
  if (t > 0.927734375) {
    if (t > 10.0) { return select(1.0, -1.0, a < 0.0); }
    var r = -1.72853470e-5 * t + 3.83197126e-4;
    let u = -3.88396438e-3 * t + 2.42546219e-2;
    r = r * s + u;
    r = r * t - 1.06777877e-1;
    r = r * t - 6.34846687e-1;
    r = r * t - 1.28717512e-1;
    r = r * t - t;
    let v = 1.0 - t_exp(r);
    return select(v, -v, a < 0.0);
  }
  var q = -5.96761703e-4;
  q = q * s + 4.99119423e-3;
  q = q * s - 2.67681349e-2;
  q = q * s + 1.12819925e-1;
  q = q * s - 3.76125336e-1;
  q = q * s + 1.28379166e-1;
  return q * a + a;
}
fn t_expm1(x: f32) -> f32 {
  if (abs(x) < 0.3) {
    let z = x * x;
    return x + z * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0 + x / 5040.0)))));
  }
  return t_exp(x) - 1.0;
}
fn t_log1p(x: f32) -> f32 {
  let u = 1.0 + x;
  if (u == 1.0) { return x; }
  return t_log(u) * (x / (u - 1.0));
}
fn t_pow(x: f32, y: f32) -> f32 {
  if (y == 0.0 || x == 1.0) { return 1.0; }
  if (is_nan(x) || is_nan(y)) { return f_nan(); }
  if (y == 1.0) { return x; }
  if (y == 2.0) { return x * x; }
  if (y == 3.0) { return x * x * x; }
  if (y == 0.5) { return sqrt(x); }
  if (y == -0.5) { return 1.0 / sqrt(x); }
  if (y == -1.0) { return 1.0 / x; }
  if (y == -2.0) { return 1.0 / (x * x); }
  let integral = floor(y) == y;
  if (x < 0.0 && !integral) { return f_nan(); }
  let ax = abs(x);
  var r: f32;
  if (ax == 0.0) { r = select(0.0, f_inf(), y < 0.0); }
  else if (is_inf(ax)) { r = select(f_inf(), 0.0, y < 0.0); }
  else if (is_inf(y)) { r = select(select(0.0, f_inf(), y > 0.0), select(f_inf(), 0.0, y > 0.0), ax < 1.0); }
  else { r = t_exp(y * t_log(ax)); }
  if (x < 0.0 && abs(y) < 16777216.0 && (i32(abs(y)) & 1) == 1) { r = -r; }
  return r;
}
fn t_floordiv(a: f32, b: f32) -> f32 {
  if (b == 0.0) { return a / b; }
  let m = a % b;
  var d = (a - m) / b;
  if (m != 0.0 && ((b < 0.0) != (m < 0.0))) { d = d - 1.0; }
  if (d == 0.0) { return select(0.0, -0.0, (a / b) < 0.0); }
  var fd = floor(d);
  if (d - fd > 0.5) { fd = fd + 1.0; }
  return fd;
}
fn t_rem(a: f32, b: f32) -> f32 {
  let m = a % b;
  return select(m, m + b, m != 0.0 && ((m < 0.0) != (b < 0.0)));
}
fn f_max(a: f32, b: f32) -> f32 { if (is_nan(a) || is_nan(b)) { return f_nan(); } return select(b, a, a > b); }
fn f_min(a: f32, b: f32) -> f32 { if (is_nan(a) || is_nan(b)) { return f_nan(); } return select(b, a, a < b); }
fn f_sign(a: f32) -> f32 { if (is_nan(a)) { return a; } return select(select(0.0, -1.0, a < 0.0), 1.0, a > 0.0); }
fn bf16r(x: f32) -> f32 {
  let u = bitcast<u32>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) { return bitcast<f32>(u | 0x00400000u); }
  return bitcast<f32>((u + 0x7fffu + ((u >> 16u) & 1u)) & 0xffff0000u);
}
fn wrap_i8(v: i32) -> i32 { return (v << 24u) >> 24u; }
fn wrap_i16(v: i32) -> i32 { return (v << 16u) >> 16u; }
fn wrap_u8(v: i32) -> i32 { return v & 255; }
"""

# Integer helpers, instantiated for i32 (prefix i_) and, when a kernel uses i64, for i64 (prefix l_).
INT_MATH = """
fn P_pow(x: T, y: T) -> T {
  if (y < T(0)) { return select(select(T(0), T(1), x == T(1)), select(T(1), T(-1), (y & T(1)) == T(1)), x == T(-1)); }
  var r = T(1);
  var b = x;
  var e = y;
  loop {
    if (e == T(0)) { break; }
    if ((e & T(1)) == T(1)) { r = r * b; }
    b = b * b;
    e = e >> 1u;
  }
  return r;
}
fn P_fmod(a: T, b: T) -> T {
  if (b == T(0)) { return T(0); }
  return a - (a / b) * b;
}
fn P_floordiv(a: T, b: T) -> T {
  if (b == T(0)) { return T(0); }
  let q = a / b;
  let r = a - q * b;
  return select(q, q - T(1), r != T(0) && ((r < T(0)) != (b < T(0))));
}
fn P_rem(a: T, b: T) -> T {
  let m = P_fmod(a, b);
  return select(m, m + b, m != T(0) && ((m < T(0)) != (b < T(0))));
}
"""
# (Signed integer % is avoided on purpose: on NVIDIA's Vulkan driver it gave wrong results for negative
# operands, while / is right; the remainder is formed from the quotient.)

_ZERO = {"f32": "0.0", "f16": "f16(0.0)", "i32": "0", "i64": "i64(0)", "u32": "0u", "bool": "false"}
_ONE = {"f32": "1.0", "f16": "f16(1.0)", "i32": "1", "i64": "i64(1)", "u32": "1u", "bool": "true"}


def finalize(src: str) -> str:
    """Append the i64 integer helpers to kernels that use i64 (only devices with shader-int64 compile them)."""
    if "i64" in src:
        src += INT_MATH.replace("P_", "l_").replace("T(", "i64(").replace(": T", ": i64").replace("-> T", "-> i64")
    return src


def header(bindings: list[tuple[str, str, str]], wg: int | str) -> str:
    """Storage declarations [(name, access 'r'|'w', element type)], the parameter window and MATH."""
    lines = []
    if any("f16" in t for _, _, t in bindings):
        lines.append("enable f16;")
    for i, (name, acc, ty) in enumerate(bindings):
        mode = "read_write" if acc == "w" else "read"
        lines.append(f"@group(0) @binding({i}) var<storage, {mode}> {name}: array<{ty}>;")
    lines.append(PARAMS.format(pb=len(bindings)))
    lines.append(MATH)
    lines.append(INT_MATH.replace("P_", "i_").replace("T(", "i32(").replace(": T", ": i32").replace("-> T", "-> i32"))
    lines.append(f"const WG: u32 = {wg}u;")
    return "\n".join(lines)


def load(storage: str, ct: str, e: str) -> str:
    """Convert a stored element to a compute type (f32, i32 or bool)."""
    if ct == "bool":  # written as !(x == 0): an ordered != would call NaN false
        return f"!({e} == {_ZERO[storage]})"
    if storage == ct:
        return e
    return f"{ct}({e})"


def store(rt: str, storage: str, wrap: str, e: str) -> str:
    """Convert an expression of result type `rt` to the stored element type (+ bf16 rounding / int wrapping)."""
    if rt == "bool":
        v = f"select({_ZERO[storage]}, {_ONE[storage]}, {e})"
    elif storage == "u32":
        v = f"select(0u, 1u, !(({e}) == {_ZERO[rt]}))"
    elif storage == rt:
        v = e
    else:
        v = f"{storage}({e})"
    return f"{wrap}({v})" if wrap else v


def _decompose(nd: int, i: str, shape_at: int, prefix: str = "c") -> str:
    """Row-major coordinates {prefix}0..{prefix}{nd-1} of linear index `i` over shape P[shape_at ...]."""
    if nd == 0:
        return ""
    out = [f"  var {prefix}r = {i};"]
    for d in range(nd - 1, 0, -1):
        out.append(f"  let {prefix}{d} = {prefix}r % pu({shape_at + d}u); {prefix}r = {prefix}r / pu({shape_at + d}u);")
    out.append(f"  let {prefix}0 = {prefix}r;")
    return "\n".join(out) + "\n"


def _offset(nd: int, at: int, prefix: str = "c") -> str:
    """P[at] + sum_d coord_d * P[at + 1 + d]."""
    terms = [f"pu({at}u)"] + [f"{prefix}{d} * pu({at + 1 + d}u)" for d in range(nd)]
    return " + ".join(terms)


# --- elementwise -------------------------------------------------------------------------------------------

LETTERS = "abcdefgh"


def elementwise(nd: int, operands: tuple, out: tuple, expr: str, vec: bool, coords: bool = False) -> tuple[str, str]:
    """out = expr(a, b, ...) over a strided N-d index space (broadcasting = stride 0).

    operands: ('t', storage, ct) tensors or ('s', ct) scalars from the parameter window; out: (storage, wrap,
    result type). Params: [0] numel (vec4 count when `vec`), [1..nd] shape, then per tensor (out first) an
    offset and nd strides, then one word per scalar. `vec`: 1-d unit-stride operands, four lanes per thread.
    `idx` (the linear index, u32) and, with `coords`, `row`/`col` (last two coordinates) are in scope.
    """
    ostore, owrap, rt = out
    tensors = [o for o in operands if o[0] in "to"]
    binds = [("o", "w", f"vec4<{ostore}>" if vec else ostore)]
    names, nb = [], 0
    for o in tensors:  # 'o' operands live in the output's buffer and are read through its binding
        names.append("o" if o[0] == "o" else f"i{nb}")
        nb += o[0] == "t"
    binds += [(f"i{k}", "r", f"vec4<{o[1]}>" if vec else o[1]) for k, o in enumerate(t for t in tensors if t[0] == "t")]
    wg = 256
    src = [header(binds, wg), ENTRY.format(wg=wg)]
    src.append("  let idx = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (idx >= pu(0u)) { return; }\n")
    per = 1 if vec else 1 + nd
    base = 1 if vec else 1 + nd
    sc_at = base + per * (len(tensors) + 1)
    if vec:
        offs = [f"pu({base + k}u) + idx" for k in range(len(tensors) + 1)]
    else:
        src.append(_decompose(nd, "idx", 1))
        offs = [_offset(nd, base + k * per) for k in range(len(tensors) + 1)]
        if coords:
            src.append(f"  let row = i32(c{nd - 2});\n  let col = i32(c{nd - 1});\n")
    for k in range(len(tensors)):
        src.append(f"  let v{k} = {names[k]}[{offs[k + 1]}];\n")
    lanes = range(4) if vec else [None]
    results = []
    for lane in lanes:
        sfx = "" if lane is None else f"[{lane}]"
        body, t, s = [], 0, 0
        for j, o in enumerate(operands):
            if o[0] in "to":
                body.append(f"    let {LETTERS[j]} = {load(o[1], o[2], f'v{t}{sfx}')};")
                t += 1
            else:
                k = sc_at + s
                raw = {"f32": f"pf({k}u)", "i32": f"pi({k}u)", "bool": f"(pi({k}u) != 0)",
                       "i64": f"((i64(pi({k + 1}u)) << 32u) | i64(pu({k}u)))"}
                body.append(f"    let {LETTERS[j]} = {raw[o[1]]};")
                s += 2 if o[1] == "i64" else 1
        if vec:
            body.insert(0, f"    let idx = idx * 4u + {lane}u;")
        name = f"r{lane if lane is not None else ''}"
        src.append(f"  var {name}: {ostore};\n  {{\n" + "\n".join(body)
                   + f"\n    {name} = {store(rt, ostore, owrap, f'({expr})')};\n  }}\n")
        results.append(name)
    value = f"vec4<{ostore}>({', '.join(results)})" if vec else results[0]
    src.append(f"  o[{offs[0]}] = {value};\n}}\n")
    return "".join(src), "w" + "r" * len(tensors)


# --- reductions --------------------------------------------------------------------------------------------

# kind -> (accumulator type, init, combine of {a} and {b}, map of the loaded value x, final of acc);
# {ct} {zero} {one} {lowest} {highest} {max} {min} are filled per compute type; SC is the scalar slot.
REDUCE = {
    "sum": ("{ct}", "{zero}", "{a} + {b}", "x", "acc"),
    "mean": ("f32", "0.0", "{a} + {b}", "f32(x)", "acc / f32(n)"),
    "prod": ("{ct}", "{one}", "{a} * {b}", "x", "acc"),
    "amax": ("{ct}", "{lowest}", "{max}({a}, {b})", "x", "acc"),
    "amin": ("{ct}", "{highest}", "{min}({a}, {b})", "x", "acc"),
    "any": ("u32", "0u", "{a} | {b}", "select(0u, 1u, x)", "acc != 0u"),
    "all": ("u32", "1u", "{a} & {b}", "select(0u, 1u, x)", "acc != 0u"),
    "norm2": ("f32", "0.0", "{a} + {b}", "f32(x) * f32(x)", "sqrt(acc)"),
    "norm1": ("f32", "0.0", "{a} + {b}", "abs(f32(x))", "acc"),
    "norminf": ("f32", "0.0", "f_max({a}, {b})", "abs(f32(x))", "acc"),
    "norm-inf": ("f32", "f_inf()", "f_min({a}, {b})", "abs(f32(x))", "acc"),
    "norm0": ("f32", "0.0", "{a} + {b}", "select(1.0, 0.0, f32(x) == 0.0)", "acc"),
    "normp": ("f32", "0.0", "{a} + {b}", "t_pow(abs(f32(x)), pf(SC))", "t_pow(acc, 1.0 / pf(SC))"),
}
_RT = {"any": "bool", "all": "bool"}


def _tree(name: str, op: str) -> str:
    """Tree-combine WG values of workgroup array `name` into name[0] (op uses {a} and {b})."""
    return (f"  for (var s = WG / 2u; s > 0u; s = s >> 1u) {{\n"
            f"    if (lid < s) {{ {name}[lid] = {op.format(a=f'{name}[lid]', b=f'{name}[lid + s]')}; }}\n"
            f"    workgroupBarrier();\n  }}\n")


def reduce(kind: str, no: int, nr: int, inp: tuple, out: tuple, wg: int, ist: str = "i32") -> tuple[str, str]:
    """One workgroup per output element: out[row] = reduce over the reduced dims.

    inp: (storage, ct); out: (storage, wrap). Params: [0] rows, [1] n, [2] in offset, [3] out offset,
    [4..] outer shape (no), outer strides (no), reduced shape (nr), reduced strides (nr), then [SC] a scalar
    (norm order p, or the var/std divisor n - correction, or the index output offset of max/min).
    Kinds: REDUCE, var/std/logsumexp (two passes), argmax/argmin, max/min (value and index outputs).
    """
    st, ct = inp
    ost, owrap = out
    sh = 4
    rsh = sh + 2 * no
    rst = rsh + nr
    sc = rst + nr
    two = kind in ("max", "min")
    binds = [("o", "w", ost)] + ([("oi", "w", ist)] if two else []) + [("x", "r", st)]
    head = header(binds, wg)
    body = ["  let row = wid.x + wid.y * nwg.x;\n  if (row >= pu(0u)) { return; }\n  let n = pu(1u);\n",
            _decompose(no, "row", sh, "q"),
            f"  let base = pu(2u){''.join(f' + q{d} * pu({sh + no + d}u)' for d in range(no))};\n"]
    dec = _decompose(nr, "j", rsh, "k").replace("\n  ", "\n    ").strip()
    off = " + ".join(["base"] + [f"k{d} * pu({rst + d}u)" for d in range(nr)])
    item = f"    {dec}\n    let x = {load(st, ct, f'x[{off}]')};\n" if dec else f"    let x = {load(st, ct, f'x[{off}]')};\n"
    loop = "  for (var j = lid; j < n; j = j + WG) {{\n" + item.replace("{", "{{").replace("}", "}}") + "{body}  }}\n"
    lowest = {"f32": "-f_inf()", "i32": "(-2147483647 - 1)", "i64": "(-9223372036854775807li - 1li)",
              "bool": "false"}[ct]
    highest = {"f32": "f_inf()", "i32": "2147483647", "i64": "9223372036854775807li", "bool": "true"}[ct]
    if kind in ("argmax", "argmin", "max", "min"):
        gt = kind in ("argmax", "max")
        op = ">" if gt else "<"
        if ct == "f32":  # NaN wins (torch propagates it)
            better = f"(is_nan(X) && !is_nan(Y)) || (!is_nan(Y) && X {op} Y)"
        else:
            better = f"X {op} Y"
        init = lowest if gt else highest
        decl = f"var<workgroup> sv: array<{ct}, {wg}>;\nvar<workgroup> si: array<u32, {wg}>;\n"
        body.append(f"  var bv: {ct} = {init};\n  var bi: u32 = 0xffffffffu;\n")
        body.append(loop.format(body=f"    if (bi == 0xffffffffu || {better.replace('X', 'x').replace('Y', 'bv')}) "
                                     "{ bv = x; bi = j; }\n"))
        pick = better.replace("X", "ov").replace("Y", "sv[lid]")
        body.append("  sv[lid] = bv;\n  si[lid] = bi;\n  workgroupBarrier();\n"
                    "  for (var s = WG / 2u; s > 0u; s = s >> 1u) {\n    if (lid < s) {\n"
                    "      let ov = sv[lid + s];\n      let oi = si[lid + s];\n"
                    f"      if (oi != 0xffffffffu && (si[lid] == 0xffffffffu || ({pick}) || (ov == sv[lid] && oi < si[lid]))) {{\n"
                    "        sv[lid] = ov;\n        si[lid] = oi;\n      }\n    }\n    workgroupBarrier();\n  }\n")
        if two:
            body.append(f"  if (lid == 0u) {{\n    o[pu(3u) + row] = {store(ct, ost, owrap, 'sv[0]')};\n"
                        f"    oi[pu({sc}u) + row] = {ist}(si[0]);\n  }}\n}}\n")
        else:
            body.append(f"  if (lid == 0u) {{ o[pu(3u) + row] = {store('i32', ost, owrap, 'i32(si[0])')}; }}\n}}\n")
        return head + decl + ENTRY.format(wg=wg) + "".join(body), "ww" + "r" if two else "wr"
    decl = f"var<workgroup> sh: array<{{t}}, {wg}>;\n"
    if kind in ("var", "std", "logsumexp"):
        if kind == "logsumexp":
            body.append("  var acc = -f_inf();\n" + loop.format(body="    acc = f_max(acc, f32(x));\n")
                        + "  sh[lid] = acc;\n  workgroupBarrier();\n" + _tree("sh", "f_max({a}, {b})")
                        + "  let m = sh[0];\n  let mm = select(m, 0.0, is_inf(m));\n  workgroupBarrier();\n"
                        "  acc = 0.0;\n" + loop.format(body="    acc = acc + t_exp(f32(x) - mm);\n"))
            final = "t_log(sh[0]) + mm"
        else:
            body.append("  var acc = 0.0;\n" + loop.format(body="    acc = acc + f32(x);\n")
                        + "  sh[lid] = acc;\n  workgroupBarrier();\n" + _tree("sh", "{a} + {b}")
                        + "  let mean = sh[0] / f32(n);\n  workgroupBarrier();\n  acc = 0.0;\n"
                        + loop.format(body="    let d = f32(x) - mean;\n    acc = acc + d * d;\n"))
            final = f"sh[0] / pf({sc}u)" if kind == "var" else f"sqrt(sh[0] / pf({sc}u))"
        body.append("  sh[lid] = acc;\n  workgroupBarrier();\n" + _tree("sh", "{a} + {b}"))
        body.append(f"  if (lid == 0u) {{ o[pu(3u) + row] = {store('f32', ost, owrap, final)}; }}\n}}\n")
        return head + decl.format(t="f32") + ENTRY.format(wg=wg) + "".join(body), "wr"
    fill = dict(ct=ct, zero=_ZERO[ct], one=_ONE[ct], lowest=lowest,
                highest=highest, max="f_max" if ct == "f32" else "max", min="f_min" if ct == "f32" else "min")
    acc_t, init, comb, xmap, final = (s.format(**fill) if "{a}" not in s else s.replace("{max}", fill["max"])
                                      .replace("{min}", fill["min"]) for s in REDUCE[kind])
    xmap, final = xmap.replace("SC", f"{sc}u"), final.replace("SC", f"{sc}u")
    # four loads in flight per thread (independent blocks), then the remainder one by one
    step = "".join(f"    {{\n      let j = j4 + {u}u * WG;\n" + item.replace("\n    ", "\n      ").replace("    let", "      let", 1)
                   + f"      acc = {comb.format(a='acc', b=xmap)};\n    }}\n" for u in range(4))
    body.append(f"  var acc: {acc_t} = {init};\n  var j4 = lid;\n"
                f"  for (; j4 + 3u * WG < n; j4 = j4 + 4u * WG) {{\n{step}  }}\n"
                + loop.replace("var j = lid;", "var j = j4;").format(body=f"    acc = {comb.format(a='acc', b=xmap)};\n")
                + "  sh[lid] = acc;\n  workgroupBarrier();\n" + _tree("sh", comb)
                + f"  if (lid == 0u) {{\n    let acc = sh[0];\n"
                f"    o[pu(3u) + row] = {store(_RT.get(kind, acc_t), ost, owrap, final)};\n  }}\n}}\n")
    return head + decl.format(t=acc_t) + ENTRY.format(wg=wg) + "".join(body), "wr"


# --- row kernels: softmax family, layer norm, cumulative sums, sort/topk ranks -------------------------------

def rows_prelude(no: int) -> str:
    """Row coordinates. Params: [0] rows, [1] n, [2] x off, [3] x stride, [4] o off, [5] o stride,
    [6..] outer shape (no), x outer strides (no), o outer strides (no)."""
    s = _decompose(no, "row", 6, "q")
    xb = " + ".join(["pu(2u)"] + [f"q{d} * pu({6 + no + d}u)" for d in range(no)])
    ob = " + ".join(["pu(4u)"] + [f"q{d} * pu({6 + 2 * no + d}u)" for d in range(no)])
    return s + f"  let xb = {xb};\n  let xs = pu(3u);\n  let ob = {ob};\n  let os = pu(5u);\n"


def _row_loop(ld: str, body: str) -> str:
    """`for j in lid, lid+WG, ... < n: let v = ld(j); body`, four loads in flight per thread."""
    step = "".join(f"    {{\n      let j = j4 + {u}u * WG;\n      let v = {ld};\n      {body}\n    }}\n" for u in range(4))
    return (f"  var j4 = lid;\n  for (; j4 + 3u * WG < n; j4 = j4 + 4u * WG) {{\n{step}  }}\n"
            f"  for (var j = j4; j < n; j = j + WG) {{\n    let v = {ld};\n    {body}\n  }}\n")


def softmax(kind: str, no: int, st: str, ost: str, owrap: str, wg: int) -> tuple[str, str]:
    """kind: softmax, log_softmax or safe_softmax (rows of only -inf give zeros) along one dim.
    Three passes over the row, as torch forms it: the max, the sum of exp(x - max), the write."""
    src = [header([("o", "w", ost), ("x", "r", st)], wg), f"var<workgroup> sh: array<f32, {wg}>;\n",
           ENTRY.format(wg=wg)]
    src.append("  let row = wid.x + wid.y * nwg.x;\n  if (row >= pu(0u)) { return; }\n  let n = pu(1u);\n")
    src.append(rows_prelude(no))
    ld = load(st, "f32", "x[xb + j * xs]")
    src.append("  var m = -f_inf();\n  {\n" + _row_loop(ld, "m = f_max(m, v);") + "  }\n"
               "  sh[lid] = m;\n  workgroupBarrier();\n" + _tree("sh", "f_max({a}, {b})")
               + "  m = sh[0];\n  workgroupBarrier();\n")
    src.append("  let mm = select(m, 0.0, is_inf(m) && m < 0.0);\n")
    src.append("  var s = 0.0;\n  {\n" + _row_loop(ld, "s = s + t_exp(v - mm);") + "  }\n"
               "  sh[lid] = s;\n  workgroupBarrier();\n" + _tree("sh", "{a} + {b}") + "  s = sh[0];\n")
    if kind == "log_softmax":
        val = "v - mm - t_log(s)"
    elif kind == "safe_softmax":
        val = "select(t_exp(v - mm) / s, 0.0, is_inf(m) && m < 0.0)"
    else:
        val = "t_exp(v - mm) / s"
    src.append("  {\n" + _row_loop(ld, f"o[ob + j * os] = {store('f32', ost, owrap, val)};") + "  }\n}\n")
    return "".join(src), "wr"


def layer_norm(no: int, st: str, ost: str, owrap: str, affine_w: bool, affine_b: bool, wg: int) -> tuple[str, str]:
    """Rows of n elements (stride xs): out = (x - mean) * rstd * w + b; also mean and rstd per row.
    Extra params: [P.SC] eps, weight and bias are contiguous vectors of n."""
    binds = [("o", "w", ost), ("om", "w", ost), ("orr", "w", ost), ("x", "r", st)]
    if affine_w:
        binds.append(("w", "r", st))
    if affine_b:
        binds.append(("bb", "r", st))
    sc = 6 + 3 * no
    src = [header(binds, wg), f"var<workgroup> sh: array<f32, {wg}>;\n", ENTRY.format(wg=wg)]
    src.append("  let row = wid.x + wid.y * nwg.x;\n  if (row >= pu(0u)) { return; }\n  let n = pu(1u);\n")
    src.append(rows_prelude(no))
    ld = load(st, "f32", "x[xb + j * xs]")
    src.append(f"  var s = 0.0;\n  for (var j = lid; j < n; j = j + WG) {{ s = s + {ld}; }}\n"
               "  sh[lid] = s;\n  workgroupBarrier();\n" + _tree("sh", "{a} + {b}")
               + "  let mean = sh[0] / f32(n);\n  workgroupBarrier();\n")
    src.append(f"  var q = 0.0;\n  for (var j = lid; j < n; j = j + WG) {{ let d = {ld} - mean; q = q + d * d; }}\n"
               "  sh[lid] = q;\n  workgroupBarrier();\n" + _tree("sh", "{a} + {b}")
               + f"  let rstd = 1.0 / sqrt(sh[0] / f32(n) + pf({sc}u));\n")
    val = "(v - mean) * rstd"
    if affine_w:
        val = f"{val} * {load(st, 'f32', 'w[j]')}"
    if affine_b:
        val = f"{val} + {load(st, 'f32', 'bb[j]')}"
    src.append(f"  for (var j = lid; j < n; j = j + WG) {{\n    let v = {ld};\n"
               f"    o[ob + j * os] = {store('f32', ost, owrap, val)};\n  }}\n"
               f"  if (lid == 0u) {{\n    om[pu({sc + 1}u) + row] = {store('f32', ost, owrap, 'mean')};\n"
               f"    orr[pu({sc + 1}u) + row] = {store('f32', ost, owrap, 'rstd')};\n  }}\n}}\n")
    return "".join(src), "www" + "r" * (1 + affine_w + affine_b)


def cumulative(kind: str, no: int, st: str, ct: str, ost: str, owrap: str) -> tuple[str, str]:
    """One thread per row, in order (as torch does): cumsum (compensated in f32) or cumprod."""
    src = [header([("o", "w", ost), ("x", "r", st)], 64), ENTRY.format(wg=64)]
    src.append("  let row = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (row >= pu(0u)) { return; }\n"
               "  let n = pu(1u);\n")
    src.append(rows_prelude(no))
    ld = load(st, ct, "x[xb + j * xs]")
    if kind == "cumsum" and ct == "f32":
        # Two-sum compensation approximates torch's double accumulator on the CPU.
        body = (f"    let v = {ld};\n    let t = s + v;\n    let bp = t - s;\n"
                "    c = c + ((s - (t - bp)) + (v - bp));\n    s = t;\n"
                f"    o[ob + j * os] = {store('f32', ost, owrap, 's + c')};\n")
        src.append("  var s = 0.0;\n  var c = 0.0;\n  for (var j = 0u; j < n; j = j + 1u) {\n" + body + "  }\n}\n")
    else:
        op = "+" if kind == "cumsum" else "*"
        init = _ZERO[ct] if kind == "cumsum" else _ONE[ct]
        src.append(f"  var s = {init};\n  for (var j = 0u; j < n; j = j + 1u) {{\n    s = s {op} {ld};\n"
                   f"    o[ob + j * os] = {store(ct, ost, owrap, 's')};\n  }}\n}}\n")
    return "".join(src), "wr"


def rank_sort(no: int, st: str, ct: str, ost: str, owrap: str, ist: str) -> tuple[str, str]:
    """Sort/topk by rank: thread (row, j) counts the elements that order before x_j (stable: ties by index)
    and writes x_j and j at that position if it is < k. Params: rows layout + [SC] k, [SC+1] descending,
    [SC+2] index offset, [SC+3] index stride, [SC+4..] index outer strides."""
    sc = 6 + 3 * no
    src = [header([("o", "w", ost), ("oi", "w", ist), ("x", "r", st)], 64), ENTRY.format(wg=64)]
    src.append("  let t = (wid.x + wid.y * nwg.x) * WG + lid;\n  let n = pu(1u);\n"
               "  if (t >= pu(0u) * n) { return; }\n  let row = t / n;\n  let j = t % n;\n")
    src.append(rows_prelude(no))
    ib = " + ".join([f"pu({sc + 2}u)"] + [f"q{d} * pu({sc + 4 + d}u)" for d in range(no)])
    if ct == "f32":
        before = ("((is_nan(y) && !is_nan(v)) || (!is_nan(y) && !is_nan(v) && (y > v)))",
                  "((is_nan(v) && !is_nan(y)) || (!is_nan(y) && !is_nan(v) && (y < v)))")
        same = "(y == v || (is_nan(y) && is_nan(v)))"
    else:
        before, same = ("(y > v)", "(y < v)"), "(y == v)"
    src.append(f"  let v = {load(st, ct, 'x[xb + j * xs]')};\n  let desc = pi({sc + 1}u) != 0;\n"
               "  var r = 0u;\n  for (var i = 0u; i < n; i = i + 1u) {\n"
               f"    let y = {load(st, ct, 'x[xb + i * xs]')};\n"
               f"    let b = select({before[1]}, {before[0]}, desc);\n"
               f"    if (b || ({same} && i < j)) {{ r = r + 1u; }}\n  }}\n"
               f"  if (r < pu({sc}u)) {{\n    o[ob + r * os] = {store(ct, ost, owrap, 'v')};\n"
               f"    oi[{ib} + r * pu({sc + 3}u)] = {ist}(j);\n  }}\n}}\n")
    return "".join(src), "wwr"


# --- matmul ------------------------------------------------------------------------------------------------

def matmul(cfg: tuple, st_a: str, st_b: str, st_c: str | None, ost: str, owrap: str) -> tuple[str, str]:
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


def matmul_fast(cfg: tuple) -> tuple[str, str]:
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


def grouped_mm(st: str, ost: str, owrap: str, gst: str = "i32") -> tuple[str, str]:
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


# --- attention ---------------------------------------------------------------------------------------------

def attention(st: str, mask: str | None, ept: int, wg: int) -> tuple[str, str]:
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
{_tree("red", "f_max({a}, {b})")}    let mb = red[0];
    let mn = f_max(m, mb);
    let mu = select(mn, 0.0, is_inf(mn) && mn < 0.0);
    let p = select(t_exp(s - mu), 0.0, is_inf(s) && s < 0.0);
    workgroupBarrier();
    ps[lid] = p;
    red[lid] = p;
    workgroupBarrier();
{_tree("red", "{a} + {b}")}    let corr = select(t_exp(m - mu), 0.0, is_inf(m) && m < 0.0);
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


# --- convolution and pooling -------------------------------------------------------------------------------

def conv2d(st: str, ost: str, owrap: str, bias: bool) -> tuple[str, str]:
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


def pool2d(kind: str, st: str, ost: str, owrap: str, ist: str = "i32") -> tuple[str, str]:
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


# --- indexing ----------------------------------------------------------------------------------------------

def gather(nd: int, nidx: int, st: str, ct: str, ost: str, owrap: str, idx_st: tuple, scatter: bool,
           accumulate: bool = False) -> tuple[str, str]:
    """Advanced indexing in one shape: for every point c of an N-d index space,
    src = S.off + sum_d c_d * S.coef_d + sum_k wrap(idx_k[I_k.off + sum_d c_d * I_k.coef_d]) * dimstride_k.
    Gather: out[O(c)] = src[src]. Scatter (index_put_): self[src] = values[V(c)] (`accumulate`: +=, atomics
    for int32 storage). Params: [0] numel [1..nd] shape; O (or V) off + nd; S off + nd; per index tensor:
    off + nd strides, dim stride, dim size."""
    per = 1 + nd
    o_at, s_at = 1 + nd, 1 + nd + per
    binds = []
    if scatter:
        elem = "atomic<i32>" if accumulate else st
        binds += [("s", "w", elem), ("vals", "r", st)]
    else:
        binds += [("o", "w", ost), ("s", "r", st)]
    binds += [(f"ix{k}", "r", t) for k, t in enumerate(idx_st)]
    src = [header(binds, 256), ENTRY.format(wg=256)]
    src.append("  let idx = (wid.x + wid.y * nwg.x) * WG + lid;\n  if (idx >= pu(0u)) { return; }\n")
    src.append(_decompose(nd, "idx", 1))
    src.append(f"  var so = {_offset(nd, s_at)};\n")
    for k in range(nidx):
        at = s_at + per + k * (per + 2)
        src.append(f"  {{\n    let iv = i32(ix{k}[{_offset(nd, at)}]);\n"
                   f"    let w = select(iv, iv + pi({at + per + 1}u), iv < 0);\n"
                   f"    so = so + u32(w) * pu({at + per}u);\n  }}\n")
    if scatter:
        v = f"vals[{_offset(nd, o_at)}]"
        if accumulate:
            src.append(f"  atomicAdd(&s[so], {v});\n}}\n")
        else:
            src.append(f"  s[so] = {v};\n}}\n")
        return "".join(src), "wr" + "r" * nidx
    src.append(f"  o[{_offset(nd, o_at)}] = {store(ct, ost, owrap, load(st, ct, 's[so]'))};\n}}\n")
    return "".join(src), "wr" + "r" * nidx


def isin(st: str, tst: str, ct: str) -> tuple[str, str]:
    """out[i] = any_j (x[i] == t[j]) (xor invert). x and t contiguous. Params: [0] n [1] nt [2] x off
    [3] t off [4] invert."""
    src = [header([("o", "w", "u32"), ("x", "r", st), ("tt", "r", tst)], 256), ENTRY.format(wg=256)]
    src.append(f"""  let i = (wid.x + wid.y * nwg.x) * WG + lid;
  if (i >= pu(0u)) {{ return; }}
  let v = {load(st, ct, 'x[pu(2u) + i]')};
  var hit = false;
  for (var j = 0u; j < pu(1u); j = j + 1u) {{
    if ({load(tst, ct, 'tt[pu(3u) + j]')} == v) {{ hit = true; break; }}
  }}
  o[i] = select(0u, 1u, hit != (pu(4u) != 0u));
}}
""")
    return "".join(src), "wrr"


def histc(st: str) -> tuple[str, str]:
    """Counts into an atomic i32 histogram: bin = int((x - lo) * bins / (hi - lo)), hi inclusive.
    Params: [0] n [1] bins [2] x off [3] lo (f32) [4] hi (f32)."""
    src = [header([("cnt", "w", "atomic<i32>"), ("x", "r", st)], 256), ENTRY.format(wg=256)]
    src.append(f"""  let i = (wid.x + wid.y * nwg.x) * WG + lid;
  if (i >= pu(0u)) {{ return; }}
  let v = {load(st, 'f32', 'x[pu(2u) + i]')};
  let lo = pf(3u); let hi = pf(4u); let nb = pu(1u);
  if (is_nan(v) || v < lo || v > hi) {{ return; }}
  var b = u32((v - lo) * f32(nb) / (hi - lo));
  if (b >= nb) {{ b = nb - 1u; }}
  atomicAdd(&cnt[b], 1);
}}
""")
    return "".join(src), "wr"

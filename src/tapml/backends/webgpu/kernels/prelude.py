"""What every WGSL kernel shares: the parameter window and its `Slots`, the entry point, accurate f32 math,
integer helpers, dtype tables and text helpers (binding header, load/store, index decomposition, trees).

It must hold no kernel of its own (each family module writes its WGSL beside its launcher) and must not touch
the device (`runtime.py` compiles and caches) or know ATen semantics (`ops.py`).
Conventions: storage bindings come first in the order the launcher passes buffers; the uniform parameter
window `P` (256 i32 words, floats bit-cast) follows, its words named once per kernel by a `Slots` declaration.
Workgroups are linearized as wid.x + wid.y * nwg.x.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Sequence
from typing import Any

# --- shared pieces -----------------------------------------------------------------------------------------

PARAMS = """
struct Params {{ v: array<vec4<i32>, 64>, }};
@group(0) @binding({pb}) var<uniform> P: Params;
fn pi(i: u32) -> i32 {{ return P.v[i >> 2u][i & 3u]; }}
fn pu(i: u32) -> u32 {{ return bitcast<u32>(P.v[i >> 2u][i & 3u]); }}
fn pf(i: u32) -> f32 {{ return bitcast<f32>(P.v[i >> 2u][i & 3u]); }}
"""


class Slots:
    """The parameter words of one kernel, named once: its WGSL reads them by name and its launcher packs them
    by name, both through the `Layout` that `bind` gives, so text and launcher cannot disagree on an index.

    Fields are space-separated names in window order; `name:n` is a run of n words, n a number or a dimension
    given to `bind` (a rank, say)."""

    __slots__ = ("_layouts", "fields")

    def __init__(self, *fields: str) -> None:
        self.fields = tuple((name, n) for group in fields
                            for name, _, n in (f.partition(":") for f in group.split()))
        self._layouts: dict[tuple, Layout] = {}

    def bind(self, **dims: int) -> Layout:
        key = tuple(dims.items())  # (dims given in another order only cache an equal layout twice)
        try:
            return self._layouts[key]
        except KeyError:
            lay = Layout([(name, None if not n else int(n) if n.isdigit() else dims[n])
                          for name, n in self.fields])
            self._layouts[key] = lay
            return lay


class Layout:
    """Where the slots of a bound `Slots` lie: `at[name]` is a slot's first word; `u`, `i` and `f` give the
    WGSL that reads it as u32, i32 or f32 (`lay.u.M` is "pu(0u)", a run gives a tuple, one per word); `pack`
    lays values out in window order."""

    __slots__ = ("at", "f", "i", "pack", "runs", "u", "words")

    def __init__(self, fields: Sequence[tuple[str, int | None]]) -> None:  # run length, None for one word
        self.at: dict[str, int] = {}
        self.runs: dict[str, int | None] = {}
        n = 0
        for name, run in fields:
            if name in self.at:
                raise ValueError(f"parameter slot {name!r} declared twice")
            if not name.isidentifier() or keyword.iskeyword(name):
                raise ValueError(f"parameter slot {name!r} is not a plain name")
            self.at[name], self.runs[name] = n, run
            n += 1 if run is None else run
        self.words = n
        self.u, self.i, self.f = _Reads(self, "pu"), _Reads(self, "pi"), _Reads(self, "pf")
        self.pack: Callable[..., list[int]] = _packer(self.runs)


def _packer(runs: dict[str, int | None]) -> Callable[..., list[int]]:
    """`pack(**values)`: the parameter words, every slot by name (a run as a sequence of its length), in
    window order; a slot missing or not declared is a TypeError, a run of the wrong length a ValueError."""
    order = tuple(runs.items())
    names = frozenset(runs)

    def pack(**values: Any) -> list[int]:
        if values.keys() != names:
            missing = ", ".join(repr(n) for n in sorted(names - values.keys()))
            extra = ", ".join(repr(n) for n in sorted(values.keys() - names))
            raise TypeError(f"pack() missing slot(s): {missing}" if missing else
                            f"pack() got unexpected slot(s): {extra}")
        words: list[int] = []
        for name, run in order:
            value = values[name]
            if run is None:
                words.append(value)
            elif len(value) == run:
                words.extend(value)
            else:
                raise ValueError(f"parameter runs of the wrong length: {name} takes {run} words, got {len(value)}")
        return words

    return pack


class _Reads:
    """`reads.name`: the WGSL that reads slot `name` through one accessor (pu, pi or pf) of the window."""

    __slots__ = ("_fn", "_lay")

    def __init__(self, lay: Layout, fn: str) -> None:
        self._lay, self._fn = lay, fn

    def __getattr__(self, name: str) -> Any:
        try:
            at, run = self._lay.at[name], self._lay.runs[name]
        except KeyError:
            raise AttributeError(f"no parameter slot {name!r}") from None
        if run is None:
            return f"{self._fn}({at}u)"
        return tuple(f"{self._fn}({at + d}u)" for d in range(run))

    __getitem__ = __getattr__  # reads["off0"], for slots named in a loop


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
  return t_logpoly(m, e);
}
// log(1 + m) + e·ln 2 for m in [1/√2 - 1, √2 - 1] (cephes' logf polynomial, ln 2 split in two parts)
fn t_logpoly(m: f32, e: f32) -> f32 {
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
// Near zero the polynomial takes x itself: 1 + x would round away x's low bits, and the classic correction
// log(u)·x/(u − 1) needs u − 1 computed exactly, which a shader compiler may fold to x (lavapipe does: a 3e-3
// relative error at 1.6e-5, found by the amplified cuts of Mamba2's softplus).
fn t_log1p(x: f32) -> f32 {
  if (x == 0.0) { return x; }
  if (x > -0.29289321881345254 && x < 0.41421356237309503) { return t_logpoly(x, 0.0); }
  return t_log(1.0 + x);
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

ZERO = {"f32": "0.0", "f16": "f16(0.0)", "i32": "0", "i64": "i64(0)", "u32": "0u", "bool": "false"}
ONE = {"f32": "1.0", "f16": "f16(1.0)", "i32": "1", "i64": "i64(1)", "u32": "1u", "bool": "true"}


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


def access(bindings: list[tuple[str, str, str]]) -> str:
    """The access letters ("r" or "w") of `header`'s storage bindings in order: what the runtime lays out."""
    return "".join(acc for _, acc, _ in bindings)


def load(storage: str, ct: str, e: str) -> str:
    """Convert a stored element to a compute type (f32, i32 or bool)."""
    if ct == "bool":  # written as !(x == 0): an ordered != would call NaN false
        return f"!({e} == {ZERO[storage]})"
    if storage == ct:
        return e
    return f"{ct}({e})"


def store(rt: str, storage: str, wrap: str, e: str) -> str:
    """Convert an expression of result type `rt` to the stored element type (+ bf16 rounding / int wrapping)."""
    if rt == "bool":
        v = f"select({ZERO[storage]}, {ONE[storage]}, {e})"
    elif storage == "u32":
        v = f"select(0u, 1u, !(({e}) == {ZERO[rt]}))"
    elif storage == rt:
        v = e
    else:
        v = f"{storage}({e})"
    return f"{wrap}({v})" if wrap else v


def decompose(i: str, shape: Sequence[str], prefix: str = "c") -> str:
    """Row-major coordinates {prefix}0..{prefix}{nd-1} of linear index `i` over `shape` (slot reads)."""
    nd = len(shape)
    if nd == 0:
        return ""
    out = [f"  var {prefix}r = {i};"]
    for d in range(nd - 1, 0, -1):
        out.append(f"  let {prefix}{d} = {prefix}r % {shape[d]}; {prefix}r = {prefix}r / {shape[d]};")
    out.append(f"  let {prefix}0 = {prefix}r;")
    return "\n".join(out) + "\n"


def offset(off: str, strides: Sequence[str], prefix: str = "c") -> str:
    """off + sum_d coord_d * strides[d] (slot reads)."""
    return " + ".join([off] + [f"{prefix}{d} * {s}" for d, s in enumerate(strides)])


def tree(name: str, op: str) -> str:
    """Tree-combine WG values of workgroup array `name` into name[0] (op uses {a} and {b})."""
    return (f"  for (var s = WG / 2u; s > 0u; s = s >> 1u) {{\n"
            f"    if (lid < s) {{ {name}[lid] = {op.format(a=f'{name}[lid]', b=f'{name}[lid + s]')}; }}\n"
            f"    workgroupBarrier();\n  }}\n")

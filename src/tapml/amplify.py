"""Amplified cases: realistic variants of one carved sample — lengths cut around tile and workgroup sizes, extremes
moved to the ends and tied, values shifted and scaled, long-context positions, integer boundaries, fully masked
rows, the same values in other layouts, causal attention with L ≠ S, indices counted from the end.

Each variant is a call of the same op, built from the real sample and the op's schema, with a name and a line
saying how it was made. It must not run ops or judge: replay computes each variant's reference (dropping the
variants the reference refuses) and judges it by the same fp64 rule as the real case.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tapml.ops import OpCall, is_seeded_random, op_kind

DEFAULT_LIMIT = 12  # variants per sample
# A sample whose inputs are large gets fewer: each variant costs a reference, an oracle and a target run.
ELEMENT_BUDGET, MIN_VARIANTS = 1 << 23, 3
# Tile, workgroup and vector widths kernels are commonly blocked by: lengths just around them reach tails.
TILES = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LONG_CONTEXT = (8192, 131072)
SHIFT = 1e4  # a shift of this many RMS: rows whose mean dwarfs their spread
SCALE_UP, SCALE_DOWN = 16.0, 1e-3

_ROW = {"aten._softmax", "aten._log_softmax", "aten._safe_softmax", "aten.cumsum", "aten.cumprod", "aten.sort",
        "aten.topk", "aten.argmax", "aten.argmin", "aten.max", "aten.min", "aten.sum", "aten.mean", "aten.amax",
        "aten.amin", "aten.prod", "aten.var", "aten.std", "aten.var_mean", "aten.logsumexp",
        "aten.linalg_vector_norm", "aten.any", "aten.all", "aten.nansum", "aten.cummax", "aten.cummin"}
_SOFTMAX = {"aten._softmax", "aten._log_softmax", "aten._safe_softmax", "aten.logsumexp"}
_SCANS = {"aten.sort", "aten.topk", "aten.cumsum", "aten.cumprod", "aten.cummax", "aten.cummin"}
_NORM = {"aten.native_layer_norm", "aten.native_group_norm", "aten.native_batch_norm",
         "aten._native_batch_norm_legit", "aten._native_batch_norm_legit_no_training"}
_MATMUL = {"aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm", "aten.mv", "aten.dot"}
_SDPA = {"aten._scaled_dot_product_flash_attention_for_cpu", "aten.scaled_dot_product_attention",
         "aten._scaled_dot_product_attention_math"}
# Unary float math whose kernels reduce ranges or saturate: a wider input reaches those paths.
_MATH = {"aten.exp", "aten.exp2", "aten.expm1", "aten.log", "aten.log1p", "aten.log2", "aten.sin", "aten.cos",
         "aten.tan", "aten.tanh", "aten.sigmoid", "aten.silu", "aten.gelu", "aten.erf", "aten.mish",
         "aten.softplus", "aten.elu", "aten.pow", "aten.rsqrt", "aten.sqrt", "aten.reciprocal"}
_CANCEL = {"aten.add", "aten.sub", "aten.rsub"}  # a shared shift cancels: catastrophic cancellation
_INDEX_ARGS = {"indices", "index", "offs", "offsets", "repeats", "target", "lengths", "src_index"}


@dataclass(frozen=True)
class Variant:
    """One amplified call: `name` is short and stable (`cut:dim-1=65`), `description` says how it was made.
    `layout_only`: the same values as the real sample in other layouts, so the reference must give the values
    it gives for contiguous inputs (some CPU kernels assume a layout their callers guarantee)."""

    name: str
    description: str
    call: OpCall
    layout_only: bool = False


def variants(call: OpCall, *, seed: int = 0, limit: int = DEFAULT_LIMIT) -> list[Variant]:
    """Up to `limit` variants of `call` (fewer for large inputs; none for calls without tensor inputs or that
    draw random numbers), drawn round-robin over the kinds that apply so each kind is represented; the same for
    the same seed."""
    try:
        a = _Args(call)
    except Exception:  # not an ATen overload of this torch: nothing to derive from
        return []
    if not a.tensors() or is_seeded_random(a.func, call.args, call.kwargs) or limit <= 0:
        return []
    biggest = max(t.numel() for _, _, t in a.tensors())
    limit = min(limit, max(MIN_VARIANTS, ELEMENT_BUDGET // max(biggest, 1)))
    rng = random.Random(f"{seed}:{call.op}")
    pools = []
    for kind in (_cuts, _extremes, _shifts, _positions, _integers, _masks, _layouts, _causal, _from_the_end):
        try:
            pools.append(kind(a, rng))
        except (RuntimeError, ValueError, IndexError, TypeError):  # arguments this kind cannot read: skipped
            pools.append([])
    out: list[Variant] = []
    seen: set[str] = set()
    while len(out) < limit and any(pools):
        for pool in pools:
            while pool:
                v = pool.pop(0)
                if v.name not in seen:
                    seen.add(v.name)
                    out.append(v)
                    break
            if len(out) >= limit:
                break
    return out


# --- the call, by schema names ------------------------------------------------------------------------------

class _Args:
    """A call's arguments by schema name, rebuilt into an OpCall with some of them changed."""

    def __init__(self, call: OpCall) -> None:
        self.call = call
        self.func = call.func()
        self.kind = op_kind(call.op)
        self.schema = {arg.name: arg for arg in self.func._schema.arguments}
        self.names = list(self.schema)
        self.values: dict[str, Any] = dict(zip(self.names, call.args))
        self.values.update(call.kwargs)

    def get(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        arg = self.schema.get(name)
        return arg.default_value if arg is not None and arg.has_default_value() else None

    def tensors(self) -> list[tuple[str, int | None, torch.Tensor]]:
        """(name, index in a list or None, tensor) of every tensor input."""
        out = []
        for name, v in self.values.items():
            if isinstance(v, torch.Tensor):
                out.append((name, None, v))
            elif isinstance(v, (list, tuple)):
                out += [(name, i, t) for i, t in enumerate(v) if isinstance(t, torch.Tensor)]
        return out

    def main(self) -> tuple[str, torch.Tensor] | None:
        for name, i, t in self.tensors():
            if i is None:
                return name, t
        return None

    def with_(self, changes: dict[str, Any]) -> OpCall:
        values = dict(self.values, **changes)
        npos = len(self.call.args)
        args = tuple(values[n] for n in self.names[:npos])
        kwargs = {n: values[n] for n in self.names[npos:] if n in values}
        return OpCall(self.call.op, args, kwargs, None, self.call.provenance, self.call.rng_state)

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> dict[str, Any] | None:
        """The tensor inputs `fn` changes (None: unchanged); None when it changes none."""
        changes: dict[str, Any] = {}
        for name, v in self.values.items():
            if isinstance(v, torch.Tensor):
                new = fn(name, v)
                if new is not None:
                    changes[name] = new
            elif isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v):
                items = [fn(name, t) if isinstance(t, torch.Tensor) else None for t in v]
                if any(x is not None for x in items):
                    changes[name] = type(v)(x if x is not None else t for x, t in zip(items, v))
        return changes or None


# --- layout helpers -----------------------------------------------------------------------------------------

def _like(values: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """`values` (orig's shape or a cut of it) laid out in orig's dim order (a transposed weight stays
    transposed), so a variant changes one thing at a time."""
    if orig.dim() < 2 or orig.is_contiguous() or any(s == 0 for s in orig.stride()):
        return values.contiguous().clone()
    order = sorted(range(orig.dim()), key=lambda d: (-orig.stride()[d], d))
    back = [order.index(d) for d in range(orig.dim())]
    return values.permute(order).contiguous().permute(back)


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A fresh [rows, n] copy of `t` with `dim` last."""
    return t.movedim(dim, -1).reshape(-1, t.shape[dim]).clone()


def _unrows(flat: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    moved = list(t.movedim(dim, -1).shape)
    return _like(flat.reshape(moved).movedim(-1, dim), t)


def _floats(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0


def _fits(t: torch.Tensor, headroom: float = 16.0) -> bool:
    """Whether `t` stays well inside its float dtype's range."""
    finite = t[torch.isfinite(t)]
    return not finite.numel() or float(finite.abs().max()) * headroom < torch.finfo(t.dtype).max


def _peak(t: torch.Tensor) -> float:
    """The largest finite magnitude in `t` (0 when none is finite)."""
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _rms(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)].double()
    return float(finite.pow(2).mean().sqrt()) if finite.numel() else 0.0


# --- cuts ---------------------------------------------------------------------------------------------------

def _tile_note(n: int) -> str:
    if n == 1:
        return "a single element"
    if n in TILES:
        return f"tile {n}"
    if n - 1 in TILES:
        return f"tile {n - 1} + 1"
    return f"tile {n + 1} - 1"


def _lengths(n: int) -> list[int]:
    """Lengths below the real `n` around the two nearest tile sizes (odd ones first), then 1."""
    out: list[int] = []
    for b in sorted(TILES, reverse=True):
        trio = [x for x in (b + 1, b - 1, b) if 1 <= x < n and x not in out]
        if trio:
            out += trio
            if len({x for x in out if x > 1}) >= 5:
                break
    if n > 2 and 1 not in out:
        out.append(1)
    return out


def _row_dim(a: _Args, x: torch.Tensor) -> int:
    """The dim a row op walks: its `dim` argument (the last of several), else the last dim."""
    d = a.get("dim")
    if isinstance(d, (list, tuple)):
        d = max(v % x.dim() for v in d) if d else None
    if not isinstance(d, int):
        return x.dim() - 1
    return d % x.dim()


def _cut_groups(a: _Args) -> Iterator[tuple[str, int, list[tuple[str, int | None, int]], Callable[[int], dict]]]:
    """(what is cut, its real length, the (name, list index, dim) cut together, extra changes for a length)."""
    main = a.main()
    if main is None:
        return
    name, x = main
    none: Callable[[int], dict] = lambda n: {}
    if a.kind in _MATMUL:
        t = {n: v for n, _, v in a.tensors()}
        lhs, rhs = next(pair for pair in (("mat1", "mat2"), ("batch1", "batch2"), ("self", "mat2"),
                                          ("self", "vec"), ("self", "tensor")) if pair[0] in t and pair[1] in t)
        if lhs not in t or rhs not in t:
            return
        la, rb = t[lhs], t[rhs]
        bias = "self" if "mat1" in t or "batch1" in t else None
        if a.kind == "aten.dot":
            yield "K", la.shape[0], [(lhs, None, 0), (rhs, None, 0)], none
            return
        yield "K", la.shape[-1], [(lhs, None, la.dim() - 1), (rhs, None, 0 if rb.dim() == 1 else rb.dim() - 2)], none
        m_cut = [(lhs, None, la.dim() - 2)]
        if bias and t[bias].dim() >= 2 and t[bias].shape[-2] == la.shape[-2]:
            m_cut.append((bias, None, t[bias].dim() - 2))
        yield "M", la.shape[-2], m_cut, none
        if rb.dim() >= 2:
            n_cut = [(rhs, None, rb.dim() - 1)]
            if bias and t[bias].dim() >= 1 and t[bias].shape[-1] == rb.shape[-1] and rb.shape[-1] > 1:
                n_cut.append((bias, None, t[bias].dim() - 1))
            yield "N", rb.shape[-1], n_cut, none
        return
    if a.kind in _SDPA:
        q, k, mask = a.get("query"), a.get("key"), a.get("attn_mask")
        s_cut = [("key", None, 2), ("value", None, 2)]
        l_cut = [("query", None, 2)]
        if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
            if mask.shape[-1] == k.shape[2]:
                s_cut.append(("attn_mask", None, mask.dim() - 1))
            if mask.shape[-2] == q.shape[2] and q.shape[2] > 1:
                l_cut.append(("attn_mask", None, mask.dim() - 2))
        yield "keys S", k.shape[2], s_cut, none
        yield "queries L", q.shape[2], l_cut, none
        v = a.get("value")
        e_cut = [("query", None, 3), ("key", None, 3)] + ([("value", None, 3)] if v.shape[3] == q.shape[3] else [])
        yield "head dim E", q.shape[3], e_cut, none
        return
    if a.kind == "aten.native_layer_norm":
        cut = [(name, None, x.dim() - 1)] + [(w, None, 0) for w in ("weight", "bias")
                                             if isinstance(a.get(w), torch.Tensor) and a.get(w).dim() == 1]
        shape = list(a.get("normalized_shape"))
        if len(shape) == 1:
            yield "normalized dim", x.shape[-1], cut, lambda n: {"normalized_shape": [n]}
        return
    if a.kind == "aten.native_group_norm":
        if x.dim() >= 3:
            rest = math.prod(x.shape[2:-1])
            yield "last spatial dim", x.shape[-1], [(name, None, x.dim() - 1)], lambda n: {"HxW": rest * n}
        return
    if a.kind in _NORM:
        if x.dim() >= 3:
            yield "last spatial dim", x.shape[-1], [(name, None, x.dim() - 1)], none
        return
    if a.kind in _ROW:
        d = _row_dim(a, x) if x.dim() else -1
        if d < 0:
            return
        extra = none
        if a.kind == "aten.topk":
            k = a.get("k")
            extra = lambda n: {"k": min(k, n)}
        walked = "dim" if a.kind in _SOFTMAX | _SCANS else "reduced dim"
        yield f"{walked} {d}", x.shape[d], [(name, None, d)], extra
        return
    if x.dim() == 0:
        return
    n = x.shape[-1]
    cut = [(nm, i, t.dim() - 1) for nm, i, t in a.tensors()
           if nm not in _INDEX_ARGS and t.dim() >= 1 and t.shape[-1] == n]
    yield "last dim", n, cut, none


def _cuts(a: _Args, rng: random.Random) -> list[Variant]:
    groups = list(_cut_groups(a))
    per: list[list[Variant]] = []
    for what, n, cut, extra in groups:
        if n < 3:
            continue
        vs = []
        for length in _lengths(n):
            changes: dict[str, Any] = dict(extra(length))
            for name, idx, dim in cut:
                src = changes.get(name, a.values[name])
                if idx is None:
                    changes[name] = _narrow(src, a.values[name], dim, length)
                else:
                    items = list(src)
                    items[idx] = _narrow(items[idx], a.values[name][idx], dim, length)
                    changes[name] = type(a.values[name])(items)
            vs.append(Variant(f"cut:{what.replace(' ', '-')}={length}",
                              f"{what} cut from {n} to {length} ({_tile_note(length)})", a.with_(changes)))
        per.append(vs)
    # interleave the groups (K, M, N ...) so a small budget still cuts each
    out = []
    for i in range(max((len(v) for v in per), default=0)):
        out += [v[i] for v in per if i < len(v)]
    return out


def _narrow(t: torch.Tensor, orig: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    view = t.narrow(dim, 0, length)
    if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
        return view  # an expanded (broadcast) input stays expanded
    return _like(view, orig)


# --- values: extremes, ties, shifts and scales --------------------------------------------------------------

def _extremes(a: _Args, rng: random.Random) -> list[Variant]:
    main = a.main()
    if a.kind not in _ROW or main is None:
        return []
    name, x = main
    if x.dim() == 0 or x.dtype == torch.bool or x.numel() == 0 or x.shape[_row_dim(a, x)] < 2:
        return []
    d = _row_dim(a, x)
    flat = _rows(x, d)
    key = flat.double().nan_to_num(0.0)
    rows = torch.arange(flat.shape[0])

    def swap(f: torch.Tensor, i: torch.Tensor, j: int) -> None:
        vi, vj = f[rows, i].clone(), f[rows, j].clone()
        f[rows, i], f[rows, j] = vj, vi

    n = flat.shape[1]
    out = []
    for first, last, say in (("min", "max", "maximum moved to the last position and the minimum to the first"),
                             ("max", "min", "maximum moved to the first position and the minimum to the last")):
        f = flat.clone()
        k = key.clone()
        pick = (lambda t: t.argmax(1)) if last == "max" else (lambda t: t.argmin(1))
        i = pick(k)
        swap(f, i, n - 1)
        swap(k, i, n - 1)
        i = (k[:, : n - 1].argmin(1) if first == "min" else k[:, : n - 1].argmax(1))
        swap(f, i, 0)
        out.append(Variant(f"extremes:{last}-last", f"along dim {d}: {say}", a.with_({name: _unrows(f, x, d)})))
    f = flat.clone()
    top = f[rows, key.argmax(1)]
    f[:, 0], f[:, n - 1] = top, top
    out.append(Variant("extremes:ties", f"along dim {d}: the maximum repeated at the first and last positions "
                                        "(ties)", a.with_({name: _unrows(f, x, d)})))
    return out


def _shifts(a: _Args, rng: random.Random) -> list[Variant]:
    main = a.main()
    if main is None:
        return []
    name, x = main
    out = []
    shift_ok = a.kind in _ROW | _NORM | _CANCEL and _floats(x)
    if shift_ok:
        c = SHIFT * (_rms(x) or 1.0)
        for sign, where in ((1, "above"), (-1, "below")):
            shifted = x.double() + sign * c
            if _peak(shifted) * 16 >= torch.finfo(x.dtype).max:  # -inf entries (masked logits) stay -inf
                continue
            changes = {name: _like(shifted.to(x.dtype), x)}
            if a.kind in _CANCEL:  # both operands share the shift
                other = a.get("other")
                if isinstance(other, torch.Tensor) and _floats(other):
                    changes["other"] = _like((other.double() + sign * c).to(other.dtype), other)
            out.append(Variant(f"shift:{'+' if sign > 0 else '-'}{SHIFT:g}rms",
                               f"values shifted {where} zero by {SHIFT:g}·rms = {c:.3g} (mean dwarfs spread)",
                               a.with_(changes)))
            if a.kind in _NORM:
                break  # a normalization's shift is symmetric
    scaled = name
    if a.kind in _SDPA:
        scaled, x = "query", a.get("query")
    if (a.kind in _ROW | _NORM | _SDPA | _MATH) and _floats(x) and _fits(x, 16 * SCALE_UP):
        out.append(Variant(f"scale:x{SCALE_UP:g}", f"{scaled} scaled by {SCALE_UP:g}"
                           + (" (peaked attention)" if a.kind in _SDPA else ""),
                           a.with_({scaled: _like((x.double() * SCALE_UP).to(x.dtype), x)})))
    if a.kind in _NORM and _floats(x):
        out.append(Variant(f"scale:x{SCALE_DOWN:g}", f"{scaled} scaled by {SCALE_DOWN:g} (spread near eps)",
                           a.with_({scaled: _like((x.double() * SCALE_DOWN).to(x.dtype), x)})))
    return out


# --- positions and integers ---------------------------------------------------------------------------------

def _progression(t: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """(dim, step) when `t` ends in a run advancing by a constant step along a dim (positions, or angles =
    positions · frequencies: what position ids and rotary embeddings hold; left padding leaves the first
    positions irregular)."""
    if t.numel() > 1 << 20 or t.dim() == 0:
        return None
    x = t.double()
    for d in range(t.dim() - 1, -1, -1):
        n = t.shape[d]
        if n < 3:
            continue
        diff = x.diff(dim=d)
        step = diff.narrow(d, n - 2, 1)
        keep = max(2, (n - 1) // 4)
        tail = diff.narrow(d, n - 1 - keep, keep)
        if not torch.isfinite(diff).all() or not (step != 0).any() or (step < 0).any():
            continue
        if float((tail - step).abs().max()) <= 1e-4 * max(float(x.abs().max()), 1.0):
            return d, step
    return None


def _positions(a: _Args, rng: random.Random) -> list[Variant]:
    out = []
    for target in LONG_CONTEXT:
        def advance(name: str, t: torch.Tensor, target: int = target) -> torch.Tensor | None:
            if name in _INDEX_ARGS or t.dtype == torch.bool or t.numel() == 0:
                return None
            if not t.is_floating_point():
                if t.dtype not in (torch.int64, torch.int32) or int(t.min()) < 0 or int(t.max()) >= 1 << 16:
                    return None
                if _progression(t) is None:
                    return None
                return _like(t + (target - 1 - int(t.max())), t)
            got = _progression(t)
            if got is None:
                return None
            dim, step = got
            moved = (t.double() + (target - t.shape[dim]) * step).to(t.dtype)
            return _like(moved, t) if _fits(moved) else None

        changes = a.map(advance)
        if changes:
            out.append(Variant(f"positions:{target // 1024}k", f"positions advanced to {target // 1024}k (long "
                               f"context): {', '.join(sorted(changes))}", a.with_(changes)))
    return out


def _integers(a: _Args, rng: random.Random) -> list[Variant]:
    ints = [(n, i, t) for n, i, t in a.tensors() if n not in _INDEX_ARGS and t.dtype in (torch.int64, torch.int32)
            and t.numel() > 0]
    if not ints:
        return []
    out = []
    # integer values in value positions (`x + 1` reaches add.Tensor with other=1), not sizes, dims or alpha
    scalars = {n: v for n, v in a.values.items() if n != "alpha" and type(v) is int
               and str(a.schema[n].type) in ("number", "Scalar", "Tensor")}
    big = 2**31

    def shift64(name: str, t: torch.Tensor) -> torch.Tensor | None:
        if name in _INDEX_ARGS or t.dtype != torch.int64 or t.numel() == 0:
            return None
        return _like(t + big, t)

    changes = a.map(shift64) or {}
    if scalars:
        changes.update({n: v + big if v >= 0 else v - big for n, v in scalars.items()})
    if changes:
        out.append(Variant("int:+2^31", f"int64 values and integer scalars moved past 2^31: "
                                        f"{', '.join(sorted(changes))}", a.with_(changes)))

    def near_max(name: str, t: torch.Tensor) -> torch.Tensor | None:
        if name in _INDEX_ARGS or t.dtype != torch.int64 or t.numel() == 0:
            return None
        return _like(t + (big - 1 - int(t.max())), t)

    changes = a.map(near_max)
    if changes:
        out.append(Variant("int:near-int32-max", f"int64 values moved up to end at 2^31-1: "
                                                 f"{', '.join(sorted(changes))}", a.with_(changes)))
    if scalars:
        out.append(Variant("int:scalar-2^32+", "integer scalars moved past 2^32 with the low word's top bit set: "
                           + ", ".join(sorted(scalars)),
                           a.with_({n: v + 3 * big for n, v in scalars.items()})))
    return out


# --- masks, layouts, causal attention -----------------------------------------------------------------------

def _masks(a: _Args, rng: random.Random) -> list[Variant]:
    out = []
    main = a.main()
    if a.kind in _SDPA:
        mask = a.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
            row = rng.randrange(mask.shape[-2])
            fills = [(False, "all keys masked (False)")] if mask.dtype == torch.bool else \
                [(-math.inf, "all keys -inf"), (torch.finfo(mask.dtype).min, "all keys finfo.min")]
            for value, say in fills:
                m = mask.contiguous().clone()
                m[..., row, :] = value
                out.append(Variant(f"mask:row-{'min' if value not in (False, -math.inf) else 'inf'}",
                                   f"attention mask query row {row} fully masked: {say}",
                                   a.with_({"attn_mask": _like(m, mask)})))
        return out
    if a.kind in _SOFTMAX and main is not None and _floats(main[1]) and main[1].dim() >= 1:
        name, x = main
        d = _row_dim(a, x)
        flat = _rows(x, d)
        row = rng.randrange(flat.shape[0])
        for value, tag in ((torch.finfo(x.dtype).min, "finfo.min"), (-math.inf, "-inf")):
            f = flat.clone()
            f[row] = value
            out.append(Variant(f"mask:row-{tag}", f"row {row} along dim {d} fully masked ({tag})",
                               a.with_({name: _unrows(f, x, d)})))
        return out

    def set_rows(name: str, t: torch.Tensor) -> torch.Tensor | None:
        if t.dtype != torch.bool or t.dim() < 2 or t.numel() < 2:
            return None
        flat = _rows(t, t.dim() - 1)
        flat[0], flat[-1] = True, False
        return _unrows(flat, t, t.dim() - 1)

    changes = a.map(set_rows)
    if changes:
        out.append(Variant("mask:rows-set-clear", f"boolean masks with the first row all True and the last all "
                                                  f"False: {', '.join(sorted(changes))}", a.with_(changes)))
    return out


def _layouts(a: _Args, rng: random.Random) -> list[Variant]:
    def transposed(name: str, t: torch.Tensor) -> torch.Tensor | None:
        if t.dim() < 2 or t.shape[-1] < 2 or t.shape[-2] < 2:
            return None
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def strided(name: str, t: torch.Tensor) -> torch.Tensor | None:
        if t.dim() == 0 or t.numel() < 2:
            return None
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]

    def offset(name: str, t: torch.Tensor) -> torch.Tensor | None:
        if t.numel() < 1:
            return None
        storage = torch.zeros(t.numel() + 5, dtype=t.dtype)
        view = storage[5:].view(t.shape)
        view.copy_(t)
        return view

    out = []
    for tag, fn, say in (("transposed", transposed, "transposed-contiguous (last two dims' strides swapped)"),
                         ("strided", strided, "strided (every other element of a wider buffer)"),
                         ("offset", offset, "at storage offset 5")):
        changes = a.map(fn)
        if changes:
            out.append(Variant(f"layout:{tag}", f"the same values, inputs {say}: {', '.join(sorted(changes))}",
                               a.with_(changes), layout_only=True))
    return out


def _causal(a: _Args, rng: random.Random) -> list[Variant]:
    if a.kind != "aten._scaled_dot_product_flash_attention_for_cpu":
        return []
    q, k = a.get("query"), a.get("key")
    big_l, big_s = q.shape[2], k.shape[2]
    if big_s < 2:
        return []
    q2 = q if big_l < big_s else q.narrow(2, big_l - (big_l + 1) // 2, (big_l + 1) // 2)
    if q2.shape[2] >= big_s:
        return []
    how = (f"query cut to its last {q2.shape[2]} of {big_l} rows, " if q2 is not q else "") \
        + f"is_causal=True, no mask (L={q2.shape[2]} < S={big_s})"
    return [Variant(f"causal:L{q2.shape[2]}<S{big_s}", how,
                    a.with_({"query": _like(q2, q), "is_causal": True, "attn_mask": None}))]


def _from_the_end(a: _Args, rng: random.Random) -> list[Variant]:
    """Advanced indexing with the same indices counted from the end (`i - size`), which these ops accept."""
    if a.kind not in ("aten.index", "aten.index_put", "aten.index_put_"):
        return []
    x, indices = a.get("self"), a.get("indices")
    if not isinstance(indices, (list, tuple)):
        return []
    moved = [t - x.shape[d] if isinstance(t, torch.Tensor) and t.dtype in (torch.int64, torch.int32)
             and t.numel() and int(t.min()) >= 0 else t for d, t in enumerate(indices)]
    if all(m is t for m, t in zip(moved, indices)):
        return []
    return [Variant("index:from-the-end", "the same indices counted from the end (i - size)",
                    a.with_({"indices": type(indices)(moved)}))]

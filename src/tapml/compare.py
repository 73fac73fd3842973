"""Verdicts: judge a backend's outputs against the recorded reference with dtype-aware rules.

Floating outputs use the fp64-oracle rule (DESIGN.md): pass when e_tgt ≤ k·e_ref + atol(dtype), errors being
RMSE against a float64 run of the same op. Integers/bools are exact; index outputs of ops with ties compare the
values they select; topk with sorted=False compares per row what is determined (the values as a multiset, the
values its indices select, and that the two agree); NaN/Inf positions must match; ops that return uninitialized
memory (empty*) are judged by shape and dtype only. Metrics are reported either way; the rule decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.ops import op_kind

# Scale of the absolute floor, relative to the oracle's RMS: a few ulps of the output dtype.
_ATOL_ULPS = 8.0
_EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# Elementwise closeness used only to count mismatching elements (a metric, not the rule).
_ELEM_TOL = {torch.float64: (1e-7, 1e-7), torch.float32: (1e-5, 1.3e-6), torch.float16: (1e-3, 1e-5),
             torch.bfloat16: (1.6e-2, 1e-5)}
_TINY = 16  # tensors with fewer elements get the larger multiplier

# Ops whose index outputs are unspecified under ties: compare the values the indices select.
# op kind -> (index of the indices output or None when the whole output is indices, dim argument position)
_TIE_OPS = {
    "aten.argmax": (None, 1), "aten.argmin": (None, 1),
    "aten.max.dim": (1, 1), "aten.min.dim": (1, 1),
    "aten.topk": (1, 2), "aten.sort": (1, 1), "aten.sort.stable": (1, 2),
}


@dataclass
class Verdict:
    passed: bool
    rule: str
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rule": self.rule, "metrics": self.metrics, "reason": self.reason}


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float(torch.sqrt(torch.mean((a - b) ** 2)))


def compare_tensor(out: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor | None,
                   random: bool = False) -> Verdict:
    """Judge one output tensor. `oracle` is the float64 result (None when it could not be computed)."""
    if not isinstance(out, torch.Tensor):
        return Verdict(False, "type", reason=f"expected a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(ref.shape):
        return Verdict(False, "shape", reason=f"shape {list(out.shape)} != reference {list(ref.shape)}")
    if out.dtype != ref.dtype:
        return Verdict(False, "dtype", reason=f"dtype {out.dtype} != reference {ref.dtype}")
    out = out.detach().cpu()
    if not (ref.is_floating_point() or ref.is_complex()):
        bad = int((out != ref).sum()) if ref.numel() else 0
        return Verdict(bad == 0, "exact", {"mismatched": bad, "numel": ref.numel()},
                       "" if bad == 0 else f"{bad} of {ref.numel()} elements differ")
    if ref.is_complex():
        out, ref = torch.view_as_real(out), torch.view_as_real(ref)
        oracle = torch.view_as_real(oracle) if oracle is not None and oracle.is_complex() else None
    o64, r64 = out.double(), ref.double()
    # NaN / Inf must sit in the same places (with the same sign for Inf).
    nan_o, nan_r = torch.isnan(o64), torch.isnan(r64)
    inf_o, inf_r = torch.isinf(o64), torch.isinf(r64)
    if not torch.equal(nan_o, nan_r) or not torch.equal(inf_o, inf_r) or not torch.equal(o64[inf_o], r64[inf_r]):
        n = int((nan_o != nan_r).sum() + (inf_o != inf_r).sum())
        return Verdict(False, "nonfinite", {"nonfinite_mismatched": n},
                       f"NaN/Inf positions differ from the reference in {n} elements")
    finite = ~(nan_r | inf_r)
    o, r = o64[finite], r64[finite]
    diff = (o - r).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    denom = r.abs().clamp_min(torch.finfo(ref.dtype).tiny)
    max_rel = float((diff / denom).max()) if diff.numel() else 0.0
    atol_e, rtol_e = _ELEM_TOL.get(ref.dtype, (1e-5, 1.3e-6))
    mismatched = int((diff > atol_e + rtol_e * r.abs()).sum())
    cos = float(torch.nn.functional.cosine_similarity(o.flatten(), r.flatten(), dim=0, eps=1e-30)) \
        if o.numel() else 1.0
    metrics = {"max_abs": max_abs, "max_rel": max_rel, "cosine": cos, "mismatched": mismatched,
               "numel": ref.numel()}
    if random:
        # Seeded random ops replay the recorded generator stream: the draw must match the reference.
        ok = mismatched == 0
        return Verdict(ok, "seeded-replay", metrics, "" if ok else f"{mismatched} elements differ from the draw")
    half = ref.dtype in (torch.float16, torch.bfloat16)
    k = 3.0 if half or ref.numel() < _TINY else 2.0
    eps = _EPS.get(ref.dtype, 2.0**-23)
    if oracle is None or tuple(oracle.shape) != tuple(ref.shape):
        # No float64 oracle: fall back to elementwise closeness with the dtype's default tolerances.
        ok = mismatched == 0
        return Verdict(ok, "allclose", metrics,
                       "" if ok else f"{mismatched} of {ref.numel()} elements outside atol={atol_e}, rtol={rtol_e}")
    g = oracle.detach().cpu().double()[finite]
    e_ref, e_tgt = _rmse(r, g), _rmse(o, g)
    scale = math.sqrt(float(torch.mean(g * g))) if g.numel() else 0.0
    atol = _ATOL_ULPS * eps * max(scale, torch.finfo(ref.dtype).tiny)
    bound = k * e_ref + atol
    metrics.update({"e_ref": e_ref, "e_tgt": e_tgt, "bound": bound, "k": k})
    ok = e_tgt <= bound
    return Verdict(ok, f"fp64-oracle(k={k:g})", metrics,
                   "" if ok else f"RMSE vs fp64 oracle {e_tgt:.3g} > {k:g}·{e_ref:.3g} + {atol:.3g}")


def _tie_values(op: str, args: tuple, out: Any, which: int | None, dim_pos: int) -> torch.Tensor | None:
    """Values of the input selected by the index output (what is determined under ties)."""
    x = args[0]
    idx = out if which is None else out[which]
    dim = args[dim_pos] if len(args) > dim_pos and isinstance(args[dim_pos], int) else None
    if dim is None:
        if op.startswith(("aten.argmax", "aten.argmin")):
            return x.reshape(-1)[idx.reshape(-1)].reshape(idx.shape)
        dim = -1
    if op.startswith(("aten.argmax", "aten.argmin", "aten.max", "aten.min")) and idx.dim() < x.dim():
        return x.gather(dim, idx.unsqueeze(dim)).squeeze(dim)
    return x.gather(dim, idx)


def _topk_unsorted(op: str, args: tuple, kwargs: dict | None) -> bool:
    """topk(..., sorted=False): the order of its k results is unspecified (CPU torch keeps a heap's order)."""
    if op_kind(op) != "aten.topk":
        return False
    flag = args[4] if len(args) > 4 else (kwargs or {}).get("sorted", True)
    return flag is False


def _row_sorted(t: Any, dim: int) -> Any:
    """t sorted along `dim` (NaN last), or t itself when it is not a tensor of at least one dim."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return torch.sort(t, dim=dim, stable=True).values


def _judge_topk_unsorted(args: tuple, kwargs: dict | None, out: Any, ref: Any, oracle: Any) -> Verdict:
    """Per row: the k values as a multiset (sorted, then the float rule), the input values the indices select
    as a multiset (exact), and the values output equal to what the indices select, position by position."""
    x = args[0]
    dim = args[2] if len(args) > 2 else (kwargs or {}).get("dim", -1)

    def select(i: torch.Tensor) -> torch.Tensor:
        return x.gather(dim, i) if x.dim() else x.reshape(i.shape)

    try:
        vals, idx = out
        picked, want = select(idx), select(ref[1])
    except (IndexError, RuntimeError, TypeError, ValueError) as e:
        return Verdict(False, "topk-unsorted:multiset", reason=f"indices do not select from the input: {e}")
    agree = compare_tensor(vals, picked.to(vals.dtype) if isinstance(vals, torch.Tensor) else picked, None)
    if not agree.passed:
        return Verdict(False, "topk-unsorted:multiset", agree.metrics,
                       f"output 0: the values are not the input elements the indices select ({agree.reason})")
    d = dim % x.dim() if x.dim() else 0
    o = oracle[0] if isinstance(oracle, (tuple, list)) and isinstance(oracle[0], torch.Tensor) else None
    v = compare_tensor(_row_sorted(vals, d), _row_sorted(ref[0], d), _row_sorted(o, d))
    if not v.passed:
        return Verdict(False, f"topk-unsorted:multiset+{v.rule}", v.metrics, f"output 0: {v.reason}")
    w = compare_tensor(_row_sorted(picked, d), _row_sorted(want, d), None)
    if not w.passed:
        return Verdict(False, "topk-unsorted:multiset", w.metrics,
                       f"output 1: the indices select other elements than the reference's ({w.reason})")
    return Verdict(True, f"topk-unsorted:multiset+{v.rule}", v.metrics)


# Ops whose output values are uninitialized memory: only shape, dtype (and strides) are specified.
_UNINITIALIZED = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
                  "aten.new_empty_strided", "aten.empty_permuted"}


def _judge_uninitialized(out: Any, ref: Any) -> Verdict:
    for o, r in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)):
        if not isinstance(o, torch.Tensor) or (tuple(o.shape), o.dtype) != (tuple(r.shape), r.dtype):
            got = f"{list(o.shape)} {o.dtype}" if isinstance(o, torch.Tensor) else type(o).__name__
            return Verdict(False, "uninitialized:shape-dtype",
                           reason=f"got {got}, reference {list(r.shape)} {r.dtype}")
    return Verdict(True, "uninitialized:shape-dtype")


def judge(op: str, args: tuple, out: Any, ref: Any, oracle: Any, random: bool = False,
          kwargs: dict | None = None) -> Verdict:
    """Judge an op's whole output pytree; the verdict fails on the first failing leaf and names it."""
    kind = op_kind(op)
    if kind in _UNINITIALIZED:
        return _judge_uninitialized(out, ref)
    if _topk_unsorted(op, args, kwargs):
        return _judge_topk_unsorted(args, kwargs, out, ref, oracle)
    tie = _TIE_OPS.get(op.removesuffix(".default"), _TIE_OPS.get(kind))
    if tie is not None:
        which, dim_pos = tie
        try:
            got = _tie_values(op, args, out, which, dim_pos)
            want = _tie_values(op, args, ref, which, dim_pos)
        except (IndexError, RuntimeError) as e:
            return Verdict(False, "ties:selected-values", reason=f"indices do not select from the input: {e}")
        if which is None:
            v = compare_tensor(got, want, None)
            v.rule = "ties:selected-values"
            return v
        # values output by the float rule, indices by what they select
        out = list(out)
        ref = list(ref)
        out[which], ref[which] = got, want
        if isinstance(oracle, (tuple, list)):
            oracle = list(oracle)
            oracle[which] = None
    out_leaves = pytree.tree_leaves(out)
    ref_leaves = pytree.tree_leaves(ref)
    if len(out_leaves) != len(ref_leaves):
        return Verdict(False, "structure", reason=f"{len(out_leaves)} outputs, reference has {len(ref_leaves)}")
    or_leaves = pytree.tree_leaves(oracle) if oracle is not None else [None] * len(ref_leaves)
    if len(or_leaves) != len(ref_leaves):
        or_leaves = [None] * len(ref_leaves)
    rules, metrics = [], {}
    for i, (o, r, g) in enumerate(zip(out_leaves, ref_leaves, or_leaves)):
        if isinstance(r, torch.Tensor):
            v = compare_tensor(o, r, g if isinstance(g, torch.Tensor) else None, random)
        else:
            v = _compare_scalar(o, r, g)
        rules.append(v.rule)
        metrics = v.metrics if i == 0 else {**metrics, **{f"out{i}.{k}": x for k, x in v.metrics.items()}}
        if not v.passed:
            v.reason = (f"output {i}: " if len(ref_leaves) > 1 else "") + v.reason
            v.metrics = metrics
            if tie is not None and v.rule in ("exact", "allclose") and i == (tie[0] or 0):
                v.rule = "ties:selected-values"
            return v
    rule = rules[0] if len(set(rules)) == 1 else "+".join(dict.fromkeys(rules))
    if tie is not None:
        rule = f"ties:selected-values+{rule}"
    return Verdict(True, rule or "empty", metrics)


def _compare_scalar(o: Any, r: Any, g: Any) -> Verdict:
    if isinstance(r, float) and isinstance(o, (float, int)):
        if math.isnan(r):
            return Verdict(math.isnan(o), "scalar", {"value": o, "ref": r})
        tol = 4 * 2.0**-23 * max(abs(r), 1.0)
        if isinstance(g, float):
            tol = max(tol, 2 * abs(r - g))
        ok = abs(o - r) <= tol
        return Verdict(ok, "scalar", {"value": o, "ref": r}, "" if ok else f"{o} != {r}")
    ok = o == r
    return Verdict(ok, "exact-scalar", {"value": repr(o), "ref": repr(r)}, "" if ok else f"{o!r} != {r!r}")


def rel_rmse(a: Any, b: Any) -> float | None:
    """RMS of (a - b) over RMS of b across the tensors of two pytrees (non-finite mismatches count 1 each);
    None when they hold no comparable tensors. The local and accumulated error of a migrated op."""
    la = [x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    lb = [x for x in pytree.tree_leaves(b) if isinstance(x, torch.Tensor)]
    if not la or len(la) != len(lb):
        return None
    num = den = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return float("inf")
        x, y = x.detach().double(), y.detach().double()
        finite = torch.isfinite(y) & torch.isfinite(x)
        num += float(((x - y)[finite] ** 2).sum()) + float((torch.isfinite(x) != torch.isfinite(y)).sum())
        den += float((y[finite] ** 2).sum())
    return (num / max(den, 1e-30)) ** 0.5 if den > 0 else num ** 0.5


def rel_max(a: Any, b: Any) -> float:
    """max |a - b| over max |a| across the tensors of two pytrees: inf when their structure, finiteness or an
    integer tensor differs. The end-to-end error of a run against the reference."""
    la = [x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    lb = [x for x in pytree.tree_leaves(b) if isinstance(x, torch.Tensor)]
    if len(la) != len(lb):
        return math.inf
    worst = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return math.inf
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else math.inf)
            continue
        x, y = x.double(), y.double()
        if not torch.equal(torch.isfinite(x), torch.isfinite(y)):
            return math.inf
        m = torch.isfinite(x)
        if m.any():
            worst = max(worst, float((x[m] - y[m]).abs().max()) / max(float(x[m].abs().max()), 1e-12))
    return worst

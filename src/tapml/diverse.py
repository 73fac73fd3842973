"""Diverse samples (`carve --samples K`, K > 1): a small summary of each call's inputs, taken when the call is seen,
and the choice of which calls of a signature to keep: the first one, then the K-1 that differ most.

It decides, from summaries only; it must not capture tensors, hold blobs or touch a store (the Recorder does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

# A count that is zero and one that is not are far apart (a NaN, a masked row present or not); beyond that, its
# size counts on a log scale, as magnitudes do.
_PRESENT = 3.0


# dtypes whose reductions torch's CPU kernels all have; others (float8, uint16/32/64) are widened first
_NATIVE_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_NATIVE_INTS = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


def _count(c: int) -> float:
    return 0.0 if c <= 0 else _PRESENT + math.log2(c)


def _magnitude(v: float) -> float:
    return math.log2(1.0 + v) if math.isfinite(v) else 1024.0


@dataclass
class Summary:
    """One call's inputs as a point (`vector`, one fixed-length block per tensor argument, so that the calls of a
    signature compare), the name of each coordinate, and totals a person reads (`stats`)."""

    vector: tuple[float, ...]
    names: tuple[str, ...]
    stats: dict[str, Any]


def summarize(tensors: list[torch.Tensor], skip: set[int]) -> Summary:
    """The summary of a call's tensor arguments. Per floating tensor: the largest |value| (masks' fill values and
    non-finite ones aside), NaNs, ±Infs and fully masked rows (every value of the last dim -inf or at most half
    of finfo.min, as attention masks hold them); per integer tensor: the largest |value| (positions: how long the
    context is); per bool tensor: rows with no True (a boolean mask's fully masked rows). Tensors whose storage is
    in `skip` (parameters: the same values every call) contribute zeros."""
    vec: list[float] = []
    names: list[str] = []
    stats: dict[str, Any] = {"absmax": None, "nan": 0, "inf": 0, "masked": 0, "intmax": None}
    for i, t in enumerate(tensors):
        fixed = t.numel() == 0 or t.untyped_storage().data_ptr() in skip
        x = t.detach()
        if x.is_floating_point():
            names += [f"input {i} |max|", f"input {i} NaN", f"input {i} Inf", f"input {i} masked rows"]
            if fixed:
                vec += [0.0] * 4
                continue
            low = torch.finfo(x.dtype).min / 2  # a mask's fill value (finfo.min), or -inf
            absmax, nan, inf, masked = _float_stats(x if x.dtype in _NATIVE_FLOATS else x.float(), low)
            vec += [_magnitude(absmax), _count(nan), _count(inf), _count(masked)]
            stats["absmax"] = absmax if stats["absmax"] is None else max(stats["absmax"], absmax)
            stats["nan"] += nan
            stats["inf"] += inf
            stats["masked"] += masked
        elif x.dtype == torch.bool:
            names.append(f"input {i} masked rows")
            masked = 0 if fixed or x.dim() == 0 else int((~x).all(-1).sum())
            vec.append(_count(masked))
            stats["masked"] += masked
        elif not x.is_complex():
            names.append(f"input {i} int max")
            if fixed:
                vec.append(0.0)
                continue
            flat = x.reshape(-1)
            lo, hi = torch.aminmax(flat if x.dtype in _NATIVE_INTS else flat.double())  # uint16/32/64 lack it
            top = max(abs(int(lo)), abs(int(hi)))
            vec.append(_magnitude(float(top)))
            stats["intmax"] = top if stats["intmax"] is None else max(stats["intmax"], top)
    return Summary(tuple(vec), tuple(names), stats)


def _float_stats(x: torch.Tensor, low: float) -> tuple[float, int, int, int]:
    """Largest |value| among the finite, unmasked ones; NaNs; ±Infs; fully masked rows."""
    finite = torch.isfinite(x)
    bad = x.numel() - int(finite.sum())
    nan = int(torch.isnan(x).sum()) if bad else 0
    masking = x <= low
    magnitude = x.abs().masked_fill(masking | ~finite, 0)
    absmax = float(magnitude.amax())
    masked = int(masking.all(-1).sum()) if x.dim() and x.shape[-1] else 0
    return absmax, nan, bad - nan, masked


def _distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


@dataclass
class Kept:
    """A call held for a signature until the run ends: its summary and what the Recorder needs to commit it."""

    index: int
    summary: Summary
    sample: Any = None  # the PendingSample, once captured
    blobs: list[str] = field(default_factory=list)  # hashes of the blobs held for it alone


class Pool:
    """The calls kept for one signature beyond its first: `slots` of them, the most distinct seen so far.

    Distinctness is max-min: when a call comes and the slots are full, whichever of the kept calls and the newcomer
    lies nearest to another point (the first call included, which is never replaced) is let go; on a tie, the
    later call. A signature whose calls all summarize alike (only parameters, say) stops asking once full."""

    def __init__(self, slots: int, anchors: list[Summary]):
        self.slots, self.anchors = slots, anchors
        self.kept: list[Kept] = []

    @property
    def settled(self) -> bool:
        """Nothing can change any more: full, and every summary is empty."""
        return len(self.kept) >= self.slots and not any(k.summary.vector for k in self.kept)

    def offer(self, index: int, summary: Summary) -> tuple[int, Kept | None] | None:
        """Where the call `index` would go: (position in `kept`, the call it replaces or None), or None when it is
        not more distinct than what is kept."""
        if len(self.kept) < self.slots:
            return len(self.kept), None
        points = [k.summary.vector for k in self.kept] + [summary.vector]
        fixed = [a.vector for a in self.anchors]

        def nearest(i: int) -> float:
            others = [p for j, p in enumerate(points) if j != i] + fixed
            return min((_distance(points[i], p) for p in others), default=math.inf)

        worst = min(range(len(points)), key=lambda i: (nearest(i), -i))
        if worst == len(points) - 1:
            return None
        return worst, self.kept[worst]

    def why(self, kept: Kept) -> dict[str, Any]:
        """What a kept call is, for `tapml show`: its totals and the coordinate that sets it furthest apart from
        the nearest other kept point (the first call included); `by` is `order` when nothing sets it apart (no
        call of the signature summarized differently)."""
        others = [k.summary for k in self.kept if k is not kept] + self.anchors
        v = kept.summary.vector
        feature = None
        if others and v:
            near = min(others, key=lambda o: _distance(v, o.vector))
            deltas = [abs(x - y) for x, y in zip(v, near.vector)]
            if deltas and max(deltas) > 0:
                feature = kept.summary.names[deltas.index(max(deltas))]
        out = {"by": "distinct" if feature is not None else "order", **kept.summary.stats}
        if feature is not None:
            out["feature"] = feature
        return {k: v for k, v in out.items() if v is not None}


def describe(chosen: dict[str, Any] | None) -> str:
    """One line on how a sample was chosen (None: a store written before diverse samples; samples in call order)."""
    if not chosen:
        return "in call order"
    if chosen.get("by") == "first":
        return "first call"
    parts = [f"|max| {chosen['absmax']:.3g}"] if chosen.get("absmax") is not None else []
    for key, label in (("nan", "NaN"), ("inf", "Inf"), ("masked", "masked rows")):
        if chosen.get(key):
            parts.append(f"{chosen[key]} {label}")
    if chosen.get("intmax") is not None:
        parts.append(f"int max {chosen['intmax']}")
    head = f"most distinct by {chosen['feature']}" if chosen.get("feature") else "in call order (none differed)"
    return f"{head} ({', '.join(parts)})" if parts else head

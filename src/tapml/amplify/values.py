"""Variants that change values: extremes moved and tied, shifts and scales, overflow edges, long-context
positions, integer boundaries, fully masked rows, indices counted from the end. It must not run ops."""

from __future__ import annotations

import math
import random

import torch

from tapml.amplify.base import (
    _CANCEL,
    _INDEX_ARGS,
    _MATH,
    _NORM,
    _ROW,
    _SDPA,
    _SOFTMAX,
    LONG_CONTEXT,
    SCALE_DOWN,
    SCALE_UP,
    SHIFT,
    Variant,
    _Args,
    _fits,
    _floats,
    _like,
    _peak,
    _rms,
    _row_dim,
    _rows,
    _unrows,
)

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


# Exp-like ops and the log of the largest value they return finite: at the edge a kernel's overflow test and its
# range reduction meet.
_OVERFLOW = {"aten.exp": math.log, "aten.expm1": math.log, "aten.exp2": math.log2}
EDGE = 2.0**-10  # how far under the edge the largest input lands, relative


def _edges(a: _Args, rng: random.Random) -> list[Variant]:
    """An exp-like op's real inputs shifted so the largest sits just under its overflow edge (88.6 for float32
    exp: the output still finite, within a thousandth of the dtype's largest value), as unnormalized logits and
    growth rates reach it; the spread of the real values is kept."""
    edge_of = _OVERFLOW.get(a.kind)
    main = a.main()
    if edge_of is None or main is None or not _floats(main[1]):
        return []
    name, x = main
    finite = x[torch.isfinite(x)]
    if not finite.numel():
        return []
    edge = edge_of(torch.finfo(x.dtype).max)
    target = edge * (1 - EDGE)
    moved = x.double() + (target - float(finite.max()))
    moved = torch.where(torch.isfinite(x), moved, x.double()).to(x.dtype)
    if not bool(torch.isfinite(moved[torch.isfinite(x)]).all()):
        return []
    return [Variant("edge:overflow", f"values shifted so the largest is {target:.4g}, just under "
                    f"{a.kind.removeprefix('aten.')}'s overflow edge {edge:.4g} for {str(x.dtype).removeprefix('torch.')}",
                    a.with_({name: _like(moved, x)}))]

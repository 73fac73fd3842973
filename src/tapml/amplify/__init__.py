"""Amplified cases: realistic variants of one carved sample — lengths cut around tile and workgroup sizes, extremes
moved to the ends and tied, values shifted and scaled, exp-like inputs at their overflow edge, scans over a long
context, long-context positions, integer boundaries, fully masked rows, the same values in other layouts, causal
attention with L ≠ S, indices counted from the end. The kinds live in `shapes.py` and `values.py`, what they
share in `base.py`.

Each variant is a call of the same op, built from the real sample and the op's schema, with a name and a line
saying how it was made. It must not run ops or judge: replay computes each variant's reference (dropping the
variants the reference refuses) and judges it by the same fp64 rule as the real case.
"""

from __future__ import annotations

import random

from tapml.amplify.base import DEFAULT_LIMIT, ELEMENT_BUDGET, MIN_VARIANTS, Variant, _Args
from tapml.amplify.shapes import _causal, _cuts, _layouts, _long_rows
from tapml.amplify.values import _edges, _extremes, _from_the_end, _integers, _masks, _positions, _shifts
from tapml.ops import OpCall, is_seeded_random


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
    for kind in (_cuts, _extremes, _shifts, _edges, _long_rows, _positions, _integers, _masks, _layouts,
                 _causal, _from_the_end):
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



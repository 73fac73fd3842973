"""Variants that change shapes and layouts: lengths cut around tile sizes, rows made long, the same values in
other layouts, causal attention with L < S. It must not run ops."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tapml.amplify.base import (
    _INDEX_ARGS,
    _MATMUL,
    _NORM,
    _ROW,
    _SCANS,
    _SDPA,
    _SOFTMAX,
    ELEMENT_BUDGET,
    LONG_SCAN,
    TILES,
    Variant,
    _Args,
    _like,
    _row_dim,
)

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




def _long_rows(a: _Args, rng: random.Random) -> list[Variant]:
    """A scan (cumsum, cumprod, cummax, cummin) over a long context: the real values repeated along the scanned dim
    to LONG_SCAN, as a long prompt's running sums (position ids, a state-space model's decay) walk thousands of
    steps where the carved prompt walked tens. Long sums are where a kernel's accumulation order shows."""
    if a.kind not in ("aten.cumsum", "aten.cumprod", "aten.cummax", "aten.cummin"):
        return []
    main = a.main()
    if main is None or main[1].dim() == 0 or main[1].numel() == 0:
        return []
    name, x = main
    d = _row_dim(a, x)
    n = x.shape[d]
    if n >= LONG_SCAN or x.numel() // n * LONG_SCAN > ELEMENT_BUDGET:
        return []
    reps = [1] * x.dim()
    reps[d] = -(-LONG_SCAN // n)
    long = x.repeat(*reps).narrow(d, 0, LONG_SCAN)
    return [Variant(f"long:dim-{d}={LONG_SCAN}", f"the real values along dim {d} repeated from {n} to {LONG_SCAN} "
                    "(a long context's running sum)", a.with_({name: _like(long, x)}))]

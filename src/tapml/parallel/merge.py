"""The exact merge of partial attention results: outputs over disjoint key shards and their log-sum-exps (LSE,
natural log) combine into the attention over all keys, locally or over a torch.distributed group.

It must not lose exactness for empty shards (LSE = −inf, output 0: no NaN) or uneven ones, and must work for any
number of shards; it never moves keys or values, only (out, LSE) pairs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

FORMS = ("all-gather", "tree")
_SILENT = contextvars.ContextVar("tapml_no_communication", default=False)


def communicating() -> bool:
    """False inside `no_communication()`: collectives are skipped (results are then wrong)."""
    return not _SILENT.get()


@contextlib.contextmanager
def no_communication() -> Iterator[None]:
    """Skip every collective of the plans (merges, all-reduces, all-gathers) while the compute stays the same:
    a step timed here, beside a normal one, gives the communication's share of the step. Never for results."""
    token = _SILENT.set(True)
    try:
        yield
    finally:
        _SILENT.reset(token)


def _acc_dtype(out: torch.Tensor, lse: torch.Tensor) -> torch.dtype:
    # fp64 stays fp64 (the oracle's precision); anything else accumulates in fp32, as the LSE is fp32.
    return torch.float64 if torch.float64 in (out.dtype, lse.dtype) else torch.float32


def _weights(lse: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(lse - max), max) with max taken over `dim`; a max of −inf (every shard empty) is read as 0 so
    that exp(−inf − 0) = 0 instead of exp(−inf + inf) = NaN."""
    top = lse.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    return torch.exp(lse - top), top


def merge_stacked(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge shard results stacked on dim 0: outs [N, ..., D], lses [N, ...] → (out [..., D], lse [...]).

    out = Σ_i exp(lse_i − L)·out_i with L = logsumexp_i(lse_i); where every shard is empty, out = 0, L = −inf."""
    acc = _acc_dtype(outs, lses)
    lse = lses.to(acc)
    w, top = _weights(lse, 0)
    total = w.sum(0)
    num = (w.unsqueeze(-1) * outs.to(acc)).sum(0)
    out = num / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    merged = torch.where(total > 0, top.squeeze(0) + torch.log(total), torch.full_like(total, -torch.inf))
    return out.to(outs.dtype), merged


def merge(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a list of shard results (out [..., D], lse [...]) computed over disjoint key sets."""
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge takes as many outputs as LSEs, at least one (got {len(outs)} and {len(lses)})")
    if len(outs) == 1:
        return outs[0], lses[0]
    return merge_stacked(torch.stack(list(outs)), torch.stack(list(lses)))


def merge_all_gather(out: torch.Tensor, lse: torch.Tensor,
                     group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (out, lse) gathered in one all-gather (packed as [out | lse] in fp32), merged locally.

    Every rank merges the same stack in the same order, so every rank ends with bitwise the same result."""
    n = dist.get_world_size(group)
    if n == 1:
        return out, lse
    acc = _acc_dtype(out, lse)
    packed = torch.cat([out.to(acc), lse.to(acc).unsqueeze(-1)], dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(n)]
    dist.all_gather(parts, packed, group=group)
    stacked = torch.stack(parts)
    o, lse_all = merge_stacked(stacked[..., :-1], stacked[..., -1])
    return o.to(out.dtype), lse_all.to(lse.dtype)


def merge_tree(out: torch.Tensor, lse: torch.Tensor,
               group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tree Attention's merge: an all-reduce of the max LSE, then one all-reduce of the sums [w·out | w] with
    w = exp(lse − max); the collective's own tree or ring does the reduction, so the volume is that of one
    output, whatever the number of ranks."""
    if dist.get_world_size(group) == 1:
        return out, lse
    acc = _acc_dtype(out, lse)
    top = lse.to(acc).clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    w = torch.exp(lse.to(acc) - top)
    sums = torch.cat([w.unsqueeze(-1) * out.to(acc), w.unsqueeze(-1)], dim=-1).contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    total = sums[..., -1]
    o = sums[..., :-1] / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    merged = torch.where(total > 0, top + torch.log(total), torch.full_like(total, -torch.inf))
    return o.to(out.dtype), merged.to(lse.dtype)


def merge_group(out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup | None,
                form: str = "tree") -> tuple[torch.Tensor, torch.Tensor]:
    """The collective merge by name (`all-gather` or `tree`); `group=None` with no process group is local."""
    if (group is None and not dist.is_initialized()) or not communicating():
        return out, lse
    if form == "tree":
        return merge_tree(out, lse, group)
    if form == "all-gather":
        return merge_all_gather(out, lse, group)
    raise ValueError(f"unknown merge form {form!r}; choose one of {', '.join(FORMS)}")


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


def _finite(top: torch.Tensor) -> torch.Tensor:
    """The max LSE with −inf (no key anywhere) read as 0, so exp(−inf − 0) = 0 instead of NaN."""
    return torch.nan_to_num(top, neginf=0.0)


def _finish(num: torch.Tensor, total: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out = num / total, LSE = top + log(total). The shard that holds the max contributes exp(0) = 1 exactly, so
    total is 0 (no key anywhere: out 0, LSE −inf) or ≥ 1, and max(total, 1) divides without a branch."""
    return num / total.clamp_min(1).unsqueeze(-1), top + torch.log(total)


def merge_stacked(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge shard results stacked on dim 0: outs [N, ..., D], lses [N, ...] → (out [..., D], lse [...]).

    out = Σ_i exp(lse_i − L)·out_i with L = logsumexp_i(lse_i); where every shard is empty, out = 0, L = −inf."""
    acc = _acc_dtype(outs, lses)
    lse = lses.to(acc)
    top = _finite(lse.amax(0))
    w = torch.exp(lse - top)
    out, merged = _finish((w.unsqueeze(-1) * outs.to(acc)).sum(0), w.sum(0), top)
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
    top = _finite(top)
    w = torch.exp(lse.to(acc) - top).unsqueeze(-1)
    sums = torch.cat([w * out.to(acc), w], dim=-1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    o, merged = _finish(sums[..., :-1], sums[..., -1], top)
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


"""Parallel plans over one model and its weights: `single` (one device), `tp` (attention heads and MLP columns
sharded, KV heads duplicated when the degree exceeds them), `cp` (weights replicated, KV cache sharded along the
sequence), `hybrid` (Helix-style: CP for attention, TP for the MLP and the LM head).

Each rank builds its model from the single model's per-parameter seeds, keeping only its slices, so every plan
holds exactly the single model's weights. It must not launch processes (torchrun does) nor pick devices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tapml.parallel import cache as kvcache
from tapml.parallel import merge as merging
from tapml.parallel.costmodel import check
from tapml.parallel.models import ModelShape, materialize, skeleton


class RowSharded(torch.nn.Linear):
    """A linear layer holding a slice of the input features; the partial products are summed over the group
    (the second half of a Megatron MLP or attention block)."""

    def __init__(self, in_features: int, out_features: int, group: dist.ProcessGroup | None) -> None:
        super().__init__(in_features, out_features, bias=False, device="meta")
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if merging.communicating():
            dist.all_reduce(y, group=self.group)
        return y


class ColumnGathered(torch.nn.Linear):
    """A linear layer holding a slice of the output features (a vocabulary slice of the LM head); the slices
    are gathered so every rank sees the whole output."""

    def __init__(self, in_features: int, out_features: int, group: dist.ProcessGroup | None) -> None:
        super().__init__(in_features, out_features, bias=False, device="meta")
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x).contiguous()
        n = dist.get_world_size(self.group)
        parts = [torch.empty_like(y) for _ in range(n)]
        if merging.communicating():
            dist.all_gather(parts, y, group=self.group)
        else:
            parts = [y] * n
        return torch.cat(parts, dim=-1)


@dataclass
class Plan:
    """A plan as one rank runs it: its model, and how to make the KV cache it decodes with."""

    name: str
    shape: ModelShape
    rank: int
    world: int
    model: torch.nn.Module
    make_cache: Callable[..., kvcache.ShardedKVCache]

    def describe(self) -> str:
        s = self.shape
        return {"single": "one device: all weights, the whole KV cache",
                "tp": f"tensor parallel ×{self.world}: {s.heads // self.world} query heads and "
                      f"{max(s.kv_heads // self.world, 1)} KV head(s) per rank"
                      f"{' (KV duplicated)' if self.world > s.kv_heads else ''}, MLP and LM head sharded",
                "cp": f"cache parallel ×{self.world}: weights replicated, the KV cache sharded along the sequence",
                "hybrid": f"hybrid ×{self.world}: attention cache-parallel (weights replicated, KV sharded), "
                          "MLP and LM head tensor-parallel"}[self.name]


def _rows(rank: int, per: int) -> slice:
    return slice(rank * per, (rank + 1) * per)


def _kv_heads_of(s: ModelShape, rank: int, world: int) -> slice:
    """The KV heads rank `rank` needs under tp: its own share, or the one head its query heads read (then it
    is duplicated on world/kv_heads ranks)."""
    if world <= s.kv_heads:
        return _rows(rank, s.kv_heads // world)
    head = (rank * (s.heads // world)) // (s.heads // s.kv_heads)
    return slice(head, head + 1)


def _swap(model: torch.nn.Module, path: str, module: torch.nn.Module, full_shape: tuple[int, int]) -> None:
    parent, _, attr = path.rpartition(".")
    module.weight._tapml_full_shape = torch.Size(full_shape)
    setattr(model.get_submodule(parent), attr, module)


def _shard_mlp(model: torch.nn.Module, s: ModelShape, rank: int, world: int,
               group: dist.ProcessGroup | None, slices: dict[str, tuple[int, slice]]) -> None:
    per = s.mlp // world
    for i in range(s.layers):
        p = f"model.layers.{i}.mlp"
        for proj in ("gate_proj", "up_proj"):
            _swap(model, f"{p}.{proj}", torch.nn.Linear(s.hidden, per, bias=False, device="meta"), (s.mlp, s.hidden))
            slices[f"{p}.{proj}.weight"] = (0, _rows(rank, per))
        _swap(model, f"{p}.down_proj", RowSharded(per, s.hidden, group), (s.hidden, s.mlp))
        slices[f"{p}.down_proj.weight"] = (1, _rows(rank, per))
    v = s.vocab // world
    _swap(model, "lm_head", ColumnGathered(s.hidden, v, group), (s.vocab, s.hidden))
    slices["lm_head.weight"] = (0, _rows(rank, v))


def _shard_attention(model: torch.nn.Module, s: ModelShape, rank: int, world: int,
                     group: dist.ProcessGroup | None, slices: dict[str, tuple[int, slice]]) -> None:
    hq = s.heads // world
    kv = _kv_heads_of(s, rank, world)
    d = s.head_dim
    for i in range(s.layers):
        p = f"model.layers.{i}.self_attn"
        attn = model.get_submodule(p)
        _swap(model, f"{p}.q_proj", torch.nn.Linear(s.hidden, hq * d, bias=False, device="meta"),
              (s.heads * d, s.hidden))
        slices[f"{p}.q_proj.weight"] = (0, slice(rank * hq * d, (rank + 1) * hq * d))
        for proj in ("k_proj", "v_proj"):
            n = kv.stop - kv.start
            _swap(model, f"{p}.{proj}", torch.nn.Linear(s.hidden, n * d, bias=False, device="meta"),
                  (s.kv_heads * d, s.hidden))
            slices[f"{p}.{proj}.weight"] = (0, slice(kv.start * d, kv.stop * d))
        _swap(model, f"{p}.o_proj", RowSharded(hq * d, s.hidden, group), (s.hidden, s.heads * d))
        slices[f"{p}.o_proj.weight"] = (1, slice(rank * hq * d, (rank + 1) * hq * d))
        attn.num_key_value_groups = hq // (kv.stop - kv.start)


def build(plan: str, s: ModelShape, *, group: dist.ProcessGroup | None = None,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, placement: str = "interleaved",
          form: str = "tree", kernel: str = "auto", seed: int = 0) -> Plan:
    """This rank's part of `plan` for a model of shape `s` (group None or of size 1: one process)."""
    distributed = group is not None or (plan != "single" and dist.is_initialized())
    world = dist.get_world_size(group) if distributed else 1
    rank = dist.get_rank(group) if distributed else 0
    check(plan, s, world)
    model = skeleton(s)
    slices: dict[str, tuple[int, slice]] = {}
    if plan == "tp" and world > 1:  # on one process every plan is the single model
        _shard_attention(model, s, rank, world, group, slices)
    if plan in ("tp", "hybrid") and world > 1:
        _shard_mlp(model, s, rank, world, group, slices)
    materialize(model, device=device, dtype=dtype, seed=seed, slices=slices)
    model.set_attn_implementation(kvcache.register())
    cache_group = (group or dist.group.WORLD) if plan in ("cp", "hybrid") and world > 1 else None

    def make_cache(capacity: int | None = None, **kw: Any) -> kvcache.ShardedKVCache:
        """The plan's cache; without a group, `shards=N` splits it into N shards held here."""
        kw = {"placement": placement, "form": form, "kernel": kernel, **kw}
        if cache_group is not None:
            return kvcache.ShardedKVCache(s.layers, group=cache_group, capacity=capacity, **kw)
        return kvcache.ShardedKVCache(s.layers, kw.pop("shards", 1), capacity=capacity, **kw)

    return Plan(plan, s, rank, world, model, make_cache)

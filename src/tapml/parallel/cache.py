"""A KV cache sharded along the sequence: each token's keys and values live in one shard (contiguous blocks or
interleaved, token i → shard i mod N), held by one rank of a group or all by one process; the attention over it
is computed per shard and merged exactly. It plugs into transformers' `Cache` and attention interfaces, so a
model's `generate()` runs unchanged with `past_key_values=ShardedKVCache(...)` and `attn_implementation=NAME`.

It must not gather keys or values across ranks (only (out, LSE) pairs travel) nor reallocate per token (shards
grow in place, by doubling when no capacity is given).
"""

from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from tapml.errors import TapmlError
from tapml.parallel.attention import KERNELS, attend
from tapml.parallel.merge import FORMS, merge, merge_group

NAME = "tapml_sharded"  # the attention implementation models run with over a ShardedKVCache
# The keyword models and generate() take the cache by: `cache` from transformers ~5.2x (`past_key_values`
# deprecated there), `past_key_values` before (the GPU machines' 5.17).
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
PLACEMENTS = ("interleaved", "contiguous")
_ACTIVE: contextvars.ContextVar[ShardedLayer | None] = contextvars.ContextVar("tapml_sharded_layer", default=None)


@dataclass(frozen=True)
class Placement:
    """Which shard owns each token position: `interleaved` (i mod N, as vLLM's decode context parallel) or
    `contiguous` (blocks of `block` tokens; the last shard takes whatever comes past N blocks)."""

    kind: str
    shards: int
    block: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PLACEMENTS:
            raise TapmlError(f"unknown placement {self.kind!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.shards < 1:
            raise TapmlError(f"a sharded cache needs at least one shard (got {self.shards})")
        if self.kind == "contiguous" and self.block < 1:
            raise TapmlError("a contiguous placement needs its capacity (tokens expected) to size its blocks")

    @property
    def step(self) -> int:
        return self.shards if self.kind == "interleaved" else 1

    def owner(self, pos: int) -> int:
        if self.kind == "interleaved":
            return pos % self.shards
        return min(pos // self.block, self.shards - 1)

    def take(self, shard: int, start: int, count: int) -> tuple[slice, range]:
        """Of the new tokens at positions [start, start+count): which ones `shard` owns, as a slice of them
        and as their positions."""
        stop = start + count
        if self.kind == "interleaved":
            first = start + (shard - start) % self.shards
            return slice(first - start, count, self.shards), range(first, max(first, stop), self.shards)
        lo = shard * self.block
        hi = stop if shard == self.shards - 1 else min(stop, lo + self.block)
        lo = max(lo, start)
        hi = max(hi, lo)
        return slice(lo - start, hi - start), range(lo, hi)

    def share(self, shard: int, total: int) -> int:
        """Tokens `shard` holds when the cache holds `total` (sizes buffers up front)."""
        return len(self.take(shard, 0, total)[1])


class KVShard:
    """One shard's keys and values [B, H, n, D] in a buffer that grows in place, and their positions."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.positions = range(0)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:, :, :len(self)]

    @property
    def values(self) -> torch.Tensor:
        return self.v[:, :, :len(self)]

    def reserve(self, like: torch.Tensor, tokens: int) -> None:
        """Room for `tokens` in all, shaped and typed like `like` [B, H, *, D]."""
        cap = 0 if self.k is None else self.k.shape[2]
        if tokens <= cap:
            return
        b, h, _, d = like.shape
        k = like.new_empty(b, h, tokens, d)
        v = like.new_empty(b, h, tokens, d)
        if self.k is not None:
            k[:, :, :len(self)] = self.keys
            v[:, :, :len(self)] = self.values
        self.k, self.v = k, v

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: range) -> None:
        n, m = len(self), len(pos)
        if m == 0:
            return
        if n and self.positions[-1] + self.positions.step != pos[0]:
            raise RuntimeError(f"shard positions must continue: {self.positions} then {pos}")
        cap = 0 if self.k is None else self.k.shape[2]
        if n + m > cap:
            self.reserve(k, max(n + m, 2 * cap, 256))
        self.k[:, :, n:n + m] = k
        self.v[:, :, n:n + m] = v
        start = self.positions.start if n else pos.start
        self.positions = range(start, pos[-1] + 1, pos.step)


class ShardedLayer(CacheLayerMixin):
    """One model layer's cache: the shards this process holds, the global length, and what the attention
    needs to merge them (the group over which the other shards live, the merge form, the kernel)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, placement: Placement, held: tuple[int, ...], *, group: dist.ProcessGroup | None = None,
                 capacity: int | None = None, form: str = "tree", kernel: str = "auto") -> None:
        super().__init__()
        self.placement, self.group, self.form, self.kernel = placement, group, form, kernel
        self.capacity = capacity
        self.shards = {s: KVShard() for s in held}
        self.seen = 0
        self.query_positions = range(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self._like = key_states[:, :, :0]
        if self.capacity:
            for s, shard in self.shards.items():
                shard.reserve(key_states, self.placement.share(s, self.capacity))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        for s, shard in self.shards.items():
            sl, pos = self.placement.take(s, self.seen, count)
            shard.append(key_states[:, :, sl], value_states[:, :, sl], pos)
        self.query_positions = range(self.seen, self.seen + count)
        self.seen += count
        first = next(iter(self.shards.values()))
        self.keys, self.values = first.keys, first.values
        _ACTIVE.set(self)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen  # the global length: generate() derives positions from it

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name in earlier transformers

    def reset(self) -> None:
        self.shards = {s: KVShard() for s in self.shards}
        self.seen, self.keys, self.values, self.is_initialized = 0, None, None, False

    def crop(self, tokens_to_remove: int) -> None:
        raise TapmlError("a sharded KV cache cannot be cropped (assisted or speculative decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise TapmlError("a sharded KV cache does not reorder for beam search; decode greedily or by sampling")

    def lengths(self) -> dict[int, int]:
        return {s: len(shard) for s, shard in self.shards.items()}

    def fill_synthetic(self, total: int) -> None:
        """Grow every held shard to its share of `total` tokens by repeating the keys and values it holds
        (random ones where it holds none): decode then costs what it costs at that context, but the values
        are not a real context, so tokens decoded after this mean nothing. For timing long contexts only."""
        if total <= self.seen:
            return
        g = torch.Generator(device=self.device).manual_seed(total)
        for s, sh in self.shards.items():
            want = self.placement.take(s, 0, total)[1]
            n0 = len(sh)
            if len(want) <= n0:
                continue
            sh.reserve(self._like, len(want))
            if not n0:
                b, h, _, d = self._like.shape
                k = torch.randn(b, h, 256, d, generator=g, device=self.device).to(self.dtype)
                v = torch.randn(b, h, 256, d, generator=g, device=self.device).to(self.dtype)
                sh.append(k, v, want[:min(256, len(want))])
            while len(sh) < len(want):  # copy what is held after itself: the shard doubles each time
                m = min(len(sh), len(want) - len(sh))
                sh.append(sh.k[:, :, :m], sh.v[:, :, :m], want[len(sh):len(sh) + m])
        self.seen = total

    def attention(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """The new tokens' attention over the whole cache: each held shard, merged here, then over the group."""
        parts = [attend(query, sh.keys, sh.values, scaling, q_pos=self.query_positions, k_pos=sh.positions,
                        kernel=self.kernel) for sh in self.shards.values()]
        out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
        if self.group is not None:
            out, lse = merge_group(out, lse, self.group, self.form)
        return out


class ShardedKVCache(Cache):
    """The cache of a whole model, sharded along the sequence.

    With `group`, rank r of the group holds shard r (N = the group's size) and the attention merges over the
    group; without, this process holds all `shards` and merges them locally (the one-device split whose cost
    the benchmark measures). `capacity` (total tokens expected) sizes the buffers up front and is required for
    the contiguous placement; more tokens than that still fit (the last shard grows)."""

    def __init__(self, num_layers: int, shards: int | None = None, *, placement: str = "interleaved",
                 group: dist.ProcessGroup | None = None, capacity: int | None = None, form: str = "tree",
                 kernel: str = "auto") -> None:
        if form not in FORMS:
            raise TapmlError(f"unknown merge form {form!r}; choose one of {', '.join(FORMS)}")
        if kernel not in KERNELS:
            raise TapmlError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        if group is not None:
            n = dist.get_world_size(group)
            if shards not in (None, n):
                raise TapmlError(f"a cache sharded over a group of {n} ranks has {n} shards, not {shards}")
            held: tuple[int, ...] = (dist.get_rank(group),)
        else:
            n = shards or 1
            held = tuple(range(n))
        if placement == "contiguous" and not capacity:
            raise TapmlError("the contiguous placement needs --capacity (the tokens the cache will hold)")
        block = -(-capacity // n) if capacity else 0
        self.placement = Placement(placement, n, block)
        self.group = group
        super().__init__(layers=[ShardedLayer(self.placement, held, group=group, capacity=capacity, form=form,
                                              kernel=kernel) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model: torch.nn.Module, shards: int | None = None, **kwargs: Any) -> ShardedKVCache:
        return cls(model.config.num_hidden_layers, shards, **kwargs)

    def fill_synthetic(self, total: int) -> None:
        """Every layer grown to `total` tokens with repeated keys and values (ShardedLayer.fill_synthetic)."""
        for layer in self.layers:
            layer.fill_synthetic(total)

    def lengths(self, layer_idx: int = 0) -> dict[int, int]:
        """Tokens each shard held here holds (shard id → length)."""
        return self.layers[layer_idx].lengths()

    def all_lengths(self, layer_idx: int = 0) -> list[int]:
        """Tokens per shard over the whole group (one all-gather), or per local shard without a group."""
        local = self.lengths(layer_idx)
        if self.group is None:
            return [local[s] for s in sorted(local)]
        mine = torch.tensor([next(iter(local.values()))], dtype=torch.long)
        if dist.get_backend(self.group) == "nccl":
            mine = mine.cuda()
        parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, mine, group=self.group)
        return [int(p) for p in parts]


def sharded_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface over a ShardedKVCache: (out [B, Lq, H, D], no weights)."""
    layer = _ACTIVE.get()
    if layer is None or key is not layer.keys:
        raise TapmlError(f"attention {NAME!r} runs over a ShardedKVCache: pass {CACHE_KW}=ShardedKVCache(...) "
                         "(and use_cache=True)")
    if dropout:
        raise TapmlError("the sharded attention is for inference; call model.eval()")
    return layer.attention(query, scaling if scaling is not None else query.shape[-1] ** -0.5)\
        .transpose(1, 2).contiguous(), None


def _unpadded_mask(batch_size: int, q_length: int, kv_length: int, *args: Any,
                   attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """No mask is built (at long contexts it would not fit): causality comes from positions in `attend`.
    Padding would need per-row positions, so a padded prefill is refused."""
    if attention_mask is not None and q_length > 1 and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise TapmlError("sharded decode takes unpadded batches (equal-length prompts); pad nothing or run "
                         "one prompt per batch")


def register() -> str:
    """Make NAME known to transformers (idempotent); returns it, for `model.set_attn_implementation`."""
    AttentionInterface.register(NAME, sharded_attention)
    AttentionMaskInterface.register(NAME, _unpadded_mask)
    return NAME

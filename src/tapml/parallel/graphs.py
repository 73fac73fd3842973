"""Decode over a static KV cache, replayable as one CUDA graph: the cache preallocated for the context (a prefix
split into N chunks laid out as an extra batch dimension, and a small tail the decode steps write at a length held
in a tensor), one attention call over every chunk, one merge, and a step captured once so its time is the device's.

It must not sync with the host, allocate from Python, or branch on tensor values inside a step (no .item(), no
per-step Python ints), and touches CUDA only when the tensors live there: on the CPU the same step runs eagerly.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, CacheLayerMixin

from tapml.errors import TapmlError
from tapml.parallel import cache as kvcache
from tapml.parallel.attention import _fold, _lse_dtype, _unfold, unmasked
from tapml.parallel.merge import merge_group, merge_stacked

MODES = ("eager", "static", "graph")  # dynamic cache; static cache stepped eagerly; static cache, captured step
MERGES = ("eager", "compiled")
Merge = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_COMPILED: dict[str, Merge] = {}
# only this thread's CUDA calls may break a capture: NCCL's watchdog thread queries events while a step with
# collectives is captured, which the default ("global") mode would turn into a capture error
_CAPTURE_MODE = "thread_local"


def _room_for_shapes() -> None:
    """A sweep compiles one variant per (chunks, head layout, tail): more than dynamo's default 8 per function."""
    import torch._dynamo.config as cfg

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, knob):
            setattr(cfg, knob, max(getattr(cfg, knob), 64))


def merge_fn(name: str) -> Merge:
    """The stacked merge as a handful of eager ops, or fused by torch.compile (CUDA only: compiled once)."""
    if name not in MERGES:
        raise TapmlError(f"unknown merge {name!r}; choose one of {', '.join(MERGES)}")
    if name == "eager":
        return merge_stacked
    _room_for_shapes()
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(merge_stacked, fullgraph=True, dynamic=False)
    return _COMPILED[name]


def _tail_and_merge(qf: torch.Tensor, tk: torch.Tensor, tv: torch.Tensor, visible: torch.Tensor,
                    o_pre: torch.Tensor, lse_pre: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What a step does after the prefix's kernel call, in one function so torch.compile can fuse it: the tail's
    attention (qf [B, Hkv, G, D] over tk, tv [B, Hkv, T, D], keys where `visible` [T]; the accumulation dtype's
    plain math, as attention.plain) and the merge of it with the prefix's N chunk results o_pre [N, B, Hkv, G, D],
    lse_pre [N, B, Hkv, G] → (out, LSE) in the accumulation dtype."""
    acc = lse_pre.dtype
    scores = (qf.to(acc) @ tk.to(acc).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, -math.inf)
    top = torch.nan_to_num(scores.amax(-1, keepdim=True), neginf=0.0)  # no visible key: exp(−inf) = 0
    e = torch.exp(scores - top)
    total = e.sum(-1)
    o_tail = (e @ tv.to(acc)) / total.clamp_min(1).unsqueeze(-1)
    lse_tail = top.squeeze(-1) + torch.log(total)
    return merge_stacked(torch.cat([o_pre.to(acc), o_tail.unsqueeze(0)]),
                         torch.cat([lse_pre, lse_tail.unsqueeze(0)]))


Finish = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def finish_fn(name: str) -> Finish:
    """The tail's attention and the merge (_tail_and_merge) as eager ops, or fused by torch.compile."""
    if name not in MERGES:
        raise TapmlError(f"unknown merge {name!r}; choose one of {', '.join(MERGES)}")
    if name == "eager":
        return _tail_and_merge
    key = "finish:" + name
    _room_for_shapes()
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_tail_and_merge, fullgraph=True, dynamic=False)
    return _COMPILED[key]


def chunked_attention(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, chunks: int, tk: torch.Tensor,
                      tv: torch.Tensor, tail_visible: torch.Tensor, scale: float, kernel: str = "auto",
                      finish: Finish = _tail_and_merge) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token's attention over a static cache → (out [B, Hq, 1, D], LSE [B, Hq, 1]).

    q [B, Hq, 1, D]; the prefix pk, pv [chunks·B, Hkv, P, D] (chunk-major: chunk c of batch row b at c·B + b),
    attended in ONE kernel call with the chunks as batch rows, giving `chunks` LSEs; then the tail tk, tv
    [B, Hkv, T, D] masked by `tail_visible` [T] and one merge of the chunks + 1 results (`finish`)."""
    b, hq, lq, d = q.shape
    if lq != 1:
        raise TapmlError("a static cache decodes one token per step; prefill into a ShardedKVCache first")
    hkv = pk.shape[1]
    acc = _lse_dtype(q)
    qf = _fold(q, hkv)  # [B, Hkv, G, D]: exact, every query sees the same keys
    g = qf.shape[2]
    if pk.shape[2]:
        o, lse = unmasked(qf.repeat(chunks, 1, 1, 1) if chunks > 1 else qf, pk, pv, scale, kernel)
        o_pre, lse_pre = o.reshape(chunks, b, hkv, g, d), lse.to(acc).reshape(chunks, b, hkv, g)
    else:  # no prefix (a context shorter than the chunks): the tail holds it all
        o_pre, lse_pre = qf.new_zeros(0, b, hkv, g, d), torch.zeros(0, b, hkv, g, dtype=acc, device=q.device)
    out, merged = finish(qf, tk, tv, tail_visible, o_pre, lse_pre, scale)
    return _unfold(out.to(q.dtype), merged, hq, lq)


def _tile(dst: torch.Tensor, src: torch.Tensor, start: int) -> None:
    """dst[:, :, i] = src[:, :, (start + i) mod R]: the held real tokens repeated (exact when R covers dst)."""
    r, p, i = src.shape[2], dst.shape[2], 0
    while i < p:
        s = (start + i) % r
        m = min(p - i, r - s)
        dst[:, :, i:i + m] = src[:, :, s:s + m]
        i += m


class _Clock:
    """The cache's global length as Python sees it (transformers asks for it; the graph never reads it)."""

    def __init__(self, seen: int) -> None:
        self.seen = seen


class StaticLayer(CacheLayerMixin):
    """One layer's static cache: the chunked prefix, the tail written at `length`, and which tail slots hold
    this rank's tokens (`mine`: all of them on one device; every N-th under an interleaved group)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, pk: torch.Tensor, pv: torch.Tensor, chunks: int, tk: torch.Tensor, tv: torch.Tensor,
                 length: torch.Tensor, mine: torch.Tensor, clock: _Clock, *, group: dist.ProcessGroup | None,
                 form: str, kernel: str, finish: Finish) -> None:
        super().__init__()
        self.pk, self.pv, self.chunks, self.tk, self.tv = pk, pv, chunks, tk, tv
        self.length, self.mine, self.clock = length, mine, clock
        self.slots = torch.arange(tk.shape[2], device=tk.device)
        self.group, self.form, self.kernel, self.finish = group, form, kernel, finish
        self.keys, self.values, self.is_initialized = tk, tv, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[-2] != 1:
            raise TapmlError("a static cache decodes one token per step; prefill into a ShardedKVCache first")
        # every rank writes the new token at its own tail length; only the owner's copy is ever visible
        self.tk.index_copy_(2, self.length, key_states)
        self.tv.index_copy_(2, self.length, value_states)
        kvcache._ACTIVE.set(self)
        return self.keys, self.values

    def attention(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        visible = self.mine & (self.slots <= self.length)
        out, lse = chunked_attention(query, self.pk, self.pv, self.chunks, self.tk, self.tv, visible, scaling,
                                     self.kernel, self.finish)
        if self.group is not None:
            out, lse = merge_group(out, lse, self.group, self.form)
        return out

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.clock.seen + 1, 0

    def get_seq_length(self, *args: Any) -> int:
        return self.clock.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length

    def reset(self) -> None:
        raise TapmlError("a static cache is built for one context; build another (StaticCache.from_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise TapmlError("a static KV cache cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise TapmlError("a static KV cache does not reorder for beam search; decode greedily")


class StaticCache(Cache):
    """A whole model's static cache, built from a prefilled ShardedKVCache holding one shard per process."""

    def __init__(self, layers: list[StaticLayer], length: torch.Tensor, clock: _Clock, tail: int) -> None:
        super().__init__(layers=layers)
        self.length, self.clock, self.tail = length, clock, tail
        self.start = int(length[0])  # tail slots used by the prefix's remainder (build time, not in a step)

    @property
    def seen(self) -> int:
        return self.clock.seen

    def get_seq_length(self, layer_idx: int = 0, *args: Any) -> int:
        return self.clock.seen

    def room(self) -> int:
        """Decode steps left before the tail is full (Python's count, kept beside the tensor)."""
        return self.tail - (self.start + self.clock.seen - self.context)

    @classmethod
    def from_cache(cls, dyn: kvcache.ShardedKVCache, context: int, *, chunks: int = 1, steps: int = 64,
                   merge: str = "eager") -> StaticCache:
        """Preallocate for `context` tokens + `steps` decode steps; the prefix (this process's share of the
        context, in `chunks` equal chunks) is filled from what `dyn` holds, repeated when it holds fewer tokens
        than the share (timing only, as ShardedLayer.fill_synthetic: the same values at the same positions);
        what does not divide into the chunks goes to the tail's first slots."""
        if chunks < 1:
            raise TapmlError(f"--shards must be ≥ 1 (got {chunks})")
        first = dyn.layers[0]
        if len(first.shards) != 1:
            raise TapmlError("a static cache is built from a ShardedKVCache holding one shard per process")
        if dyn.group is not None and dyn.placement.kind != "interleaved":
            raise TapmlError("the static cache over a group takes the interleaved placement; drop --placement")
        (rank,) = first.shards
        if len(first.shards[rank]) == 0:
            raise TapmlError("prefill at least as many tokens as ranks before building a static cache")
        share = dyn.placement.share(rank, context)
        per = share // chunks
        rem = share - per * chunks
        tail = rem + steps
        like = first.shards[rank].keys
        dev = like.device
        b, h, _, d = like.shape
        length = torch.full((1,), rem, dtype=torch.long, device=dev)
        owners = [dyn.placement.owner(context + j - rem) == rank for j in range(rem, tail)]
        mine = torch.tensor([True] * rem + owners, dtype=torch.bool, device=dev)
        clock, fn = _Clock(context), finish_fn(merge)
        layers = []
        for layer in dyn.layers:
            src_k, src_v = layer.shards[rank].keys, layer.shards[rank].values
            pk = like.new_empty(chunks * b, h, per, d)
            pv = like.new_empty(chunks * b, h, per, d)
            tk = like.new_zeros(b, h, tail, d)
            tv = like.new_zeros(b, h, tail, d)
            for c in range(chunks):
                _tile(pk[c * b:(c + 1) * b], src_k, c * per)
                _tile(pv[c * b:(c + 1) * b], src_v, c * per)
            if rem:
                _tile(tk[:, :, :rem], src_k, chunks * per)
                _tile(tv[:, :, :rem], src_v, chunks * per)
            layers.append(StaticLayer(pk, pv, chunks, tk, tv, length, mine, clock, group=dyn.group,
                                      form=layer.form, kernel=layer.kernel, finish=fn))
        out = cls(layers, length, clock, tail)
        out.context = context
        return out

    def all_lengths(self) -> list[int]:
        """Tokens per chunk (the prefix's remainder counted in the last) on every rank, rank-major."""
        x = self.layers[0]
        per, n = x.pk.shape[2], x.chunks
        mine = [per] * (n - 1) + [per + self.start]
        group = x.group
        if group is None:
            return mine
        every: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
        return [v for r in every for v in r]

    def bytes_held(self) -> int:
        return sum(2 * (x.pk.numel() + x.tk.numel()) * x.pk.element_size() for x in self.layers)


class Decoder:
    """Greedy decode over a StaticCache: the step as a function of static tensors (input ids, positions, the
    cache's length, a token log), run eagerly or replayed from a captured CUDA graph."""

    def __init__(self, model: torch.nn.Module, cache: StaticCache, first: torch.Tensor, capacity: int) -> None:
        self.model, self.cache = model, cache
        self.ids = first.clone()  # [B, 1]
        self.pos = torch.full_like(first, cache.seen)
        self.log = torch.zeros(capacity, first.shape[0], dtype=torch.long, device=first.device)
        self.count = torch.zeros(1, dtype=torch.long, device=first.device)
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.done = 0

    def _body(self) -> None:
        logits = self.model(input_ids=self.ids, position_ids=self.pos, use_cache=True, logits_to_keep=1,
                            **{kvcache.CACHE_KW: self.cache}).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        self.logits = logits  # the graph's own output buffer when captured: read it after a replay
        self.ids.copy_(tok)
        self.pos.add_(1)
        self.cache.length.add_(1)
        self.log.index_copy_(0, self.count, tok.T)
        self.count.add_(1)

    def snapshot(self) -> tuple[Any, ...]:
        return (self.ids.clone(), self.pos.clone(), self.cache.length.clone(), self.count.clone(),
                self.cache.clock.seen, self.done)

    def restore(self, snap: tuple[Any, ...]) -> None:
        for dst, src in zip((self.ids, self.pos, self.cache.length, self.count), snap[:4], strict=True):
            dst.copy_(src)
        self.cache.clock.seen, self.done = snap[4], snap[5]

    def capture(self, communicate: bool = True, warmup: int = 2) -> None:
        """Warm the step up on a side stream (kernels chosen, NCCL and torch.compile ready), put the state back,
        and capture one step; `communicate=False` captures it without collectives (the communication share)."""
        from tapml.parallel.merge import no_communication

        snap = self.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        ctx = no_communication if not communicate else contextlib.nullcontext
        with torch.cuda.stream(side), ctx():
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.restore(snap)
        graph = torch.cuda.CUDAGraph()
        with ctx(), torch.cuda.graph(graph, capture_error_mode=_CAPTURE_MODE):
            self._body()
        torch.cuda.synchronize()
        self.graphs[communicate] = graph

    def step(self, graph: bool = False, communicate: bool = True) -> None:
        if self.done >= self.log.shape[0] or self.cache.room() < 1:
            raise TapmlError(f"the static cache was sized for {self.log.shape[0]} decode steps; build a larger one")
        if graph:
            self.graphs[communicate].replay()
        elif communicate:
            self._body()
        else:
            from tapml.parallel.merge import no_communication

            with no_communication():
                self._body()
        self.cache.clock.seen += 1
        self.done += 1

    def timed(self, steps: int, graph: bool = False, communicate: bool = True) -> list[float]:
        """Seconds of each of `steps` steps: CUDA events around each (no sync between steps), else wall time."""
        dev = self.ids.device
        if dev.type != "cuda":
            out = []
            for _ in range(steps):
                t0 = time.perf_counter()
                self.step(graph, communicate)
                out.append(time.perf_counter() - t0)
            return out
        torch.cuda.synchronize(dev)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        for i in range(steps):
            self.step(graph, communicate)
            marks[i + 1].record()
        torch.cuda.synchronize(dev)
        return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(marks)]

    def tokens(self) -> list[list[int]]:
        """Every token the steps so far produced, [step][batch row] (one copy to the host)."""
        return self.log[:self.done].tolist()

    def check(self, steps: int) -> int:
        """Graph against eager from the same state: the number of leading steps whose greedy tokens agree
        (== steps when all do); the state is put back after."""
        snap = self.snapshot()
        for _ in range(steps):
            self.step(graph=False)
        eager = self.tokens()[snap[5]:]
        self.restore(snap)
        for _ in range(steps):
            self.step(graph=True)
        replayed = self.tokens()[snap[5]:]
        self.restore(snap)
        return next((i for i, (x, y) in enumerate(zip(eager, replayed, strict=True)) if x != y), steps)


def graph_seconds(fn: Callable[[], Any], reps: int = 20, calls: int = 1) -> float:
    """Device time of `calls` calls of `fn` captured as one CUDA graph (median of `reps` replays; after a
    warm-up on a side stream). CUDA only."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode=_CAPTURE_MODE):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def kernel_latency(device: torch.device, kernels: int = 256) -> float:
    """Seconds per tiny kernel back to back inside a CUDA graph (the floor every kernel of a step pays)."""
    x = torch.zeros(1, device=device)

    def chain() -> None:
        for _ in range(kernels):
            x.add_(1)

    return graph_seconds(chain) / kernels


def merge_seconds(layers: int, parts: int, batch: int, heads: int, head_dim: int, device: torch.device,
                  dtype: torch.dtype, merge: str = "eager", reps: int = 20) -> float:
    """One decode step's merges alone (`layers` merges of `parts` (out, LSE) pairs at the step's shapes): in a
    captured graph on CUDA, wall time of the eager ops on the CPU."""
    fn = merge_fn(merge)
    outs = torch.randn(parts, batch, heads, 1, head_dim, device=device).to(dtype)
    lses = torch.randn(parts, batch, heads, 1, device=device)
    if device.type == "cuda":
        return graph_seconds(lambda: fn(outs, lses), reps=reps, calls=layers)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(layers):
            fn(outs, lses)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def decode_static(job: Any, model: torch.nn.Module, dyn: kvcache.ShardedKVCache, logits: torch.Tensor,
                  device: torch.device) -> tuple[list[list[int]], list[float], float | None,
                                                           StaticCache, dict[str, Any]]:
    """The decode driver's static modes (run.DecodeJob.mode static or graph): the prefilled cache `dyn` moved
    into a StaticCache for the context (its buffers freed), warm-up steps, the timed steps, the communication
    share (a second graph captured without collectives) → (tokens [prefill's, then per step], seconds per
    timed step, comm share or None, the cache, what else the result reports)."""
    graph = job.mode == "graph"
    checks = job.check_steps if graph else 0
    comm = job.comm_steps if dist.is_initialized() and job.plan != "single" else 0
    total = job.warmup + job.steps + comm
    cache = StaticCache.from_cache(dyn, job.context, chunks=job.shards, steps=total + 4, merge=job.merge)
    for layer in dyn.layers:  # the prefill's buffers, freed before the decode
        layer.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    first = logits.argmax(-1, keepdim=True)
    dec = Decoder(model, cache, first, total + 4)
    extra: dict[str, Any] = {"graph_agrees_with_eager": None}
    # a failed collective raises RuntimeError or DistError here: the driver (run.py) names the lost peer
    if graph:
        dec.capture()
        if checks:
            agree = dec.check(min(checks, total))
            extra["graph_agrees_with_eager"] = agree == min(checks, total)
            extra["graph_check_steps"] = min(checks, total)
            if agree < min(checks, total):
                extra["graph_first_difference"] = agree
    for _ in range(job.warmup):
        dec.step(graph)
    times = dec.timed(job.steps, graph)
    share = None
    if comm:
        if graph:
            dec.capture(communicate=False)
        quiet = dec.timed(comm, graph, communicate=False)
        if dist.is_initialized():
            dist.barrier()
        share = max(0.0, 1.0 - sorted(quiet)[len(quiet) // 2] / sorted(times)[len(times) // 2])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tokens = [first[:, 0].tolist(), *dec.tokens()[:job.warmup + job.steps]]
    extra["merge"] = job.merge
    kvcache._ACTIVE.set(None)  # its last layer's buffers must not outlive the run (the next cell needs the room)
    return tokens, times, share, cache, extra

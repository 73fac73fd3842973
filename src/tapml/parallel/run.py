"""The decode driver torchrun launches (`python -m torch.distributed.run ... -m tapml.parallel.run`): each rank
builds its part of a plan, prefills a long context, times greedy decode steps, and rank 0 writes the result.

It must not launch processes itself, and never waits without a timeout: every process group has one, and a
rank that loses a peer says so in one line and exits (code 3) instead of hanging.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tapml.errors import TapmlError
from tapml.parallel import models, plans
from tapml.parallel.cache import CACHE_KW
from tapml.parallel.merge import no_communication

# NVLink multicast (NVLS) and symmetric memory stay off: the plans use plain collectives only.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
EXIT_PEER_LOST = 3


class PeerLost(TapmlError):
    """A collective failed or timed out: another rank died or stopped answering."""


@dataclass
class DecodeJob:
    """One decode run of a plan; the fields are the driver's command-line options."""

    model: str
    plan: str = "single"
    context: int = 4096
    steps: int = 32
    batch: int = 1
    layers: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    placement: str = "interleaved"
    form: str = "tree"
    kernel: str = "auto"
    shards: int = 1  # single plan only: split the cache into this many shards on the one device
    capacity: int | None = None  # tokens the cache is sized for (default: context + every step run)
    chunk: int = 2048  # prefill chunk (tokens per forward)
    fill: str = "prefill"  # prefill: the real context; tile: prefill `prefill_max` tokens, repeat their KV
    prefill_max: int = 32768
    warmup: int = 2
    comm_steps: int = 8  # steps timed again without collectives, for the communication share
    timeout_s: float = 120.0
    calibrate: bool = False  # measure this machine for the cost model (bandwidth, flops, host and link costs)
    generate: bool = False  # run transformers' generate() over the cache instead of the timing loop
    save_logits: str | None = None
    die_at: int | None = None  # fault injection for tests: the last rank fails at this decode step,
    die_how: str = "vanish"  # by exiting without a word (vanish) or by stopping to answer (stall)
    # eager: the growing cache, every step issued from Python; static: the preallocated cache (graphs.py) stepped
    # eagerly; graph: the static step captured once as a CUDA graph and replayed (the device's time)
    mode: str = "eager"
    merge: str = "eager"  # the static cache's merge of its chunks: eager ops, or compiled (CUDA)
    check_steps: int = 8  # graph mode: steps decoded both eagerly and by replay from one state, tokens compared
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.fill not in ("prefill", "tile"):
            raise TapmlError(f"unknown --fill {self.fill!r}; choose prefill or tile")
        if self.dtype not in DTYPES:
            raise TapmlError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.steps < 1 or self.chunk < 1 or self.batch < 1:
            raise TapmlError("--steps, --chunk and --batch must be ≥ 1")
        if self.shards > 1 and self.plan != "single":
            raise TapmlError("--shards splits the cache on one device (plan single); other plans shard by rank")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TapmlError("--device cuda but torch sees no GPU here; use --device cpu")
        if self.mode not in ("eager", "static", "graph"):
            raise TapmlError(f"unknown --mode {self.mode!r}; choose eager, static or graph")
        if self.mode == "graph" and self.device != "cuda":
            raise TapmlError("--mode graph captures CUDA graphs; on the CPU use --mode static or eager")
        if self.mode != "eager" and (self.generate or self.save_logits or self.die_at is not None):
            raise TapmlError("--generate, --save-logits and --die-at run the eager decode; add --mode eager")


def init(job: DecodeJob) -> tuple[int, int, torch.device]:
    """(rank, world, device) for this process; joins torchrun's group (gloo on the CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if job.device == "cuda" else torch.device("cpu")
    if job.device == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        for k, v in NCCL_ENV.items():
            os.environ.setdefault(k, v)
        timeout = timedelta(seconds=job.timeout_s)
        if job.device == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return rank, world, device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bytes_held(model: torch.nn.Module, cache: Any) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    if hasattr(cache, "bytes_held"):  # a static cache
        return n + cache.bytes_held()
    for layer in cache.layers:
        for sh in layer.shards.values():
            if sh.k is not None:
                n += 2 * sh.k.numel() * sh.k.element_size()
    return n


def forward(model: torch.nn.Module, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """One forward of `ids` [B, L] over the cache → the last position's logits [B, vocab]."""
    return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_KW: cache}).logits[:, -1]


def _prefill(job: DecodeJob, model: torch.nn.Module, cache: Any, ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Run the context through the model in chunks; with fill=tile only the first `prefill_max` tokens are
    real and the cache is then filled to the context by repeating them (timing only; the static modes repeat
    them into their own buffers, graphs.StaticCache.from_cache, at the same positions)."""
    real = ids.shape[1] if job.fill == "prefill" else min(ids.shape[1], job.prefill_max)
    logits = None
    for i in range(0, real, job.chunk):
        logits = forward(model, ids[:, i:min(i + job.chunk, real)], cache)
    how = "prefill"
    if real < ids.shape[1]:
        if job.mode == "eager":
            cache.fill_synthetic(ids.shape[1])
        how = f"tile({real} real)"
    return logits, how


def _decode(job: DecodeJob, model: torch.nn.Module, cache: Any, first: torch.Tensor, device: torch.device,
            rank: int, world: int) -> tuple[list[list[int]], list[float], list[torch.Tensor]]:
    """Greedy decode steps after the prefill's token: (tokens [prefill's, then one per step, warm-up
    included], the timed steps' seconds, the kept logits [decode steps])."""
    tok = first
    tokens, times, kept = [first[:, 0].tolist()], [], []
    for step in range(job.warmup + job.steps):
        if job.die_at is not None and step == job.die_at and rank == world - 1:
            if job.die_how == "stall":  # alive but silent: only the group's timeout can end the others' wait
                time.sleep(10 * job.timeout_s)
            os._exit(0)  # vanish with exit 0, so torchrun leaves the others be: they must notice on their own
        _sync(device)
        t0 = time.perf_counter()
        try:
            logits = forward(model, tok, cache)
            tok = logits.argmax(-1, keepdim=True)
            _sync(device)
        except (RuntimeError, dist.DistError) as e:
            raise PeerLost(f"rank {rank}: decode step {step}: {_first_line(e)}") from e
        times.append(time.perf_counter() - t0)
        tokens.append(tok[:, 0].tolist())
        if job.save_logits:
            kept.append(logits.float().cpu())
    return tokens, times[job.warmup:], kept


def _comm_share(job: DecodeJob, model: torch.nn.Module, cache: Any, tok: torch.Tensor, device: torch.device,
                median: float) -> float | None:
    """1 − (step time without collectives / step time): the communication's share, compute held equal."""
    if not job.comm_steps or not dist.is_initialized() or job.plan == "single":
        return None
    times = []
    with no_communication():
        for _ in range(job.comm_steps):
            _sync(device)
            t0 = time.perf_counter()
            tok = forward(model, tok, cache).argmax(-1, keepdim=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
    dist.barrier()
    return max(0.0, 1.0 - statistics.median(times) / median)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def run(job: DecodeJob, plan: plans.Plan | None = None) -> dict[str, Any]:
    """Run `job` on this rank (over `plan` when one is already built for it: a benchmark's sweep builds the
    model once); every rank returns the same summary, rank 0 writes it."""
    job.check()
    rank, world, device = init(job)
    shape = models.shape(job.model, job.layers)
    dtype = DTYPES[job.dtype]
    t0 = time.perf_counter()
    if plan is None:
        plan = plans.build(job.plan, shape, device=device, dtype=dtype, placement=job.placement, form=job.form,
                           kernel=job.kernel)
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier run's in this process
    ids = models.context_ids(job.context, shape.vocab, job.batch).to(device)
    capacity = job.capacity or job.context + job.warmup + job.steps + job.comm_steps
    if job.mode == "eager":
        cache = plan.make_cache(capacity=capacity, placement=job.placement, form=job.form, kernel=job.kernel,
                                **({"shards": job.shards} if job.shards > 1 else {}))
    else:  # the prefill's cache, one shard per process, sized by its growth; graphs.StaticCache takes it over
        cache = plan.make_cache(placement="interleaved" if world == 1 else job.placement, form=job.form,
                                kernel=job.kernel)
    result: dict[str, Any] = {"job": asdict(job), "plan": plan.describe(), "world": world,
                              "shape": asdict(shape), "build_s": build_s,
                              "params_held": sum(p.numel() for p in plan.model.parameters())}
    with torch.no_grad():
        if job.generate:
            return _run_generate(job, plan, cache, ids, result, rank, world)
        _sync(device)
        t0 = time.perf_counter()
        try:
            logits, how = _prefill(job, plan.model, cache, ids)
            _sync(device)
        except (RuntimeError, dist.DistError) as e:
            raise PeerLost(f"rank {rank}: prefill: {_first_line(e)}") from e
        result.update(prefill_s=time.perf_counter() - t0, fill=how, mode=job.mode)
        if job.mode != "eager":
            from tapml.parallel.graphs import decode_static

            try:
                tokens, times, comm, cache, extra = decode_static(job, plan.model, cache, logits, device)
            except (RuntimeError, dist.DistError) as e:
                raise PeerLost(f"rank {rank}: static decode: {_first_line(e)}") from e
            result.update(extra)
            median = statistics.median(times)
        else:
            tokens, times, kept = _decode(job, plan.model, cache, logits.argmax(-1, keepdim=True), device, rank,
                                          world)
            if job.save_logits:
                kept.insert(0, logits.float().cpu())
            median = statistics.median(times)
            last = torch.tensor([tokens[-1]], device=device).T
            comm = _comm_share(job, plan.model, cache, last, device, median)
    # on a GPU the allocator's peak (prefill's working set included); on the CPU what the plan holds
    held = _bytes_held(plan.model, cache)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else held
    result.update(step_s=times, median_s=median, tokens_per_s=job.batch / median, tokens=tokens,
                  comm_share=comm, shard_lengths=cache.all_lengths(), bytes_held=held, peak_bytes=peak)
    result.update(_gather(result, rank, world))
    if job.save_logits and rank == 0:
        torch.save(torch.stack(kept, 1), job.save_logits)  # [batch, steps, vocab]
    if job.calibrate:
        del plan, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["calibration"] = calibrate(job, shape, device, world)
    result["predicted"] = predictions(result)
    return result


def calibrate(job: DecodeJob, shape: models.ModelShape, device: torch.device, world: int) -> dict[str, float]:
    """The cost model's machine figures, measured here: read rates and flops (costmodel.measure, with this
    model's head layout), one small all-reduce's latency, and the floor of a step under this plan, per layer and
    per step, from models of 2 and 4 layers. Eager: models with the same head layout and 16 dimensions per head,
    whose steps are all host issue and collective latency (the host's time, which the device's work hides or
    not). Static and graph: the model itself cut to 2 and 4 layers at a short context, less what the cost model
    already charges for its reads and collectives — what a layer costs beyond them (its small kernels, as far as
    they do not overlap the large ones; negative where the probe's read rate is pessimistic), so the model adds
    only the KV to what was measured."""
    from tapml.parallel import costmodel

    out = costmodel.measure(device.type, job.dtype, shape=shape)
    if world > 1:
        x = torch.zeros(1024, device=device)
        lat = []
        for _ in range(22):
            _sync(device)
            t0 = time.perf_counter()
            dist.all_reduce(x)
            _sync(device)
            lat.append(time.perf_counter() - t0)
        out["collective_latency_s"] = statistics.median(lat[2:])
    real = job.mode != "eager"
    floor = {}
    for layers in (2, 4):
        tiny = dataclasses.replace(shape, name="cut", layers=layers) if real else models.ModelShape(
            "tiny", layers, 16 * shape.heads, shape.heads, shape.kv_heads, 16, 32 * shape.heads, 256 * world)
        plan = plans.build(job.plan, tiny, device=device, dtype=DTYPES[job.dtype], placement=job.placement,
                           form=job.form, kernel=job.kernel)
        cache = plan.make_cache(capacity=None if job.mode != "eager" else 128)
        ids = models.context_ids(32, tiny.vocab, job.batch).to(device)
        times = []
        with torch.no_grad():
            tok = forward(plan.model, ids, cache).argmax(-1, keepdim=True)
            if job.mode != "eager":  # the same static step as the run's, captured in graph mode
                from tapml.parallel import graphs

                dec = graphs.Decoder(plan.model, graphs.StaticCache.from_cache(cache, 32, steps=32), tok, 32)
                if job.mode == "graph":
                    dec.capture()
                times = dec.timed(24, job.mode == "graph")
            for _ in range(24 if job.mode == "eager" else 0):
                _sync(device)
                t0 = time.perf_counter()
                tok = forward(plan.model, tok, cache).argmax(-1, keepdim=True)
                _sync(device)
                times.append(time.perf_counter() - t0)
        floor[layers] = min(statistics.median(times[i:i + 8]) for i in (0, 8, 16))  # the quietest third
    out["host_s_per_layer"] = max((floor[4] - floor[2]) / 2, 1e-6)
    out["host_s_per_step"] = max(floor[2] - 2 * out["host_s_per_layer"], 0.0)
    if real:
        out["overlap"] = False
        base = costmodel.calibrated(costmodel.DEVICES["h200" if device.type == "cuda" else "cpu"],
                                    {**out, "host_s_per_layer": 0.0, "host_s_per_step": 0.0})
        charged = {n: costmodel.estimate(job.plan, dataclasses.replace(shape, layers=n), 32, batch=job.batch,
                                         devices=world, dev=base, dtype_bytes=DTYPES[job.dtype].itemsize,
                                         new_tokens=32).t_device for n in (2, 4)}
        out["host_s_per_layer"] = (floor[4] - floor[2] - charged[4] + charged[2]) / 2
        out["host_s_per_step"] = floor[2] - charged[2] - 2 * out["host_s_per_layer"]
        out["cut_layer_s"] = (floor[4] - floor[2]) / 2
    if job.mode == "graph":
        from tapml.parallel.graphs import kernel_latency

        out["kernel_latency_s"] = kernel_latency(device)
    return out


def predictions(result: dict[str, Any]) -> dict[str, Any]:
    """The analytic model's step for this run: with the device's nominal figures, and (after --calibrate)
    with the figures measured in the run."""
    from tapml.parallel import costmodel

    job, s = result["job"], models.ModelShape(**result["shape"])
    base = costmodel.DEVICES["h200" if job["device"] == "cuda" else "cpu"]
    kw = dict(batch=job["batch"], devices=result["world"], dtype_bytes=DTYPES[job["dtype"]].itemsize,
              new_tokens=job["warmup"] + job["steps"], chunk=job["chunk"], form=job["form"])
    out: dict[str, Any] = {"device": base.name}
    nominal = costmodel.estimate(job["plan"], s, job["context"], dev=base, **kw)
    out["nominal"] = nominal.as_dict()
    if "calibration" in result:
        cal = costmodel.estimate(job["plan"], s, job["context"], dev=costmodel.calibrated(
            base, result["calibration"]), **kw)
        out["calibrated"] = cal.as_dict()
    return out


def _run_generate(job: DecodeJob, plan: plans.Plan, cache: Any, ids: torch.Tensor, result: dict[str, Any],
                  rank: int, world: int) -> dict[str, Any]:
    """transformers' own generate() over the plan's model and cache, unchanged (greedy, `steps` new tokens)."""
    cfg = plan.model.config
    try:
        out = plan.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **{CACHE_KW: cache}, max_new_tokens=job.steps,
            min_new_tokens=job.steps, do_sample=False, num_beams=1, pad_token_id=cfg.pad_token_id,
            eos_token_id=cfg.eos_token_id, temperature=None, top_p=None, top_k=None,
            return_dict_in_generate=True, output_logits=True)
    except (RuntimeError, dist.DistError) as e:
        raise PeerLost(f"rank {rank}: generate: {_first_line(e)}") from e
    new = out.sequences[:, ids.shape[1]:]
    result.update(tokens=new.T.tolist(), shard_lengths=cache.all_lengths())
    result.update(_gather(result, rank, world))
    if job.save_logits and rank == 0:
        torch.save(torch.stack([x.float().cpu() for x in out.logits], 1), job.save_logits)
    return result


def _gather(result: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """What every rank saw: its tokens (they must agree) and its memory."""
    mine = {"tokens": result["tokens"], "peak_bytes": result.get("peak_bytes"),
            "bytes_held": result.get("bytes_held")}
    if world == 1:
        return {"ranks_agree": True, "per_rank": [mine]}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    return {"ranks_agree": all(r["tokens"] == mine["tokens"] for r in every), "per_rank": every}


def parse(argv: list[str] | None = None) -> tuple[DecodeJob, str | None]:
    p = argparse.ArgumentParser(prog="tapml.parallel.run", description=__doc__)
    p.add_argument("model")
    p.add_argument("--out", default=None, help="write rank 0's JSON result here (default: print it)")
    for f in DecodeJob.__dataclass_fields__.values():
        if f.name in ("model", "extra"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",):
            p.add_argument(flag, action="store_true")
        elif f.name in ("context", "chunk", "prefill_max"):
            p.add_argument(flag, type=models.parse_tokens, default=f.default)
        else:
            conv = {"int": int, "float": float, "int | None": int, "str | None": str}.get(str(f.type), str)
            p.add_argument(flag, type=conv, default=f.default)
    a = vars(p.parse_args(argv))
    out = a.pop("out")
    return DecodeJob(**a), out


def main(argv: list[str] | None = None) -> None:
    job, out = parse(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = run(job)
    except PeerLost as e:
        print(f"tapml parallel: {e}; a peer rank died or stopped answering, stopping this rank", file=sys.stderr,
              flush=True)
        os._exit(EXIT_PEER_LOST)  # no teardown: destroying a group with a dead peer may wait on it
    except TapmlError as e:
        print(f"tapml: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if rank == 0:
        text = json.dumps(result, indent=1)
        if out:
            Path(out).write_text(text)
        else:
            print(text)
    if dist.is_initialized():
        # leave together, then tear down: a rank that is already gone can make a peer's teardown raise, and
        # by now the result is written, so a teardown error must not turn the run into a failure
        try:
            dist.barrier()
            dist.destroy_process_group()
        except (RuntimeError, dist.DistError) as e:
            print(f"tapml parallel: rank {rank}: teardown: {_first_line(e)} (the result stands)", file=sys.stderr)


if __name__ == "__main__":
    main()

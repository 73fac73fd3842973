"""The sequential baselines run through torch.distributed.pipelining: a chain plan's stages become PipelineStages
(each taking everything live at its boundary and passing on what later stages need), trained by
`Schedule1F1B` or `ScheduleGPipe` — PyTorch's own code, not a copy of it.

A chain cannot keep a DAG's topology (PyTorch's schedules send only to stage ±1); that is the point of comparing.
It must not plan: the Job carries a chain plan with one rank per stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tapml.errors import TapmlError
from tapml.graphpipe.graph import Program
from tapml.graphpipe.runtime import Clock
from tapml.graphpipe.stages import StageModule

SCHEDULES = ("1f1b", "gpipe")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose gradient is made contiguous: PipelineStage receives gradients into buffers with the
    sender's strides, and gloo refuses non-contiguous buffers (the gradient of a `cat` input is a strided view)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous()


class ChainStage(nn.Module):
    """Stage k of a chain: `forward(*live_k) -> live_{k+1}` (the model's output at the last stage), running its
    part of the graph and relaying the activations that later stages need.

    Model inputs are not relayed: every rank builds the same batch, and a stage reads the inputs it needs from
    its own copy of the micro-batch being run (`chunk`, set by the schedule's per-chunk hook). Relayed through
    PipelineStage, a tensor that does not require grad (input ids, masks) intermittently arrived as the
    receive buffer's uninitialized memory under gloo (torch 2.13), in 1F1B and GPipe alike."""

    def __init__(self, part: StageModule, live_in: list[str], live_out: list[str], reads: list[str]):
        super().__init__()
        self.part = part.module
        self.inputs, self.outputs = part.inputs, part.outputs
        self.live_in, self.live_out, self.reads = live_in, live_out, reads
        self.model_inputs: list[str] = []  # names of the model's inputs, in order
        self.batch: list[tuple[torch.Tensor, ...]] = []  # per micro-batch: the model's inputs
        self.chunk = 0

    def set_batch(self, names: list[str], inputs: tuple[torch.Tensor, ...], n_micro: int) -> None:
        """This step's micro-batches, split as the schedule splits its arguments (tensor_split on dim 0)."""
        self.model_inputs = names
        parts = [torch.tensor_split(t, n_micro, 0) for t in inputs]
        self.batch = [tuple(p[i] for p in parts) for i in range(n_micro)]

    def forward(self, *live: torch.Tensor) -> Any:
        env = {}
        if self.reads:
            mine = dict(zip(self.model_inputs, self.batch[self.chunk]))
            env.update((v, mine[v]) for v in self.reads)
        for v, t in zip(self.live_in, live):
            env[v] = _ContiguousGrad.apply(t) if t.requires_grad else t
        made = self.part(*(env[v] for v in self.inputs))
        env.update(zip(self.outputs, made))
        out = tuple(env[v].contiguous() for v in self.live_out)
        return out[0] if len(out) == 1 else out


def chain_stages(program: Program, stages: list[list[int]]) -> list[ChainStage]:
    """Each stage with its boundary sets: live_k = activations made before stage k and read at stage k or later
    (stage 0 takes every model input from the schedule; later stages read the model inputs they need from their
    own batch), the last stage returns the model output."""
    owner = {v: s for s, layers in enumerate(stages) for v in layers}
    made_in = {n: owner[program.layer_of[n]] for n in program.layer_of}
    parts = [program.stage(layers) for layers in stages]
    model_inputs = set(program.inputs)
    readers: dict[str, set[int]] = {}
    for s, p in enumerate(parts):
        for v in p.inputs:
            readers.setdefault(v, set()).add(s)
    order = program.order
    live = [list(program.inputs)]
    for k in range(1, len(stages)):
        vals = [v for v, rs in readers.items()
                if v not in model_inputs and made_in.get(v, -1) < k and max(rs) >= k]
        live.append(sorted(vals, key=order.__getitem__))
    live.append([program.output])
    reads = [[] if k == 0 else [v for v in program.inputs if v in parts[k].inputs] for k in range(len(stages))]
    return [ChainStage(parts[k], live[k], live[k + 1], reads[k]) for k in range(len(stages))]


def _timed(fn: Any, kind: str, stage: int, clock: Clock, module: ChainStage | None = None) -> Any:
    """PipelineStage's forward/backward of one micro-batch, timed like the GraphPipe runtime's actions (a forward
    also tells the stage module which micro-batch it runs)."""

    def run(chunk: int, *args: Any, **kwargs: Any) -> Any:
        if module is not None:
            module.chunk = chunk
        t0 = clock.now()
        out = fn(chunk, *args, **kwargs)
        clock.marks.append((kind, stage, chunk, t0, clock.now()))
        return out

    return run


def run_chain_rank(cfg: dict[str, Any], job: Any, rank: int, world: int, dev: torch.device, out: Path) -> None:
    """One rank of a chain plan under Schedule1F1B or ScheduleGPipe; writes the same result file as the
    GraphPipe runtime (its timeline from PipelineStage's forward_one_chunk/backward_one_chunk)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from tapml.graphpipe.job import (
        batch_for,
        build_model,
        end_step,
        fault,
        optimizer,
        peak,
        program_for,
        sync,
    )
    from tapml.graphpipe.models import get_model

    plan = job.the_plan
    if plan.topology != "chain" or any(r != 1 for r in plan.replicas):
        raise TapmlError("torch.distributed.pipelining runs chain plans with one rank per stage "
                         "(plan with pipedream exact)")
    if len(plan.stages) != world:
        raise TapmlError(f"the chain has {len(plan.stages)} stages; launch it on as many ranks (got {world})")
    if plan.n_micro < world:
        raise TapmlError(f"PyTorch's schedules need at least as many micro-batches as stages ({plan.n_micro} < "
                         f"{world}); use a smaller micro-batch")
    if job.schedule not in SCHEDULES:
        raise TapmlError(f"unknown schedule {job.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    model = build_model(job, dev)
    prog = program_for(job, model, dev)
    mods = chain_stages(prog, prog.stage_layers)  # type: ignore[attr-defined]
    mine = mods[rank].to(dev)
    input_names = list(prog.inputs)
    del model, mods, prog  # the stage keeps its own parameters; the rest of the model goes
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    loss_fn = get_model(job.model).loss
    # Shapes are inferred from the first micro-batch (PipelineStage's dynamic mode), requires_grad included.
    stage = PipelineStage(mine, rank, world, dev)
    kind = Schedule1F1B if job.schedule == "1f1b" else ScheduleGPipe
    sched = kind(stage, n_microbatches=plan.n_micro, loss_fn=loss_fn)
    clock = Clock(dev)
    for kind, name in (("F", "forward_one_chunk"), ("B", "backward_one_chunk")):
        setattr(stage, name, _timed(getattr(stage, name), kind, rank, clock, mine if kind == "F" else None))
    params = {k.removeprefix("part."): p for k, p in mine.named_parameters()}
    opt = optimizer(job, list(params.values())) if params else None
    losses, step_s, records = [], [], []
    for step in range(job.steps):
        inputs, target = batch_for(job, step, dev)
        mine.set_batch(input_names, inputs, plan.n_micro)
        fault(cfg, job, rank, step)
        dist.barrier()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        clock.start()
        got: list[torch.Tensor] = []
        if rank == 0 and world == 1:
            sched.step(*inputs, target=target, losses=got)
        elif rank == 0:
            sched.step(*inputs)
        elif rank == world - 1:
            sched.step(target=target, losses=got)
        else:
            sched.step()
        sync(dev)
        step_s.append(time.perf_counter() - t0)
        records = [[x.kind, x.stage, x.mb, x.start, x.end] for x in clock.records()]
        losses.append(float(sum(x.detach() for x in got) / plan.n_micro) if got else 0.0)
        end_step(job, step, params, opt, out, rank)
    (out / f"{job.label}.rank{rank}.json").write_text(json.dumps(
        {"losses": losses, "step_s": step_s, "records": records, "peak_bytes": peak(dev), "stage": rank}))

"""A training Job and what every rank of one does whatever the engine (the GraphPipe runtime or
torch.distributed.pipelining): build its model, batches and optimizer, time, inject a test's fault, end a step.
It must not plan or launch."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tapml.errors import TapmlError
from tapml.graphpipe.graph import Program
from tapml.graphpipe.models import get_model
from tapml.graphpipe.planner import Plan

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class Job:
    label: str
    model: str
    plan: dict[str, Any]  # Plan.to_json()
    size: str = "tiny"
    dtype: str = "float32"
    steps: int = 1
    lr: float = 0.05
    optimizer: str = "sgd"
    schedule: str = "1f1b"
    engine: str = "graphpipe"  # or "pipelining": torch.distributed.pipelining on a chain plan (baselines)
    seed: int = 0
    dump_grads: bool = False  # write each rank's gradients after the first step (before the optimizer)

    @property
    def the_plan(self) -> Plan:
        return Plan.from_json(self.plan)


def batch_for(job: Job, step: int, device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    spec = get_model(job.model)
    inputs, target = spec.batch(job.the_plan.batch, job.size, DTYPES[job.dtype], seed=job.seed + 1000 * step)
    return tuple(t.to(device) for t in inputs), target.to(device)


def build_model(job: Job, device: torch.device) -> torch.nn.Module:
    return get_model(job.model).build(job.size, DTYPES[job.dtype], seed=job.seed).to(device)


def program_for(job: Job, model: torch.nn.Module, device: torch.device, depth: int | None = None) -> Program:
    """The model exported at the plan's micro-batch (every rank exports the same graph)."""
    plan = job.the_plan
    inputs, _ = batch_for(job, 0, device)
    prog = Program(model, tuple(t[: plan.micro_batch] for t in inputs), depth)
    names = [lay.name for lay in prog.layers]
    index = {n: i for i, n in enumerate(names)}
    missing = [n for s in plan.layer_names for n in s if n not in index]
    if missing:
        raise TapmlError(f"the plan names layers this model does not have ({', '.join(missing[:3])}); plan again")
    prog.stage_layers = [[index[n] for n in s] for s in plan.layer_names]  # type: ignore[attr-defined]
    return prog


def optimizer(job: Job, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if job.optimizer == "adam":
        return torch.optim.Adam(params, lr=job.lr)
    return torch.optim.SGD(params, lr=job.lr)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak(dev: torch.device) -> float:
    if dev.type == "cuda":
        return float(torch.cuda.max_memory_allocated(dev))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def fault(cfg: dict[str, Any], job: Job, rank: int, step: int) -> None:
    f = cfg.get("fault")
    if f and f["job"] == job.label and f["rank"] == rank and f["step"] == step:
        print(f"graphpipe rank {rank}: injected fault: {f['kind']} at step {step}", file=sys.stderr, flush=True)
        if f["kind"] == "die":
            os._exit(3)
        time.sleep(3600)


def end_step(job: Job, step: int, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer | None,
             out: Path, rank: int) -> None:
    """After a step's backward: the gradients of the first step written when the job asks, then the optimizer."""
    if job.dump_grads and step == 0 and params:
        torch.save({k: p.grad.detach().cpu() for k, p in params.items() if p.grad is not None},
                   out / f"{job.label}.grads{rank}.pt")
    if opt is not None:
        opt.step()
        opt.zero_grad()

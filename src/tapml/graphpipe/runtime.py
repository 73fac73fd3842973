"""The GraphPipe executor: each stage runs its part of the exported graph, receives every input from its producer,
sends every output to each consumer, sums the gradients its consumers send back, in exactly the order of
`Schedule.program`. Transports: point-to-point torch.distributed sends (gloo/NCCL, bounded waits) or an
in-process mailbox (the time-sliced run on one device, and tests).

It must not plan, launch processes or step optimizers: `launch` does the process side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from tapml.errors import TapmlError
from tapml.graphpipe.graph import Program
from tapml.graphpipe.schedule import FWD, Op, Schedule
from tapml.graphpipe.stages import StageModule


class PipelineError(TapmlError):
    """A rank could not finish its part of a step (a peer died, stopped answering, or sent the wrong thing)."""


@dataclass
class StageWiring:
    """Which values a stage exchanges on each stage edge, in the order both ends use."""

    module: StageModule
    recv: dict[tuple[int, int], list[str]]  # in-edge -> values, in the stage's input order
    send: dict[tuple[int, int], list[str]]  # out-edge -> values, in the stage's output order
    model_inputs: list[tuple[str, int]]  # (placeholder, index in the model's inputs)
    has_output: bool  # computes the model's output (and so the loss)


def wire(program: Program, stages: list[list[int]], edges: list[tuple[int, int]],
         only: set[int] | None = None) -> dict[int, StageWiring]:
    """The stage modules (all, or those in `only`) with what crosses each stage edge."""
    owner = {v: s for s, layers in enumerate(stages) for v in layers}
    mods = {s: program.stage(layers) for s, layers in enumerate(stages)}
    stage_of_value = {n: owner[program.layer_of[n]] for n in program.layer_of}
    consumers: dict[str, set[int]] = {}
    for s, m in mods.items():
        for v in m.inputs:
            consumers.setdefault(v, set()).add(s)
    out = {}
    for s, m in mods.items():
        if only is not None and s not in only:
            continue
        recv = {e: [v for v in m.inputs if stage_of_value.get(v) == e[0]] for e in edges if e[1] == s}
        send = {e: [v for v in m.outputs if e[1] in consumers.get(v, ())] for e in edges if e[0] == s}
        if any(not vals for vals in [*recv.values(), *send.values()]):
            raise AssertionError(f"stage {s}: a stage edge carries no value")
        inputs = [(v, program.inputs.index(v)) for v in m.inputs if v in program.inputs]
        out[s] = StageWiring(m, recv, send, inputs, program.output in m.outputs)
    return out


def value_like(program: Program, name: str) -> tuple[tuple[int, ...], torch.dtype]:
    val = program.node(name).meta["val"]
    return tuple(val.shape), val.dtype


class StageRunner:
    """One stage's forward and backward per micro-batch, holding what backward needs in between."""

    def __init__(self, stage: int, wiring: StageWiring, program: Program, n_micro: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device):
        self.stage, self.w, self.n_micro, self.loss_fn, self.device = stage, wiring, n_micro, loss_fn, device
        self.output = program.output
        self.like = {v: value_like(program, v) for vals in [*wiring.recv.values(), *wiring.send.values()]
                     for v in vals}
        self.saved: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None]] = {}
        self.loss_sum = 0.0

    def forward(self, mb: int, received: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...],
                target: torch.Tensor | None, micro_batch: int) -> dict[str, torch.Tensor]:
        args: dict[str, torch.Tensor] = {}
        for v, t in received.items():
            args[v] = t.detach().requires_grad_(t.is_floating_point())
        sl = slice(mb * micro_batch, (mb + 1) * micro_batch)
        for v, i in self.w.model_inputs:
            args[v] = inputs[i][sl]
        outs = self.w.module.module(*(args[v] for v in self.w.module.inputs))
        outs = dict(zip(self.w.module.outputs, outs))
        loss = None
        if self.w.has_output:
            # Each micro-batch's mean loss over M: the gradients add up to those of the whole batch's mean.
            loss = self.loss_fn(outs[self.output], target[sl]) / self.n_micro
            self.loss_sum += float(loss.detach())
        self.saved[mb] = (args, outs, loss)
        return outs

    def backward(self, mb: int, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`grads`: the summed gradient of each output some consumer sent back. Returns each received
        floating input's gradient (zeros where the stage did not use it)."""
        args, outs, loss = self.saved.pop(mb)
        tensors, seeds = [], []
        if loss is not None:
            tensors.append(loss)
            seeds.append(torch.ones_like(loss))
        for v, g in grads.items():
            if outs[v].requires_grad:
                tensors.append(outs[v])
                seeds.append(g)
        if tensors:
            torch.autograd.backward(tensors, seeds)
        return {v: (t.grad if t.grad is not None else torch.zeros_like(t)) for v, t in args.items()
                if v not in dict(self.w.model_inputs) and t.is_floating_point()}


# ----------------------------------------------------------------------------------------------- transports


class Mailbox:
    """In-process transport: a send is a dict entry its receive takes."""

    def __init__(self) -> None:
        self.box: dict[tuple[str, tuple[int, int], int, int], list[torch.Tensor]] = {}

    def send(self, op: Op, rank: int, tensors: list[torch.Tensor]) -> None:
        self.box[(*op.key(), op.peer)] = tensors

    def recv(self, op: Op, rank: int, like: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
        return self.box.pop((*op.key(), rank))

    def flush(self) -> None:
        if self.box:
            raise PipelineError(f"{len(self.box)} messages were sent that no stage received")


@dataclass
class P2P:
    """torch.distributed point-to-point: activations on one process group, gradients on another, so a
    gradient never queues behind an activation on NCCL's stream; every receive waits at most `timeout_s`; tags
    (gloo) make a mismatch an error instead of wrong data."""

    groups: dict[str, Any]
    device: torch.device
    timeout_s: float
    describe: Callable[[Op], str]
    pending: list[Any] = field(default_factory=list)

    @staticmethod
    def tag(op: Op, index: int) -> int:
        ch = 0 if op.channel == FWD else 1
        return ((op.edge[0] * 1031 + op.edge[1]) * 4099 + op.action.mb) * 64 * 2 + index * 2 + ch

    def send(self, op: Op, rank: int, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        for i, t in enumerate(tensors):
            t = t.detach().contiguous()
            try:
                self.pending.append((dist.isend(t, op.peer, group=self.groups[op.channel], tag=self.tag(op, i)),
                                     t, op))
            except RuntimeError as e:
                raise PipelineError(f"{self.describe(op)} failed: {_first(e)}") from None

    def recv(self, op: Op, rank: int, like: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
        import torch.distributed as dist

        out = []
        for i, (shape, dtype) in enumerate(like):
            t = torch.empty(shape, dtype=dtype, device=self.device)
            try:
                work = dist.irecv(t, op.peer, group=self.groups[op.channel], tag=self.tag(op, i))
                if not work.wait(timeout=timedelta(seconds=self.timeout_s)):
                    raise RuntimeError(f"no data after {self.timeout_s:.0f} s")
            except RuntimeError as e:
                raise PipelineError(f"{self.describe(op)} failed ({_first(e)}); rank {op.peer} died or "
                                    "stopped answering — see its log") from None
            out.append(t)
        return out

    def flush(self) -> None:
        for work, _t, op in self.pending:
            try:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
            except RuntimeError as e:
                raise PipelineError(f"{self.describe(op)} was never received ({_first(e)}); rank {op.peer} died "
                                    "or stopped answering — see its log") from None
        self.pending.clear()


def _first(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:100] if s else type(e).__name__


# ----------------------------------------------------------------------------------------------- execution


@dataclass
class Record:
    """When an action ran on a rank, relative to the step's start (seconds)."""

    kind: str
    stage: int
    mb: int
    start: float
    end: float


class Clock:
    """Host timestamps on the CPU; CUDA events on a GPU (so the host is never synchronized mid-step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t0: Any = None
        self.marks: list[tuple[str, int, int, Any, Any]] = []

    def now(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        self.t0 = self.now()
        self.marks.clear()

    def records(self) -> list[Record]:
        if self.cuda:
            torch.cuda.synchronize()
            return [Record(k, s, m, self.t0.elapsed_time(a) / 1e3, self.t0.elapsed_time(b) / 1e3)
                    for k, s, m, a, b in self.marks]
        return [Record(k, s, m, a - self.t0, b - self.t0) for k, s, m, a, b in self.marks]


def run_action(schedule: Schedule, rank: int, ops: list[Op], runners: dict[int, StageRunner], transport: Any,
               inputs: tuple[torch.Tensor, ...], target: torch.Tensor, micro_batch: int, clock: Clock) -> None:
    """The ops of one action (its receives, its compute, its sends) on `rank`."""
    got: dict[str, list[torch.Tensor]] = {}
    act = ops[0].action
    runner = runners[act.stage]
    w = runner.w
    for op in ops:
        if op.what == "recv":
            names = w.recv[op.edge] if op.channel == FWD else w.send[op.edge]
            names = names if op.channel == FWD else [v for v in names if runner.like[v][1].is_floating_point]
            for v, t in zip(names, transport.recv(op, rank, [runner.like[v] for v in names])):
                got.setdefault(v, []).append(t)
        elif op.what == "compute":
            t0 = clock.now()
            if act.kind == "F":
                result = runner.forward(act.mb, {v: ts[0] for v, ts in got.items()}, inputs, target, micro_batch)
            else:
                result = runner.backward(act.mb, {v: torch.stack(ts).sum(0) if len(ts) > 1 else ts[0]
                                                  for v, ts in got.items()})
            clock.marks.append((act.kind, act.stage, act.mb, t0, clock.now()))
        else:
            names = w.send[op.edge] if op.channel == FWD else w.recv[op.edge]
            names = names if op.channel == FWD else [v for v in names if runner.like[v][1].is_floating_point]
            transport.send(op, rank, [result[v] for v in names])


def split_program(schedule: Schedule, rank: int) -> list[list[Op]]:
    """A rank's program cut into its actions' op lists."""
    out: list[list[Op]] = []
    for op in schedule.program(rank):
        if not out or op.action != out[-1][0].action:
            out.append([])
        out[-1].append(op)
    return out


def run_local(schedule: Schedule, runners: dict[int, StageRunner], inputs: tuple[torch.Tensor, ...],
              target: torch.Tensor, micro_batch: int, order: list[tuple[int, Any]] | None = None,
              clock: Clock | None = None) -> list[Record]:
    """Every rank's program in one process (replicas of a stage share one runner, so their gradients add up
    as the all-reduce would). `order`: (rank, action) pairs to follow, e.g. the simulator's start order; by
    default ranks take turns, each running while its next action's inputs are there."""
    box = Mailbox()
    clock = clock or Clock(next(iter(runners.values())).device)
    clock.start()
    plans = {r: split_program(schedule, r) for r in schedule.actions}
    pos = dict.fromkeys(plans, 0)
    if order is not None:
        for r, _a in order:
            run_action(schedule, r, plans[r][pos[r]], runners, box, inputs, target, micro_batch, clock)
            pos[r] += 1
    else:
        left = sum(len(p) for p in plans.values())
        while left:
            moved = False
            for r, acts in plans.items():
                while pos[r] < len(acts) and all((*o.key(), r) in box.box for o in acts[pos[r]] if o.what == "recv"):
                    run_action(schedule, r, acts[pos[r]], runners, box, inputs, target, micro_batch, clock)
                    pos[r] += 1
                    left -= 1
                    moved = True
            if not moved:
                raise PipelineError("the schedule stopped: no rank can run its next action")
    box.flush()
    return clock.records()

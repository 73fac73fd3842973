"""GraphPipe's workflows as library calls (the CLI and the benchmark are skins over these): profile a model,
plan it with every planner, train a plan, and bench GraphPipe against 1F1B and GPipe in one launch.

It must not hold algorithms: it wires graph → planner → schedule/simulator → launch and reports.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tapml.errors import TapmlError
from tapml.graphpipe import draw
from tapml.graphpipe.cost import Hardware
from tapml.graphpipe.graph import LayerGraph, layer_graph
from tapml.graphpipe.launch import DTYPES, Job, Result, launch, train_local
from tapml.graphpipe.models import get_model
from tapml.graphpipe.planner import Plan, plan_graphpipe, plan_pipedream, plan_piper
from tapml.graphpipe.schedule import GPIPE, ONE_F_ONE_B, build
from tapml.graphpipe.simulator import Simulation, StageCosts, simulate

PRESETS = {
    # gloo over loopback between processes on one host
    "cpu": Hardware(memory=math.inf, bandwidth=2e9, latency=60e-6),
    # H200 over NVLink: ~139 GiB usable, point-to-point ~150 GB/s
    "cuda": Hardware(memory=0.92 * 139 * 2**30, bandwidth=150e9, latency=15e-6),
}
STATE = {"sgd": 2.0, "adam": 4.0}  # bytes of training state per parameter byte


def hardware(device: str, optimizer: str = "adam", memory_gb: float | None = None,
             bandwidth_gbs: float | None = None, latency_us: float | None = None) -> Hardware:
    if device not in PRESETS:
        raise TapmlError(f"unknown --device {device!r}; choose cpu or cuda")
    if optimizer not in STATE:
        raise TapmlError(f"unknown --optimizer {optimizer!r}; choose sgd or adam")
    base = PRESETS[device]
    for name, v in (("--memory-gb", memory_gb), ("--bandwidth-gbs", bandwidth_gbs), ("--latency-us", latency_us)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise TapmlError(f"{name} must be a positive number (got {v})")
    return Hardware(memory=memory_gb * 2**30 if memory_gb else base.memory,
                    bandwidth=bandwidth_gbs * 1e9 if bandwidth_gbs else base.bandwidth,
                    latency=latency_us * 1e-6 if latency_us else base.latency, state_factor=STATE[optimizer])


def check(devices: int, steps: int | None = None, batch: int | None = None) -> None:
    """The numbers a run needs, checked before any model is built."""
    if devices < 1:
        raise TapmlError(f"--devices must be ≥ 1 (got {devices})")
    if steps is not None and steps < 1:
        raise TapmlError(f"--steps must be ≥ 1 (got {steps})")
    if batch is not None and batch < 1:
        raise TapmlError(f"--batch must be ≥ 1 (got {batch})")


def default_batch(name: str, size: str) -> int:
    spec = get_model(name)
    spec.config(size)  # an unknown size is a one-line error here
    return spec.batch_size[size]


def profile(name: str, size: str = "tiny", device: str = "cpu", batch: int | None = None,
            dtype: str = "float32", cache: bool = True) -> LayerGraph:
    """The model's layer graph measured on `device` at two micro-batch sizes (cached on disk)."""
    spec = get_model(name)
    batch = batch or default_batch(name, size)
    if dtype not in DTYPES:
        raise TapmlError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    b1, b2 = max(1, batch // 16), max(2, batch // 2)
    model = spec.build(size, DTYPES[dtype])
    return layer_graph(f"{name}:{size}:{dtype}", model, lambda b: spec.batch(b, size, DTYPES[dtype])[0], (b1, b2),
                       device, cache=cache)[0]


@dataclass
class Plans:
    graph: LayerGraph
    hw: Hardware
    plans: dict[str, Plan] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    sims: dict[str, Simulation] = field(default_factory=dict)


def plan_all(lg: LayerGraph, devices: int, batch: int, hw: Hardware, micro: list[int] | None = None,
             piper: bool = True, piper_limit: int = 20_000) -> Plans:
    """GraphPipe, the PipeDream-style chain and (when asked) the Piper-style planner on the same graph, each
    simulated under 1F1B."""
    out = Plans(lg, hw)
    runs: list[tuple[str, Any]] = [("graphpipe", lambda: plan_graphpipe(lg, devices, batch, hw, micro)),
                                   ("pipedream", lambda: plan_pipedream(lg, devices, batch, hw, micro))]
    if piper:
        runs.append(("piper", lambda: plan_piper(lg, devices, batch, hw, micro, limit=piper_limit)))
    for name, fn in runs:
        try:
            p = fn()
        except TapmlError as e:
            out.errors[name] = str(e)
            continue
        out.plans[name] = p
        out.sims[name] = simulate(build(p, lg, ONE_F_ONE_B), StageCosts.of(p, lg), hw)
    if "graphpipe" not in out.plans:
        raise TapmlError(out.errors["graphpipe"])
    return out


def draw_plan(p: Plan, lg: LayerGraph, hw: Hardware, path: Path, measured: dict[int, list[list[Any]]] | None = None,
              kind: str = ONE_F_ONE_B) -> tuple[Path, Path]:
    """The stage DAG and the simulated timeline (and the measured one beside it) as HTML and PNG."""
    sim = simulate(build(p, lg, kind), StageCosts.of(p, lg), hw)
    rows = [[e.rank, e.action.kind, e.action.stage, e.action.mb, e.start, e.end] for e in sim.events]
    secs = [("stage DAG", draw.stage_dag_svg(p.layer_names, p.replicas, p.estimate.edges, p.describe())),
            ("simulated", draw.timeline_svg(rows, f"simulated {kind}: step {sim.step_s * 1e3:.3f} ms, "
                                                  f"bubble {sim.bubble:.0%}"))]
    panels = [(f"simulated {kind}", rows)]
    if measured:
        mrows = [[r, *x] for r, xs in measured.items() for x in xs]
        secs.append(("measured", draw.timeline_svg(mrows, "measured (one step)")))
        panels.append(("measured", mrows))
    html = draw.write_html(path.with_suffix(".html"), f"GraphPipe: {lg.model}", secs)
    png = draw.timeline_png(path.with_suffix(".png"), panels)
    return html, png


# ----------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """A measured run beside its prediction."""

    label: str
    plan: Plan
    schedule: str
    result: Result
    predicted: Simulation

    @property
    def step_s(self) -> float:
        """Median step after the first (warm-up) step."""
        xs = self.result.step_s[1:] or self.result.step_s
        return statistics.median(xs)

    @property
    def samples_s(self) -> float:
        return self.plan.batch / self.step_s

    def bubble(self) -> float | None:
        """Measured idle share of the ranks over the last step (from the per-action timeline)."""
        recs = self.result.records
        if not recs or not any(recs.values()):
            return None
        span = max(x[4] for xs in recs.values() for x in xs) - min(x[3] for xs in recs.values() for x in xs)
        busy = sum(x[4] - x[3] for xs in recs.values() for x in xs)
        return 1 - busy / (len(recs) * span) if span > 0 else None


def make_job(label: str, name: str, p: Plan, size: str, dtype: str, steps: int, lr: float, opt: str,
             schedule: str, engine: str) -> Job:
    return Job(label, name, p.to_json(), size=size, dtype=dtype, steps=steps, lr=lr, optimizer=opt,
               schedule=schedule, engine=engine)


def train(name: str, devices: int, steps: int, size: str = "tiny", device: str = "cpu", batch: int | None = None,
          dtype: str = "float32", lr: float = 1e-3, optimizer: str = "adam", hw: Hardware | None = None,
          out: Path | None = None, timeout_s: float = 120.0) -> tuple[Run, LayerGraph]:
    """Profile, plan with GraphPipe and train on `devices` ranks under torchrun."""
    check(devices, steps, batch)
    batch = batch or default_batch(name, size)
    hw = hw or hardware(device, optimizer)
    lg = profile(name, size, device, batch, dtype)
    p = plan_graphpipe(lg, devices, batch, hw)
    job = make_job("graphpipe", name, p, size, dtype, steps, lr, optimizer, ONE_F_ONE_B, "graphpipe")
    res = launch([job], devices, device, out, timeout_s=timeout_s)["graphpipe"]
    sim = simulate(build(p, lg, ONE_F_ONE_B), StageCosts.of(p, lg), hw)
    return Run("graphpipe", p, ONE_F_ONE_B, res, sim), lg


def bench(name: str, devices: int, steps: int = 6, size: str = "tiny", device: str = "cpu",
          batch: int | None = None, dtype: str = "float32", lr: float = 1e-3, optimizer: str = "adam",
          hw: Hardware | None = None, out: Path | None = None, micro: int | None = None,
          timeout_s: float = 120.0, with_dag: bool = True) -> tuple[list[Run], LayerGraph]:
    """GraphPipe's plan against the PipeDream-style chain run by torch.distributed.pipelining's 1F1B and
    GPipe, in one launch, with equal ranks, global batch and micro-batch. `with_dag`: also GraphPipe limited
    to one device per stage (the stage graph's own effect, without replicas), when that plan differs."""
    check(devices, steps, batch)
    batch = batch or default_batch(name, size)
    hw = hw or hardware(device, optimizer)
    lg = profile(name, size, device, batch, dtype)
    if micro is None:  # PyTorch's schedules need as many micro-batches as stages; all three use the same one
        fits = [b for b in range(1, batch + 1) if batch % b == 0 and batch // b >= devices]
        if not fits:
            raise TapmlError(f"a batch of {batch} cannot make {devices} micro-batches; give --batch ≥ {devices}")
        micro = fits[-1]
    if batch % micro:
        raise TapmlError(f"--micro-batch {micro} must divide the batch {batch}")
    gp = plan_graphpipe(lg, devices, batch, hw, [micro])
    dag = plan_graphpipe(lg, devices, batch, hw, [micro], replicate=False)
    chain = plan_pipedream(lg, devices, batch, hw, [micro], exact=True)
    plans = [gp, dag, chain, chain]
    jobs = [make_job("graphpipe", name, gp, size, dtype, steps, lr, optimizer, ONE_F_ONE_B, "graphpipe"),
            make_job("graphpipe-1dev", name, dag, size, dtype, steps, lr, optimizer, ONE_F_ONE_B, "graphpipe"),
            make_job("1f1b", name, chain, size, dtype, steps, lr, optimizer, ONE_F_ONE_B, "pipelining"),
            make_job("gpipe", name, chain, size, dtype, steps, lr, optimizer, GPIPE, "pipelining")]
    if not with_dag or (dag.stages, dag.replicas) == (gp.stages, gp.replicas):
        del plans[1], jobs[1]
    res = launch(jobs, devices, device, out, timeout_s=timeout_s)
    runs = []
    for j, p in zip(jobs, plans):
        sim = simulate(build(p, lg, j.schedule), StageCosts.of(p, lg), hw)
        runs.append(Run(j.label, p, j.schedule, res[j.label], sim))
    return runs, lg


def time_sliced(name: str, p: Plan, lg: LayerGraph, size: str, device: str, dtype: str, steps: int = 4,
                hw: Hardware | None = None) -> tuple[float, float, Result]:
    """The plan's schedule run on ONE device, every stage in turn (the simulator's start order): (predicted
    seconds of all its actions back to back, measured median step seconds, the result)."""
    import torch

    job = Job("sliced", name, p.to_json(), size=size, dtype=dtype, steps=steps)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # as profiled
    try:
        res = train_local(job, device, order="simulated")
    finally:
        torch.set_num_threads(threads)
    sched = build(p, lg, ONE_F_ONE_B)
    costs = StageCosts.of(p, lg)
    predicted = sum(costs.fwd[a.stage] if a.kind == "F" else costs.bwd[a.stage]
                    for acts in sched.actions.values() for a in acts)
    return predicted, statistics.median(res.step_s[1:] or res.step_s), res


def fmt_bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.1f} {unit}" if unit != "B" else f"{x:.0f} B"
        x /= 1024
    return f"{x:.1f} GiB"


def peak(run: Run) -> float:
    return max(run.result.peak_bytes.values(), default=0.0)


__all__ = ["PRESETS", "Plans", "Run", "bench", "draw_plan", "hardware", "peak", "plan_all", "profile", "time_sliced",
           "train"]

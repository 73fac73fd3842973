"""Training runs: a Job (model, plan, schedule, steps) trained in one process (the time-sliced run, tests, the
single-process reference) or on N ranks launched by torchrun (`python -m torch.distributed.run`), each rank
writing its losses, step times, action timeline and peak memory to a JSON file the launcher reads back.

It must not plan: a Job carries its Plan. Every wait is bounded; a launch that outlives its limit is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from tapml.errors import TapmlError
from tapml.graphpipe.graph import Program
from tapml.graphpipe.job import (  # noqa: F401
    DTYPES,
    Job,
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
from tapml.graphpipe.runtime import (
    P2P,
    Clock,
    PipelineError,
    StageRunner,
    run_action,
    run_local,
    split_program,
    wire,
)
from tapml.graphpipe.schedule import Schedule, build

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Result:
    """What a run measured: the loss of each step, step seconds, the last step's action timeline per rank, peak
    bytes per rank, and (when asked) the gradients after the first step by parameter name."""

    label: str
    losses: list[float]
    step_s: list[float]
    records: dict[int, list[list[Any]]] = field(default_factory=dict)
    peak_bytes: dict[int, float] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)


def dag_schedule(job: Job, prog: Program) -> Schedule:
    """The plan's schedule with direct stage-to-stage edges (the GraphPipe runtime sends straight to consumers,
    whatever planner made the stages)."""
    from tapml.graphpipe.cost import DAG

    plan = job.the_plan
    plan.stages = prog.stage_layers  # type: ignore[attr-defined]
    plan.topology = DAG
    return build(plan, _structure(prog), job.schedule)


def _structure(prog: Program) -> Any:
    """A cost-free LayerGraph of the program (the schedule only needs its edges)."""
    from tapml.graphpipe.graph import LayerCost, LayerGraph

    layers = [LayerCost(x.name, (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), 0) for x in prog.layers]
    return LayerGraph("program", "", layers, {e: 0.0 for e in prog.edges()}, prog.layer_of[prog.output])


# ----------------------------------------------------------------------------------------------- one process


def train_local(job: Job, device: str = "cpu", order: str = "turns") -> Result:
    """Train the job's plan in this process, every stage on `device` in schedule order (the time-sliced run).
    `order`: "turns" (ranks take turns) or "simulated" (the simulator's start order)."""
    dev = torch.device(device)
    model = build_model(job, dev)
    prog = program_for(job, model, dev)
    sched = dag_schedule(job, prog)
    plan = job.the_plan
    spec = get_model(job.model)
    wiring = wire(prog, prog.stage_layers, sched.edges)  # type: ignore[attr-defined]
    runners = {s: StageRunner(s, w, prog, plan.n_micro, spec.loss, dev) for s, w in wiring.items()}
    params = {k: p for r in runners.values() for k, p in r.w.module.parameters().items()}
    opt = optimizer(job, list(params.values()))
    res = Result(job.label, [], [])
    seq = None
    if order == "simulated":
        from tapml.graphpipe.simulator import StageCosts, simulate

        costs = StageCosts([1.0] * sched.n_stages, [2.0] * sched.n_stages, [0.0] * sched.n_stages,
                           [0.0] * sched.n_stages)
        seq = [(e.rank, e.action) for e in simulate(sched, costs).events]
    for step in range(job.steps):
        inputs, target = batch_for(job, step, dev)
        for r in runners.values():
            r.loss_sum = 0.0
        sync(dev)
        t0 = time.perf_counter()
        recs = run_local(sched, runners, inputs, target, plan.micro_batch, seq)
        sync(dev)
        res.step_s.append(time.perf_counter() - t0)
        res.losses.append(sum(r.loss_sum for r in runners.values()))
        res.records = {0: [[x.kind, x.stage, x.mb, x.start, x.end] for x in recs]}
        if job.dump_grads and step == 0:
            res.grads = {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    if dev.type == "cuda":
        res.peak_bytes = {0: float(torch.cuda.max_memory_allocated(dev))}
    return res


def train_reference(job: Job, device: str = "cpu") -> Result:
    """The same training without any pipeline: the whole batch through the original model in one process."""
    dev = torch.device(device)
    model = build_model(job, dev)
    spec = get_model(job.model)
    opt = optimizer(job, list(model.parameters()))
    res = Result(job.label + ":reference", [], [])
    for step in range(job.steps):
        inputs, target = batch_for(job, step, dev)
        t0 = time.perf_counter()
        loss = spec.loss(model(*inputs), target)
        loss.backward()
        sync(dev)
        res.step_s.append(time.perf_counter() - t0)
        res.losses.append(float(loss.detach()))
        if job.dump_grads and step == 0:
            res.grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    return res


# ----------------------------------------------------------------------------------------------- torchrun side


def run_job_rank(cfg: dict[str, Any], job: Job, rank: int, world: int, dev: torch.device, groups: dict[str, Any],
                 out: Path) -> None:
    import torch.distributed as dist

    timeout = cfg["timeout_s"]
    model = build_model(job, dev)
    prog = program_for(job, model, dev)
    sched = dag_schedule(job, prog)
    plan = job.the_plan
    if plan.devices > world:
        raise TapmlError(f"the plan needs {plan.devices} ranks; this launch has {world}")
    replica_groups = {s: dist.new_group(rs, timeout=timedelta(seconds=timeout)) for s, rs in enumerate(sched.ranks)
                      if len(rs) > 1}
    stage = sched.stage_of(rank)
    runners: dict[int, StageRunner] = {}
    if stage is not None:
        w = wire(prog, prog.stage_layers, sched.edges, only={stage})  # type: ignore[attr-defined]
        runners = {stage: StageRunner(stage, w[stage], prog, plan.n_micro, get_model(job.model).loss, dev)}
    del model, prog  # the stage module keeps its own parameters; the rest of the model goes
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    params = runners[stage].w.module.parameters() if runners else {}
    opt = optimizer(job, list(params.values())) if params else None

    def describe(op: Any) -> str:
        kind = "activation" if op.channel == "fwd" else "gradient"
        verb = "receiving" if op.what == "recv" else "sending"
        return (f"{verb} the {kind} of stage edge {op.edge[0]}→{op.edge[1]} (micro-batch {op.action.mb}) "
                f"{'from' if op.what == 'recv' else 'to'} rank {op.peer}")

    transport = P2P(groups, dev, timeout, describe)
    clock = Clock(dev)
    res = Result(job.label, [], [])
    acts = split_program(sched, rank)
    for step in range(job.steps):
        inputs, target = batch_for(job, step, dev)
        try:
            dist.barrier(group=groups["fwd"])
        except RuntimeError as e:
            raise PipelineError(f"the start of step {step} failed ({str(e).strip()[:120]}); a rank died or "
                                "stopped answering — see the other ranks' lines") from None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        clock.start()
        for r in runners.values():
            r.loss_sum = 0.0
        fault(cfg, job, rank, step)
        for ops in acts:
            run_action(sched, rank, ops, runners, transport, inputs, target, plan.micro_batch, clock)
        transport.flush()
        if stage in replica_groups and params:
            flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                              for p in params.values()])
            dist.all_reduce(flat, group=replica_groups[stage])
            i = 0
            for p in params.values():
                n = p.numel()
                p.grad = flat[i:i + n].view_as(p).clone()
                i += n
        sync(dev)
        res.step_s.append(time.perf_counter() - t0)
        res.losses.append(sum(r.loss_sum for r in runners.values()))
        res.records = {rank: [[x.kind, x.stage, x.mb, x.start, x.end] for x in clock.records()]}
        end_step(job, step, params, opt, out, rank)
    res.peak_bytes = {rank: peak(dev)}
    (out / f"{job.label}.rank{rank}.json").write_text(json.dumps(
        {"losses": res.losses, "step_s": res.step_s, "records": res.records[rank], "peak_bytes": res.peak_bytes[rank],
         "stage": stage}))


def worker(config_path: str) -> int:
    """The torchrun entry point of every rank."""
    import torch.distributed as dist

    cfg = json.loads(Path(config_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    out = Path(cfg["out"])
    if cfg["device"] == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    try:
        kw = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg["timeout_s"]), **kw)
        groups = {ch: dist.new_group(list(range(world)), timeout=timedelta(seconds=cfg["timeout_s"]))
                  for ch in ("fwd", "bwd")}
        for jd in cfg["jobs"]:
            job = Job(**jd)
            if job.engine == "pipelining":
                from tapml.graphpipe.baselines import run_chain_rank

                run_chain_rank(cfg, job, rank, world, dev, out)
            else:
                run_job_rank(cfg, job, rank, world, dev, groups, out)
            dist.barrier(group=groups["fwd"])
        dist.destroy_process_group()
        return 0
    except Exception as e:  # a rank's last word: one line for the launcher to quote (traceback on request)
        if os.environ.get("TAPML_GRAPHPIPE_DEBUG"):
            import traceback

            traceback.print_exc()
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        print(f"graphpipe rank {rank}: {lines[0][:400] if lines else type(e).__name__}", file=sys.stderr, flush=True)
        return 1


def launch(jobs: list[Job], nprocs: int, device: str = "cpu", out: str | Path | None = None,
           timeout_s: float = 60.0, fault: dict[str, Any] | None = None, limit_s: float = 600.0,
           threads: int = 1) -> dict[str, Result]:
    """Run the jobs one after another on `nprocs` ranks under torchrun; results by job label. Any rank's failure
    ends the launch with a TapmlError quoting every rank's one-line reason."""
    import tempfile

    if nprocs < 1:
        raise TapmlError(f"--devices must be ≥ 1 (got {nprocs})")
    if device == "cuda" and torch.cuda.device_count() < nprocs:
        raise TapmlError(f"{nprocs} ranks need {nprocs} GPUs; this machine has {torch.cuda.device_count()}")
    outdir = Path(out or tempfile.mkdtemp(prefix="graphpipe-"))
    outdir.mkdir(parents=True, exist_ok=True)
    for f in [*outdir.glob("*.rank*.json"), *outdir.glob("*.grads*.pt")]:  # nothing stale is read back
        f.unlink()
    cfg = {"jobs": [asdict(j) for j in jobs], "device": device, "out": str(outdir), "timeout_s": timeout_s,
           "fault": fault}
    path = outdir / "config.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, **NCCL_ENV, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "TORCHELASTIC_ERROR_FILE": str(outdir / "error.json")}
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
           str(nprocs), "--max-restarts", "0", "--monitor-interval", "0.2", "-m", "tapml.graphpipe.launch",
           str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise TapmlError(f"the launch passed its {limit_s:.0f} s limit and was stopped; log in {outdir}") from None
    (outdir / "log.txt").write_text(log)
    if proc.returncode != 0:
        reasons = [ln for ln in log.splitlines() if ln.startswith("graphpipe rank")]
        errs = [ln for ln in log.splitlines() if "Error:" in ln]
        last = errs[-1].strip() if errs else f"exit code {proc.returncode}"
        raise TapmlError(f"training failed: {'; '.join(reasons) or last} (log: {outdir / 'log.txt'})")
    results = {}
    for j in jobs:
        res = Result(j.label, [], [])
        files = sorted(outdir.glob(f"{j.label}.rank*.json"))
        per = {int(f.name.rsplit("rank", 1)[1].split(".")[0]): json.loads(f.read_text()) for f in files}
        steps = len(next(iter(per.values()))["losses"]) if per else 0
        res.losses = [sum(p["losses"][i] for p in per.values()) for i in range(steps)]
        res.step_s = [max(p["step_s"][i] for p in per.values()) for i in range(steps)]
        res.records = {r: p["records"] for r, p in per.items()}
        res.peak_bytes = {r: p["peak_bytes"] for r, p in per.items()}
        for g in outdir.glob(f"{j.label}.grads*.pt"):
            res.grads.update(torch.load(g, weights_only=True))  # tensors only, never pickled code
        results[j.label] = res
    return results


if __name__ == "__main__":
    try:
        code = worker(sys.argv[1])
    except PipelineError as e:  # raised outside a job (never expected): still one line
        print(f"graphpipe rank ?: {e}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)

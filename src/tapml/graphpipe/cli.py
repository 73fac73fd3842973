"""`tapml graphpipe plan|train|bench`: a typer sub-app over tapml.graphpipe.api (the lead mounts it with
`app.add_typer(graphpipe_app, name="graphpipe")`); `python -m tapml.graphpipe.cli` runs it alone.

It parses, calls one API function, renders tables and pictures; it must not hold logic. TapmlError → one line,
exit 2 (tapml's main does the same for the mounted app).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tapml.errors import TapmlError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="GraphPipe: train a multi-branch model as a DAG of pipeline stages (plan, train, bench).")
out = Console(highlight=False, width=160)

MODEL = typer.Argument(..., help="mmt2, mmt4, dlrm or uno")
DEVICES = typer.Option(..., "--devices", help="pipeline devices (ranks)")
SIZE = typer.Option("tiny", "--size", help="tiny (CPU) or gpu")
DEVICE = typer.Option("cpu", "--device", help="cpu (gloo) or cuda (NCCL)")
BATCH = typer.Option(None, "--batch", help="global batch (default: the model's)")
DTYPE = typer.Option("float32", "--dtype", help="float32, float64 or bfloat16")
OPT = typer.Option("adam", "--optimizer", help="sgd or adam (sets training state per parameter)")
MEM = typer.Option(None, "--memory-gb", help="memory per device for the planner (default: cpu unlimited, cuda H200)")
BW = typer.Option(None, "--bandwidth-gbs", help="device-to-device bandwidth the planner assumes, GB/s")
LAT = typer.Option(None, "--latency-us", help="per-message latency the planner assumes, µs")
OUT = typer.Option(Path("graphpipe-out"), "--out", help="folder for the pictures and the run's files")
PIPER = typer.Option(True, help="also run the (slow) Piper-style planner")
LR = typer.Option(1e-3, "--lr")
MICRO = typer.Option(None, "--micro-batch", help="micro-batch of all three (default: the largest giving ≥ N)")


def _out_dir(path: Path) -> Path:
    from tapml.paths import check_output_dir

    p = check_output_dir(path, "--out")
    p.mkdir(parents=True, exist_ok=True)
    return p


def _ms(x: float) -> str:
    return f"{x * 1e3:.3f}"


@app.command("plan")
def plan_cmd(model: str = MODEL, devices: int = DEVICES, size: str = SIZE, device: str = DEVICE,
             batch: int | None = BATCH, dtype: str = DTYPE, optimizer: str = OPT, memory_gb: float | None = MEM,
             bandwidth_gbs: float | None = BW, latency_us: float | None = LAT,
             piper: bool = PIPER, out_dir: Path = OUT) -> None:
    """Profile MODEL, plan it with GraphPipe, PipeDream and Piper; print and draw the stage DAG and schedule."""
    from tapml.graphpipe import api

    api.check(devices, batch=batch)
    folder = _out_dir(out_dir)
    hw = api.hardware(device, optimizer, memory_gb, bandwidth_gbs, latency_us)
    b = batch or api.default_batch(model, size)
    lg = api.profile(model, size, device, b, dtype)
    res = api.plan_all(lg, devices, b, hw, piper=piper)
    t = Table(title=f"{escape(model)} ({size}) on {devices} devices, batch {b}, {len(lg)} layers")
    for c in ("planner", "stages", "depth", "micro-batch", "predicted ms", "simulated ms", "bubble",
              "peak/device", "search ms"):
        t.add_column(c)
    for name, p in res.plans.items():
        sim = res.sims[name]
        t.add_row(name, f"{len(p.stages)} ({'+'.join(map(str, p.replicas))} dev)", str(p.estimate.depth),
                  f"{p.micro_batch} × {p.n_micro}", _ms(p.estimate.step_s), _ms(sim.step_s), f"{sim.bubble:.0%}",
                  api.fmt_bytes(max(sim.peak_memory.values())), f"{p.search_s * 1e3:.1f}")
    for name, e in res.errors.items():
        t.add_row(name, escape(e), *[""] * 7)
    out.print(t)
    gp = res.plans["graphpipe"]
    for s, (names, r) in enumerate(zip(gp.layer_names, gp.replicas)):
        out.print(f"stage {s} ({r} device{'s' if r > 1 else ''}, {gp.estimate.inflight[s]} in flight): "
                  f"{escape(', '.join(names))}")
    html, png = api.draw_plan(gp, lg, hw, folder / f"plan-{model}-{devices}")
    out.print(f"pictures: {html} {png}")


@app.command("train")
def train_cmd(model: str = MODEL, devices: int = DEVICES, steps: int = typer.Option(5, "--steps"),
              size: str = SIZE, device: str = DEVICE, batch: int | None = BATCH, dtype: str = DTYPE,
              optimizer: str = OPT, lr: float = LR, memory_gb: float | None = MEM,
              bandwidth_gbs: float | None = BW, latency_us: float | None = LAT, out_dir: Path = OUT) -> None:
    """Plan MODEL with GraphPipe and train it for S steps on N ranks (torchrun; gloo or NCCL)."""
    from tapml.graphpipe import api

    folder = _out_dir(out_dir)
    hw = api.hardware(device, optimizer, memory_gb, bandwidth_gbs, latency_us)
    run, lg = api.train(model, devices, steps, size, device, batch, dtype, lr, optimizer, hw, folder / "run")
    out.print(run.plan.describe())
    for i, (loss, s) in enumerate(zip(run.result.losses, run.result.step_s)):
        out.print(f"step {i}: loss {loss:.6f}  {s * 1e3:.2f} ms")
    bub = run.bubble()
    out.print(f"{run.samples_s:.1f} samples/s; step {_ms(run.step_s)} ms measured, {_ms(run.predicted.step_s)} ms "
              f"simulated; bubble {bub if bub is None else f'{bub:.0%}'} measured, {run.predicted.bubble:.0%} "
              f"simulated; peak {api.fmt_bytes(api.peak(run))} per rank")
    html, png = api.draw_plan(run.plan, lg, hw, folder / f"train-{model}-{devices}", run.result.records)
    out.print(f"pictures: {html} {png}")


@app.command("bench")
def bench_cmd(model: str = MODEL, devices: int = DEVICES, steps: int = typer.Option(6, "--steps"),
              size: str = SIZE, device: str = DEVICE, batch: int | None = BATCH, dtype: str = DTYPE,
              optimizer: str = OPT, micro: int | None = MICRO, memory_gb: float | None = MEM,
              bandwidth_gbs: float | None = BW, latency_us: float | None = LAT, out_dir: Path = OUT) -> None:
    """GraphPipe (and GraphPipe with one device per stage) against 1F1B and GPipe (torch.distributed.pipelining)
    in one launch."""
    from tapml.graphpipe import api

    folder = _out_dir(out_dir)
    hw = api.hardware(device, optimizer, memory_gb, bandwidth_gbs, latency_us)
    runs, lg = api.bench(model, devices, steps, size, device, batch, dtype, 1e-3, optimizer, hw, folder / "bench",
                         micro)
    out.print(render_bench(runs))
    html, png = api.draw_plan(runs[0].plan, lg, hw, folder / f"bench-{model}-{devices}", runs[0].result.records)
    out.print(f"pictures: {html} {png}")


def render_bench(runs: list) -> Table:
    from tapml.graphpipe import api

    t = Table(title="measured beside simulated (median step after the first)")
    for c in ("schedule", "stages", "samples/s", "step ms", "simulated ms", "bubble", "sim bubble", "peak/rank"):
        t.add_column(c)
    for r in runs:
        b = r.bubble()
        t.add_row(r.label, f"{len(r.plan.stages)} (depth {r.plan.estimate.depth})", f"{r.samples_s:.1f}",
                  _ms(r.step_s), _ms(r.predicted.step_s), "n/a" if b is None else f"{b:.0%}",
                  f"{r.predicted.bubble:.0%}", api.fmt_bytes(api.peak(r)))
    return t


def main() -> None:
    """Run the sub-app alone (tapml's own main does the same for the mounted app)."""
    import importlib

    usage: tuple[type, ...] = ()
    for name in ("typer._click.exceptions", "click.exceptions"):  # typer ≥ 0.20 vendors its own click
        try:
            usage += (importlib.import_module(name).ClickException,)
        except ImportError:
            continue
    try:
        code = app(standalone_mode=False, prog_name="tapml graphpipe")
    except TapmlError as e:
        print(f"tapml: error: {e}", file=sys.stderr)
        sys.exit(2)
    except usage as e:
        print(f"tapml: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""`tapml parallel ...`: decode a model under a plan through torchrun and time it beside the analytic model's
prediction (`decode`), or print the analytic model's table and choice (`advise`).

A typer sub-app (the lead wires it with `app.add_typer(parallel_app, name="parallel")`); it parses and renders,
the work lives in run.py and costmodel.py. It launches torchrun (torch.distributed.run), never its own workers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from tapml.errors import TapmlError

if TYPE_CHECKING:
    from tapml.parallel import costmodel

# Named here, not imported: `tapml --help` must not import torch and transformers to print them.
MODELS_HELP = "llama3-8b, llama3-8b-mqa, or their CPU sizes llama3-8b-small, llama3-8b-mqa-small"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache parallelism for long-context decode: run plans, or ask which to use.")
# Tables are wide: a pipe or a log gets 160 columns instead of rich's 80.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def launch(model: str, plan: str, devices: int, args: list[str], *, timeout_s: float = 3600.0,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the decode driver under torchrun on `devices` processes (one for plan single) and return rank 0's
    JSON result; a failed run raises TapmlError with the workers' last lines."""
    from tapml.parallel.run import NCCL_ENV

    n = 1 if plan == "single" else devices
    with tempfile.TemporaryDirectory(prefix="tapml-parallel-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "--max-restarts=0", "-m", "tapml.parallel.run", model, "--plan", plan, "--out", str(result), *args]
        full_env = {**os.environ, **NCCL_ENV, **(env or {})}
        try:
            proc = subprocess.run(cmd, check=False, env=full_env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TapmlError(f"plan {plan} on {n} process(es) ran past {timeout_s:.0f} s; cut --context or "
                             "--steps") from None
        if proc.returncode != 0 or not result.exists():
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "*****" not in ln]
            # the workers' own words first (our one-line errors, an exception's last line), torchrun's after
            said = [ln for ln in lines if ln.startswith("tapml") or re.match(r"^[\w.]*(Error|Exception)\b", ln)
                    and "ChildFailedError" not in ln] or lines[-3:]
            raise TapmlError(f"plan {plan} failed (exit {proc.returncode}): " + " | ".join(said[-3:]))
        return json.loads(result.read_text())


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.2f}"


def _bytes(x: float | None) -> str:
    return "—" if x is None else f"{x / (1 << 30):.2f} GiB" if x >= 1 << 28 else f"{x / (1 << 20):.1f} MiB"


def render_decode(r: dict[str, Any]) -> Table:
    """One run beside its prediction."""
    job, pred = r["job"], r["predicted"]
    best = pred.get("calibrated", pred["nominal"])
    t = Table(title=f"{job['model']} · {r['plan']} · context {job['context']} · batch {job['batch']} · "
                    f"{job['device']} {job['dtype']} · {job.get('mode', 'eager')}"
                    + ("" if r.get("graph_agrees_with_eager") in (None, True) else " · GRAPH TOKENS DIFFER FROM EAGER"))
    for col in ("measured ms/step", "predicted ms/step", "predicted/measured", "tokens/s", "comm share",
                "peak memory/device", "KV per shard", "fill"):
        t.add_column(col, justify="right")
    peak = max((p["peak_bytes"] or 0) for p in r["per_rank"])
    t.add_row(_ms(r["median_s"]), f"{_ms(best['t_step'])} ({'calibrated' if 'calibrated' in pred else 'nominal'})",
              f"{best['t_step'] / r['median_s']:.2f}", f"{r['tokens_per_s']:.1f}",
              "—" if r["comm_share"] is None else f"{r['comm_share']:.0%}", _bytes(peak),
              " ".join(str(x) for x in r["shard_lengths"]), r["fill"])
    return t


@app.command()
def decode(model: str = typer.Argument(..., help=MODELS_HELP),
           plan: str = typer.Option("cp", help="single, tp, cp or hybrid"),
           context: str = typer.Option("4k", help="context tokens: 4096, 128k, 1M"),
           devices: int = typer.Option(2, help="processes (GPUs with --device cuda); plan single uses one"),
           device: str = typer.Option("cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)"),
           dtype: str = typer.Option("", help="float32 on the CPU, bfloat16 on CUDA by default"),
           steps: int = typer.Option(32, help="timed decode steps (median reported)"),
           batch: int = typer.Option(1, help="sequences decoded together"),
           layers: int | None = typer.Option(None, help="keep only this many decoder layers (faster runs)"),
           placement: str = typer.Option("interleaved", help="interleaved (token i on rank i mod N) or contiguous"),
           form: str = typer.Option("tree", help="merge: tree (all-reduces) or all-gather"),
           fill: str = typer.Option("prefill", help="prefill the real context, or tile: prefill --prefill-max "
                                                    "tokens and repeat their KV (timing only)"),
           prefill_max: str = typer.Option("32k", help="real tokens prefilled with --fill tile"),
           chunk: str = typer.Option("2k", help="prefill chunk"),
           calibrate: bool = typer.Option(True, help="measure this machine for the prediction"),
           mode: str = typer.Option("", help="eager (growing cache, steps issued from Python), static (the "
                                             "preallocated cache, eagerly) or graph (its step captured as a CUDA "
                                             "graph: the device's time); default graph on cuda, eager on cpu"),
           json_out: str | None = typer.Option(None, "--json", help="write the full result here")) -> None:
    """Run MODEL under a plan on N processes through torchrun, time its decode steps, print the analytic
    model's prediction beside the measurement."""
    from tapml.parallel import models
    from tapml.parallel.costmodel import PLANS

    s = models.shape(model, layers)
    n = 1 if plan == "single" else devices
    if plan not in PLANS:
        raise TapmlError(f"unknown --plan {plan!r}; choose one of {', '.join(PLANS)}")
    if devices < 1:
        raise TapmlError(f"--devices must be ≥ 1 (got {devices})")
    from tapml.parallel.plans import check

    check(plan, s, n)
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    args = ["--context", str(models.parse_tokens(context)), "--device", device, "--dtype", dtype,
            "--steps", str(steps), "--batch", str(batch), "--placement", placement, "--form", form,
            "--fill", fill, "--prefill-max", str(models.parse_tokens(prefill_max)),
            "--chunk", str(models.parse_tokens(chunk)), "--mode", mode or ("graph" if device == "cuda" else "eager")]
    if layers is not None:
        args += ["--layers", str(layers)]
    if calibrate:
        args.append("--calibrate")
    r = launch(model, plan, n, args)
    out.print(render_decode(r))
    out.print(f"plan: {r['plan']}; greedy tokens agree on every rank: {r['ranks_agree']}", markup=False)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(r, indent=1))


def render_advice(a: costmodel.Advice, title: str) -> Table:
    """Per device and per step: what each plan reads, sends and holds; its time on the hardware alone and
    under the eager driver (host issue time included)."""
    t = Table(title=title)
    for col in ("plan", "devices", "weights read", "KV read", "KV copies", "collectives", "sent",
                "memory", "fits", "device ms", "eager ms", "tokens/s"):
        t.add_column(col, justify="right")
    for c in a.costs:
        t.add_row(("→ " if c.plan == a.best else "") + c.plan, str(c.devices), _bytes(c.weight_bytes),
                  _bytes(c.kv_bytes), f"{c.kv_duplication:.0f}x", str(c.comm_count), _bytes(c.comm_bytes),
                  _bytes(c.memory_bytes), "yes" if c.fits else "no", _ms(c.t_device), _ms(c.t_step),
                  f"{1 / c.t_device:.0f}")
    return t


@app.command()
def advise(model: str = typer.Argument(..., help=MODELS_HELP),
           context: str = typer.Option("128k", help="context tokens: 32k, 128k, 1M"),
           devices: int = typer.Option(8, help="devices available"),
           device: str = typer.Option("h200", help="device description: h200, h100 or cpu"),
           batch: int = typer.Option(1, help="sequences decoded together"),
           dtype_bytes: int = typer.Option(2, help="bytes per weight and KV element (2: bf16)"),
           layers: int | None = typer.Option(None, help="count only this many decoder layers"),
           eager: bool = typer.Option(False, help="rank by the eager step (host issue time included)")) -> None:
    """The analytic model's table for every plan, and the plan it names with why."""
    if devices < 1 or batch < 1 or dtype_bytes < 1:
        raise TapmlError("--devices, --batch and --dtype-bytes must be ≥ 1")
    from tapml.parallel import costmodel, models

    s = models.shape(model, layers)
    ctx = models.parse_tokens(context)
    dev = costmodel.device(device)
    a = costmodel.advise(s, ctx, batch=batch, devices=devices, dev=dev, dtype_bytes=dtype_bytes, eager=eager)
    out.print(render_advice(a, f"{s.name} · context {ctx} · batch {batch} · {devices}× {dev.name} "
                               f"({dev.calibrated} figures)"))
    out.print(f"choice: {a.best or 'none'} — {a.why}", markup=False)


def main() -> None:
    """`python -m tapml.parallel.cli`: the sub-app alone, with tapml's error convention (one line, exit 2)."""
    import click

    try:
        code = app(standalone_mode=False, prog_name="tapml parallel")
    except TapmlError as e:
        print(f"tapml: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.UsageError as e:
        print(f"tapml: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

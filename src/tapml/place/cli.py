"""`tapml place MODEL --backends inductor,tvm,torch-cuda --device cuda [--budget 10m] [--html report.html]`: place
a placement model on the fastest correct backends and print (and draw) the result.

A typer app (`app`) with one command (`place_command`), mounted by the lead as a command of `tapml`; it parses and
renders only, imports nothing heavy at module level (`tapml --help` stays fast), the work lives in api.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import typer

from tapml.errors import TapmlError

# Named here, not imported: the catalogue lives in models.py, which imports torch.
MODELS_HELP = "resnext50, mobilenetv2, r3d18, bert, dcgan, nasnet, llama"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Place each subgraph of a model on the fastest correct backend (Collage).")


def parse_budget(text: str) -> float:
    """'90', '90s', '10m', '1h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise TapmlError(f"--budget {text!r}: give seconds or a duration like 30s, 10m, 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


HTML = typer.Option(None, "--html", help="write the placement report (and a PNG beside it)")
SAVE = typer.Option(None, "--save", help="write the placement JSON")


@app.command("place")
def place_command(
        model: str = typer.Argument(..., help=f"placement model: {MODELS_HELP}"),
        backends: str | None = typer.Option(None, "--backends", help="comma-separated backends (default: all "
                                            "built-in ones for the device)"),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
        budget: str = typer.Option("60s", "--budget", help="time for the evolutionary refinement (0 skips it)"),
        batch: int = typer.Option(1, "--batch", help="batch size"),
        small: bool = typer.Option(False, "--small", help="the model's small CPU configuration"),
        html_out: Path | None = HTML,
        save: Path | None = SAVE,
        repeats: int = typer.Option(20, "--repeats", help="timed runs per measurement (median)"),
) -> None:
    """Place MODEL and print per-backend whole-model times beside the placed model."""
    seconds = parse_budget(budget)
    if batch < 1:
        raise TapmlError(f"--batch must be ≥ 1 (got {batch})")
    from tapml.place import models, report
    from tapml.place.api import place

    spec = models.get(model)
    names = [b.strip() for b in backends.split(",") if b.strip()] if backends else None
    placement = place(spec.build(small), spec.inputs(batch, small), backends=names, device=device,
                      budget=seconds, repeats=repeats, progress=lambda m: typer.echo(m, err=True))
    typer.echo(report.text(placement))
    if html_out:
        page, picture = report.write(placement, html_out, f"TapML placement: {spec.summary}, batch {batch}")
        typer.echo(f"report: {page} ({picture})")
    if save:
        placement.placed.save(save, placement.summary())
        typer.echo(f"placement: {save}")

"""The `tapml` command: a thin typer skin over the API (carve, show, test, export-pytest, zoo, backends).

Each command parses, calls one API function and renders its result; user errors (TapmlError) become one line
on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tapml.errors import TapmlError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TapML: carve real op tests from a model on PyTorch, replay them on a target backend.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def carve(model: str = typer.Argument(..., help="zoo name (llama, zoo:llama) or path/to/file.py:make_model"),
          out_dir: Path = typer.Option(..., "--out", help="case store directory (created or extended)"),
          max_new_tokens: int = typer.Option(8, help="tokens to generate for LLMs (prefill + N-1 decode steps)"),
          prompt: str | None = typer.Option(None, help="use this text instead of the shipped prompts"),
          samples: int = typer.Option(1, help="samples kept per signature"),
          progress: bool = typer.Option(True, help="show a progress bar")) -> None:
    """Run MODEL on PyTorch and record every ATen op call into a case store."""
    from tapml.carve import carve as do_carve

    r = do_carve(model, out_dir, prompt=prompt, max_new_tokens=max_new_tokens, samples=samples,
                 progress=progress and sys.stderr.isatty())
    s = r.stats
    out.print(f"carved [bold]{r.model}[/]: {r.description}")
    out.print(f"  {r.calls} op calls -> {r.cases} signatures ({r.new_cases} new) in {r.seconds:.1f}s; "
              f"store {out_dir}: {s['cases']} cases, {s['samples']} samples, {s['overloads']} overloads, "
              f"{_human(s['disk_bytes'])} on disk, {s['runs']} run(s)")


@app.command()
def show(store: Path = typer.Argument(..., help="case store directory"),
         cases: bool = typer.Option(False, "--cases", help="list every case too")) -> None:
    """Summarize a case store: cases, calls covered, op kinds, bytes, runs."""
    from tapml.ops import describe_signature
    from tapml.store import CaseStore

    with CaseStore.open(store) as st:
        s = st.stats()
        runs = st.runs()
        ops = st.op_table()
        all_cases = st.cases() if cases else []
    out.print(f"[bold]{store}[/]: {s['cases']} cases covering {s['calls']} calls, {s['overloads']} overloads, "
              f"{s['samples']} samples, {s['blobs']} blobs ({_human(s['blob_bytes'])}), "
              f"{_human(s['disk_bytes'])} on disk")
    t = Table(title="runs", title_justify="left")
    for c in ("id", "model", "status", "calls", "description"):
        t.add_column(c)
    for r in runs:
        t.add_row(str(r["id"]), r["model"], r["status"], str(r["calls"]), r["description"] or "")
    out.print(t)
    t = Table(title="op kinds", title_justify="left")
    for c in ("op", "cases", "calls"):
        t.add_column(c, justify="left" if c == "op" else "right")
    for row in ops:
        t.add_row(row["op"], str(row["cases"]), str(row["calls"]))
    out.print(t)
    for c in all_cases:
        args = describe_signature(c.spec, c.metas) if c.replayable else f"(not replayable: {c.reason})"
        first = c.first
        out.print(f"{c.id:5d} {c.op} {args} ×{c.count} [dim]{first.get('module', '')} {first.get('phase', '')}[/]")


@app.command()
def test(store: Path = typer.Argument(..., help="case store directory"),
         backend: str = typer.Option(..., "--backend", help="backend name (see `tapml backends`)"),
         json_out: Path | None = typer.Option(None, "--json", help="write one JSON record per case"),
         html_out: Path | None = typer.Option(None, "--html", help="write a self-contained HTML report"),
         k: str | None = typer.Option(None, "-k", help="only ops matching PATTERN (substring, `not`, `or`)"),
         progress: bool = typer.Option(True, help="show a progress bar")) -> None:
    """Replay every case on BACKEND; exit 0 when all supported cases pass, 1 when any fails."""
    from tapml.backends import get_backend
    from tapml.replay import run_tests
    from tapml.report import print_summary, to_html, to_json, write_atomic
    from tapml.store import CaseStore

    CaseStore.open(store).close()  # a bad store fails before the backend starts
    be = get_backend(backend)
    try:
        run = run_tests(str(store), be, pattern=k, progress=progress and sys.stderr.isatty())
    finally:
        be.close()
    print_summary(run, out)
    if json_out:
        write_atomic(json_out, to_json(run))
    if html_out:
        write_atomic(html_out, to_html(run))
    raise typer.Exit(run.exit_code)


@app.command("export-pytest")
def export_pytest(store: Path = typer.Argument(..., help="case store directory"),
                  backend: str = typer.Option(..., "--backend"),
                  out_file: Path = typer.Option(..., "--out", help="pytest file to write"),
                  k: str | None = typer.Option(None, "-k")) -> None:
    """Write a standalone pytest file that replays the store's cases on BACKEND."""
    from tapml.backends import get_backend
    from tapml.testing.export import export_pytest as do_export

    get_backend(backend).close()
    n = do_export(str(store), backend, str(out_file), k)
    out.print(f"wrote {out_file}: {n} cases on {backend}; run it with `pytest {out_file}`")


@app.command()
def zoo() -> None:
    """List the embedded models: name, architecture, parameters, kind."""
    from tapml import zoo as z

    t = Table(title="TapML zoo", title_justify="left")
    for c in ("name", "architecture", "parameters", "kind", "config"):
        t.add_column(c, justify="right" if c == "parameters" else "left")
    for spec in z.catalog():
        t.add_row(spec.name, spec.architecture, f"{spec.parameters():,}", spec.kind, spec.summary)
    out.print(t)


@app.command()
def backends() -> None:
    """List installed backends, whether each can run here, and why not."""
    from tapml.backends import registered

    t = Table(title="backends (entry point group tapml.backends)", title_justify="left")
    for c in ("name", "usable", "description / reason"):
        t.add_column(c)
    for b in registered():
        t.add_row(b.name, "[green]yes[/]" if b.available else "[red]no[/]",
                  b.description if b.available else (b.reason or ""))
    out.print(t)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        app()  # standalone: usage errors exit 2, typer.Exit carries each command's code
    except TapmlError as e:
        err.print(f"tapml: error: {e}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

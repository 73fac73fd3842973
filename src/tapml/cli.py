"""The `tapml` command: a thin typer skin over the API (carve, show, test, export-pytest, serve, zoo, backends).

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
          progress: bool = typer.Option(True, help="show a progress bar"),
          frontend: str = typer.Option("torch", "--frontend",
                                       help="torch: ATen calls of the run; tvm: TIR kernel calls of the model's "
                                            "forward (one prefill forward for LLMs) in TVM's Relax VM")) -> None:
    """Run MODEL on PyTorch and record every ATen op call into a case store."""
    from tapml.carve import carve as do_carve

    if frontend == "tvm":
        from tapml.frontends.tvm import carve_tvm

        r = carve_tvm(model, str(out_dir), prompt=prompt, samples=samples)
    elif frontend == "torch":
        r = do_carve(model, out_dir, prompt=prompt, max_new_tokens=max_new_tokens, samples=samples,
                     progress=progress and sys.stderr.isatty())
    else:
        raise TapmlError(f"unknown --frontend {frontend!r}; choose torch or tvm")
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
         progress: bool = typer.Option(True, help="show a progress bar"),
         remote: str | None = typer.Option(None, "--remote", help="run on the `tapml serve` at ws://HOST:PORT"),
         token_file: Path | None = typer.Option(None, "--token-file", help="token for --remote (else TAPML_TOKEN)"),
         tvm_target: str | None = typer.Option(None, "--tvm-target",
                                               help="TVM target for --backend tvm, e.g. 'llvm -mcpu=skylake', "
                                                    "'llvm -opt-level=0', 'cuda'")
         ) -> None:
    """Replay every case on BACKEND; exit 0 when all supported cases pass, 1 when any fails."""
    from tapml.remote import open_backend
    from tapml.replay import run_tests
    from tapml.report import print_summary, to_html, to_json, write_atomic
    from tapml.store import CaseStore

    CaseStore.open(store).close()  # a bad store fails before the backend starts
    if tvm_target is not None and backend != "tvm":
        raise TapmlError(f"--tvm-target applies to --backend tvm, not {backend}")
    be = open_backend(backend, remote, token_file, **({"target": tvm_target} if tvm_target else {}))
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
def serve(backend: str = typer.Option(..., "--backend", help="backend to host (see `tapml backends`)"),
          host: str = typer.Option("127.0.0.1", help="address to listen on; other than loopback needs a token"),
          port: int = typer.Option(8765, help="port to listen on (0 picks a free one)"),
          token_file: Path | None = typer.Option(None, "--token-file", help="shared secret (else TAPML_TOKEN)"),
          max_message_mb: int = typer.Option(256, help="largest message accepted, in MiB"),
          timeout: float = typer.Option(120.0, help="time limit of one request, in seconds"),
          tls_cert: Path | None = typer.Option(None, "--tls-cert", help="serve wss:// with this certificate"),
          tls_key: Path | None = typer.Option(None, "--tls-key", help="its private key (if not in --tls-cert)"),
          option: list[str] = typer.Option([], "--option", help="backend option KEY=VALUE, e.g. tf32=false")
          ) -> None:
    """Host BACKEND for remote clients (`tapml test STORE --backend remote --remote URL`) until interrupted."""
    from tapml.remote.server import parse_options
    from tapml.remote.server import serve as do_serve

    def listening(s) -> None:
        auth = "HMAC token required" if s.token else "no token (loopback only)"
        print(f"tapml serve: backend {s.backend.name} on {s.url} ({auth}); Ctrl-C stops", flush=True)

    do_serve(backend, host, port, token_file, max_message_mb << 20, timeout, on_listening=listening,
             tls_cert=tls_cert, tls_key=tls_key, backend_options=parse_options(option))


def _migration_line(loc) -> str:
    c = loc.culprit
    if c is None:
        return f"no divergence on {loc.target} ({loc.strategy}, {loc.runs} model runs, {loc.seconds:.1f}s)"
    return (f"culprit: {c.op} @{c.index} (call {c.call} of {loc.calls}) in {c.module or '<top>'}, {c.phase}; "
            f"{c.verdict}; local error {c.local_error if c.local_error is None else f'{c.local_error:.3g}'}, "
            f"accumulated {c.accumulated_error if c.accumulated_error is None else f'{c.accumulated_error:.3g}'}"
            f" — {loc.strategy}, {loc.runs} model runs, {loc.seconds:.1f}s")


@app.command()
def migrate(model: str = typer.Argument(..., help="zoo name or path/to/file.py:make_model"),
            target: str = typer.Option(..., "--target", help="target backend (see `tapml backends`)"),
            strategy: str = typer.Option("bisect", help="bisect | by-kind | by-module | carved"),
            inject: str | None = typer.Option(None, help="wrap the target with a fault, e.g. noise:aten.mm.default@37"),
            json_out: Path | None = typer.Option(None, "--json", help="write the result (and the culprit's store)"),
            max_new_tokens: int = typer.Option(4, help="tokens to generate for LLMs"),
            prompt: str | None = typer.Option(None, help="use this text instead of the shipped prompts"),
            tol: float = typer.Option(1e-4, help="end-to-end tolerance: max |Δ| / max |reference|"),
            remote: str | None = typer.Option(None, "--remote", help="target the `tapml serve` at ws://HOST:PORT"),
            token_file: Path | None = typer.Option(None, "--token-file", help="token for --remote")) -> None:
    """Migrate MODEL to TARGET op by op and name the first op instance that breaks the result.
    Exit 0: no divergence; 1: a culprit was found."""
    import json

    from tapml.migrate.debug import _open, migration_json
    from tapml.migrate.localize import STRATEGIES, localize, make_target
    from tapml.migrate.repro import save_culprit
    from tapml.report import write_atomic

    if strategy not in STRATEGIES:
        raise TapmlError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if tol <= 0:
        raise TapmlError(f"--tol must be > 0 (got {tol})")
    from tapml.carve import load_workload

    backend = make_target(_open(target, remote, str(token_file) if token_file else None), inject)
    try:
        name, workload = load_workload(model, prompt, max_new_tokens)
        err.print(f"migrating {name} to {backend.name} ({strategy}) …")
        loc = localize(workload, name, backend, strategy, tol, inject,
                       on_trial=lambda p, v: err.print(f"  run: {p:<48.48} -> {'ok' if v.passed else 'BROKEN'} "
                                                       f"(rel. error {v.rel_error:.3g})"))
    finally:
        backend.close()
    out.print(_migration_line(loc))
    x = loc.crossings
    if x:
        out.print(f"  crossings in the widest run: {x['uploads']} uploads ({x['upload_bytes'] / 2**20:.1f} MiB) to "
                  f"the target, {x['downloads']} downloads ({x['download_bytes'] / 2**20:.1f} MiB) back")
    if loc.note:
        out.print(f"  note: {loc.note}")
    if json_out:
        store, case = None, None
        if loc.culprit is not None and loc.culprit_inputs is not None:
            store = str(json_out.with_suffix("")) + ".culprit"
            case = save_culprit(loc, store)
        write_atomic(json_out, json.dumps(migration_json(loc, target, inject, store, case), indent=1, default=str))
        out.print(f"wrote {json_out}" + (f" (culprit inputs in {store}; `tapml repro {json_out}`)" if store else ""))
    raise typer.Exit(loc.exit_code)


@app.command()
def repro(result: Path = typer.Argument(..., help="the JSON written by `tapml migrate --json`"),
          out_file: Path = typer.Option(Path("test_repro.py"), "--out", help="pytest file to write")) -> None:
    """Write a standalone pytest file replaying the culprit op on its backend with its real inputs."""
    from tapml.migrate.repro import load_result, write_repro

    path = write_repro(load_result(result), out_file)
    out.print(f"wrote {path}; `pytest {path}` fails while the bug is there")


@app.command()
def debug(model: str = typer.Argument(..., help="zoo name or path/to/file.py:make_model"),
          target: str = typer.Option(..., "--target", help="target backend (see `tapml backends`)"),
          html_out: Path | None = typer.Option(None, "--html", help="write the HTML report here"),
          out_dir: Path | None = typer.Option(None, "--out", help="keep the store, culprit and repro here"),
          inject: str | None = typer.Option(None, help="wrap the target with a fault (see `tapml migrate`)"),
          strategy: str = typer.Option("bisect", help="localizer strategy"),
          max_new_tokens: int = typer.Option(4, help="tokens to generate for LLMs"),
          tol: float = typer.Option(1e-4, help="end-to-end tolerance"),
          remote: str | None = typer.Option(None, "--remote", help="target the `tapml serve` at ws://HOST:PORT"),
          token_file: Path | None = typer.Option(None, "--token-file", help="token for --remote")) -> None:
    """The whole top-down flow: carve, test, migrate, localize, report."""
    from tapml.migrate.debug import debug as do_debug

    res = do_debug(model, target, out_dir, inject, strategy, max_new_tokens, None, tol, html_out, remote,
                   str(token_file) if token_file else None, log=lambda s: err.print(s))
    t = res.tested.totals()
    out.print(f"carved tests on {res.target}: {t['pass']} passed, {t['fail']} failed, {t['unsupported']} "
              f"unsupported, {t['error']} errors of {t['cases']} cases")
    e = res.e2e
    out.print(f"end to end with every op on the target: {'pass' if e['passed'] else 'FAIL'} "
              f"(rel. error {e['rel_error']:.3g})")
    if res.localization is not None:
        out.print(_migration_line(res.localization))
    if res.repro:
        out.print(f"repro: {res.repro}")
    if res.html:
        out.print(f"report: {res.html}")
    raise typer.Exit(res.exit_code)


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

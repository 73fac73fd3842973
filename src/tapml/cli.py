"""The `tapml` command: a thin typer skin over the API (carve, show, test, export-pytest, serve, zoo, backends).

Each command parses, calls one API function and renders its result; it must not hold logic or checks of its
own (those live once, in the API). User errors (TapmlError) and usage errors (a bad or missing option) become
one line on stderr, `tapml: error: ...`, and exit code 2; anything else is a tapml bug: one line, `tapml: internal
error: ...`, and exit code 3 (never 1, which means "culprit found" / "cases fail"); TAPML_DEBUG=1 shows its traceback.
Data (paths, model and op names) is printed escaped, never read as rich markup.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tapml.errors import TapmlError, first_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TapML: carve real op tests from a model on PyTorch, replay them on a target backend.")
# Exit codes: 0 ok, 1 a culprit / failing cases, 2 a user error, 3 a tapml bug.
INTERNAL_ERROR = 3
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_DTYPE_HELP = ("float32 | float16 | bfloat16: the model, its floating inputs and the reference run in that dtype on "
               "the CPU (default: as built: float32 for the zoo, a user file's own)")
_WEIGHTS_HELP = ("float: the model's own weights; q4_0: its linear layers (in_features a multiple of 32) as GGUF "
                 "Q4_0 4-bit blocks, dequantized with plain ATen ops at each forward (with --dtype float16: "
                 "WebLLM's q4f16)")

_TOL_HELP = ("end-to-end tolerance: max |Δ| / max |reference| of the outputs (LLMs: logits of every step) "
             "(default: 1e-4; 1e-2 with --dtype float16, 5e-2 with bfloat16)")


def _dtype_option():
    return typer.Option(None, "--dtype", metavar="DTYPE", help=_DTYPE_HELP)


def _weights_option():
    return typer.Option("float", "--weights", metavar="WEIGHTS", help=_WEIGHTS_HELP)


@app.command()
def carve(model: str = typer.Argument(..., help="zoo name (llama, zoo:llama) or path/to/file.py:make_model"),
          out_dir: Path = typer.Option(..., "--out", help="case store directory (created or extended)"),
          max_new_tokens: int = typer.Option(8, help="tokens to generate for LLMs (prefill + N-1 decode steps)"),
          prompt: str | None = typer.Option(None, help="use this text instead of the shipped prompts"),
          samples: int = typer.Option(1, help="samples kept per signature: its first call, and with K > 1 the K-1 "
                                                "calls whose inputs differ most (|max|, NaN/Inf, masked rows, "
                                                "integer range)"),
          progress: bool = typer.Option(True, help="show a progress bar"),
          frontend: str = typer.Option("torch", "--frontend",
                                       help="torch: ATen calls of the run; tvm: TIR kernel calls of the model's "
                                            "forward (one prefill forward for LLMs) in TVM's Relax VM"),
          timeout: float | None = typer.Option(None, "--timeout", metavar="SECONDS",
                                               help="stop the model run after this many seconds (its run is "
                                                    "discarded); torch frontend"),
          dtype: str | None = _dtype_option(), weights: str = _weights_option()) -> None:
    """Run MODEL on PyTorch and record every ATen op call into a case store."""
    from tapml.recorder import carve as do_carve

    r = do_carve(model, out_dir, prompt=prompt, max_new_tokens=max_new_tokens, samples=samples, progress=progress,
                 frontend=frontend, timeout=timeout, dtype=dtype, weights=weights)
    s = r.stats
    out.print(f"carved [bold]{escape(r.model)}[/]: {escape(r.description)}")
    out.print(f"  {r.calls} op calls -> {r.cases} signatures ({r.new_cases} new) in {r.seconds:.1f}s; "
              f"store {escape(str(out_dir))}: {s['cases']} cases, {s['samples']} samples, {s['overloads']} "
              f"overloads, {_human(s['disk_bytes'])} on disk, {s['runs']} run(s)")


def _sampling(options: dict) -> str:
    """How a run chose its samples, from its options (`tapml show`)."""
    k = options.get("samples")
    if not isinstance(k, int):
        return "?"
    if k == 1:
        return "1: the first call"
    if options.get("sampling") == "diverse":
        return f"{k}: the first call + the {k - 1} most distinct (|max|, NaN/Inf, masked rows, int range)"
    return f"{k}: the first {k} calls"


@app.command()
def show(store: Path = typer.Argument(..., help="case store directory"),
         cases: bool = typer.Option(False, "--cases", help="list every case too")) -> None:
    """Summarize a case store: cases, calls covered, op kinds, bytes, runs."""
    from tapml.diverse import describe
    from tapml.ops import describe_signature
    from tapml.store import summarize
    from tapml.workload import describe_precision

    summary = summarize(store, cases)
    s, runs, ops, all_cases = summary.stats, summary.runs, summary.ops, summary.cases
    out.print(f"[bold]{escape(str(store))}[/]: {s['cases']} cases covering {s['calls']} calls, {s['overloads']} "
              f"overloads, {s['samples']} samples, {s['blobs']} blobs ({_human(s['blob_bytes'])}), "
              f"{_human(s['disk_bytes'])} on disk")
    t = Table(title="runs", title_justify="left")
    for c in ("id", "model", "status", "calls", "precision", "samples per signature", "description"):
        t.add_column(c)
    for r in runs:
        o = r["options"]
        precision = describe_precision(str(o.get("dtype", "float32")), str(o.get("weights", "float")))
        t.add_row(str(r["id"]), escape(r["model"]), r["status"], str(r["calls"]), escape(precision), _sampling(o),
                  escape(r["description"] or ""))
    out.print(t)
    t = Table(title="op kinds", title_justify="left")
    for c in ("op", "cases", "calls"):
        t.add_column(c, justify="left" if c == "op" else "right")
    for row in ops:
        t.add_row(escape(row["op"]), str(row["cases"]), str(row["calls"]))
    out.print(t)
    for c in all_cases:
        args = describe_signature(c.spec, c.metas) if c.replayable else f"(not replayable: {c.reason})"
        first = c.first
        out.print(f"{c.id:5d} {escape(c.op)} {escape(args)} ×{c.count} [dim]{escape(str(first.get('module', '')))} "
                  f"{escape(str(first.get('phase', '')))}[/]")
        chosen = summary.choices.get(c.id, [])
        if any(x["chosen"] for x in chosen):  # carved with diverse samples: say why each was kept
            for x in chosen:
                how = describe(x["chosen"])
                out.print(f"        sample: call {x['index']} ({escape(str(x['phase']))}): {escape(how)}")


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
                                                    "'llvm -opt-level=0', 'cuda'"),
         amplify: bool = typer.Option(False, "--amplify",
                                      help="also replay realistic variants of each sample (lengths around tile "
                                           "sizes, extremes, shifts, long-context positions, int boundaries, "
                                           "masked rows, layouts, causal L≠S), reported apart"),
         amplify_seed: int = typer.Option(0, "--amplify-seed", help="seed the amplified variants are drawn with")
         ) -> None:
    """Replay every case on BACKEND; exit 0 when all supported cases (and amplified variants) pass, 1 when any
    fails."""
    from tapml.replay import run_tests
    from tapml.report import print_summary

    run = run_tests(store, backend, pattern=k, progress=progress, remote=remote, token_file=token_file,
                    backend_options={"target": tvm_target} if tvm_target else None, json_out=json_out,
                    html_out=html_out, amplify=amplify, amplify_seed=amplify_seed)
    print_summary(run, out)
    raise typer.Exit(run.exit_code)


@app.command("export-pytest")
def export_pytest(store: Path = typer.Argument(..., help="case store directory"),
                  backend: str = typer.Option(..., "--backend"),
                  out_file: Path = typer.Option(..., "--out", help="pytest file to write"),
                  k: str | None = typer.Option(None, "-k")) -> None:
    """Write a standalone pytest file that replays the store's cases on BACKEND."""
    from tapml.testing.export import export_pytest as do_export

    n = do_export(str(store), backend, str(out_file), k)
    out.print(f"wrote {escape(str(out_file))}: {n} cases on {escape(backend)}; run it with "
              f"`pytest {escape(str(out_file))}`")


@app.command()
def serve(backend: str = typer.Option(..., "--backend", help="backend to host (see `tapml backends`)"),
          host: str = typer.Option("127.0.0.1", help="address to listen on (loopback unless you mean otherwise)"),
          port: int = typer.Option(8765, help="port to listen on (0 picks a free one)"),
          token_file: Path | None = typer.Option(None, "--token-file",
                                                 help="shared secret (else TAPML_TOKEN; else one is generated)"),
          max_message_mb: int = typer.Option(256, help="largest message accepted after authentication, in MiB"),
          timeout: float = typer.Option(120.0, help="time budget of one request, in seconds: a request over it "
                                                    "stops its session"),
          max_session_mb: int = typer.Option(8192, help="memory one session may hold on the server, in MiB"),
          max_op_elements: int = typer.Option(1 << 31, help="largest tensor (elements) an op may produce"),
          max_connections: int = typer.Option(16, help="sessions at once (each runs in a process of its own)"),
          allow_origin: list[str] = typer.Option([], "--allow-origin",
                                                 help="let web pages from this origin connect (e.g. "
                                                      "http://localhost:3000); browsers are refused otherwise"),
          allow_ops: list[Path] = typer.Option([], "--allow-ops",
                                               help="file of extra ATen overloads to allow, one per line"),
          tls_cert: Path | None = typer.Option(None, "--tls-cert", help="serve wss:// with this certificate"),
          tls_key: Path | None = typer.Option(None, "--tls-key", help="its private key (if not in --tls-cert)"),
          option: list[str] = typer.Option([], "--option", help="backend option KEY=VALUE, e.g. tf32=false")
          ) -> None:
    """Host BACKEND for remote clients (`tapml test STORE --backend remote --remote URL`) until interrupted.
    Clients must prove they know the token (docs/SECURITY.md)."""
    from tapml.remote.server import parse_options
    from tapml.remote.server import serve as do_serve

    def listening(s) -> None:
        print(f"tapml serve: backend {s.backend_name} on {s.url} (token required); Ctrl-C stops", flush=True)
        if s.generated_token:
            print(f"tapml serve: token {s.token} (generated for this run: clients pass it as TAPML_TOKEN={s.token} "
                  "or in a file with --token-file FILE)", flush=True)

    mib = 1 << 20
    do_serve(backend, host, port, token_file, on_listening=listening, max_message=max_message_mb * mib,
             timeout=timeout, max_session_bytes=max_session_mb * mib, max_op_elements=max_op_elements,
             max_connections=max_connections, allow_origins=tuple(allow_origin), allow_ops=tuple(allow_ops),
             tls_cert=tls_cert, tls_key=tls_key, backend_options=parse_options(option))


def _counts(counts: dict) -> str:
    return (f"{counts.get('placed', 0)} calls placed on the target, {counts.get('ran', 0)} ran there, "
            f"{counts.get('refused', 0)} refused")


def _migration_line(loc) -> str:
    c = loc.culprit
    if c is None:
        return (f"no divergence on {loc.target} ({loc.strategy}, {loc.runs} model runs, {loc.seconds:.1f}s; "
                f"{_counts(loc.counts)})")
    return (f"culprit: {c.op} @{c.index} (call {c.call} of {loc.calls}) in {c.module or '<top>'}, {c.phase}; "
            f"{c.verdict}; local error {c.local_error if c.local_error is None else f'{c.local_error:.3g}'}, "
            f"accumulated {c.accumulated_error if c.accumulated_error is None else f'{c.accumulated_error:.3g}'}"
            f" — {loc.strategy}, {loc.runs} model runs, {loc.seconds:.1f}s; {_counts(loc.counts)}")


@app.command()
def migrate(model: str = typer.Argument(..., help="zoo name or path/to/file.py:make_model"),
            target: str = typer.Option(..., "--target", help="target backend (see `tapml backends`)"),
            strategy: str = typer.Option("bisect", help="bisect | by-kind | by-module | carved"),
            inject: str | None = typer.Option(None, help="wrap the target with a fault, e.g. noise:aten.mm.default@37"),
            json_out: Path | None = typer.Option(None, "--json", help="write the result (and the culprit's store)"),
            max_new_tokens: int = typer.Option(4, help="tokens to generate for LLMs"),
            prompt: str | None = typer.Option(None, help="use this text instead of the shipped prompts"),
            tol: float | None = typer.Option(None, help=_TOL_HELP),
            remote: str | None = typer.Option(None, "--remote", help="target the `tapml serve` at ws://HOST:PORT"),
            token_file: Path | None = typer.Option(None, "--token-file", help="token for --remote"),
            dtype: str | None = _dtype_option(), weights: str = _weights_option()) -> None:
    """Migrate MODEL to TARGET op by op and name the first op instance that breaks the result.
    Exit 0: no divergence; 1: a culprit was found."""
    from tapml.migration.localize import migrate as do_migrate

    loc = do_migrate(model, target=target, strategy=strategy, inject=inject, max_new_tokens=max_new_tokens,
                     prompt=prompt, tol=tol, remote=remote, token_file=token_file, json_out=json_out,
                     dtype=dtype, weights=weights,
                     log=lambda s: err.print(s, markup=False),
                     on_trial=lambda p, v: err.print(f"  run: {p:<48.48} -> {'ok' if v.passed else 'BROKEN'} "
                                                     f"(rel. error {v.rel_error:.3g})", markup=False))
    out.print(_migration_line(loc), markup=False)
    x = loc.crossings
    if x:
        out.print(f"  crossings in the widest run: {x['uploads']} uploads ({x['upload_bytes'] / 2**20:.1f} MiB) to "
                  f"the target, {x['downloads']} downloads ({x['download_bytes'] / 2**20:.1f} MiB) back")
    if loc.note:
        out.print(f"  note: {loc.note}", markup=False)
    if json_out:
        store = loc.culprit_store
        out.print(f"wrote {json_out}" + (f" (culprit inputs in {store}; `tapml repro {json_out}`)" if store else ""),
                  markup=False)
    raise typer.Exit(loc.exit_code)


@app.command()
def repro(result: Path = typer.Argument(..., help="the JSON written by `tapml migrate --json`"),
          out_file: Path = typer.Option(Path("test_repro.py"), "--out", help="pytest file to write")) -> None:
    """Write a standalone pytest file replaying the culprit op on its backend with its real inputs."""
    from tapml.migration.repro import repro as do_repro

    path = do_repro(result, out_file)
    out.print(f"wrote {path}; `pytest {path}` fails while the bug is there", markup=False)


@app.command()
def debug(model: str = typer.Argument(..., help="zoo name or path/to/file.py:make_model"),
          target: str = typer.Option(..., "--target", help="target backend (see `tapml backends`)"),
          html_out: Path | None = typer.Option(None, "--html", help="write the HTML report here"),
          out_dir: Path | None = typer.Option(None, "--out", help="keep the store, culprit and repro here"),
          inject: str | None = typer.Option(None, help="wrap the target with a fault (see `tapml migrate`)"),
          strategy: str = typer.Option("bisect", help="localizer strategy"),
          max_new_tokens: int = typer.Option(4, help="tokens to generate for LLMs"),
          tol: float | None = typer.Option(None, help=_TOL_HELP),
          remote: str | None = typer.Option(None, "--remote", help="target the `tapml serve` at ws://HOST:PORT"),
          token_file: Path | None = typer.Option(None, "--token-file", help="token for --remote"),
          dtype: str | None = _dtype_option(), weights: str = _weights_option()) -> None:
    """The whole top-down flow: carve, test, migrate, localize, report."""
    from tapml.migration.debug import debug as do_debug

    res = do_debug(model, target=target, out_dir=out_dir, inject=inject, strategy=strategy,
                   max_new_tokens=max_new_tokens, tol=tol, html_out=html_out, remote=remote, token_file=token_file,
                   log=lambda s: err.print(s, markup=False), dtype=dtype, weights=weights)
    t = res.tested.totals()
    out.print(f"carved tests on {escape(res.target)}: {t['pass']} passed, {t['fail']} failed, {t['unsupported']} "
              f"unsupported, {t['error']} errors of {t['cases']} cases")
    a = res.tested.amplified_totals()
    out.print(f"amplified variants: {a['pass']} passed, {a['fail']} failed, {a['unsupported']} unsupported, "
              f"{a['error']} errors of {a['variants']}")
    for r in [r for r in res.tested.amplified if r.status in ("fail", "error")][:10]:
        out.print(f"  {r.status} {r.op} {r.args}: {r.reason}", markup=False)
    e = res.e2e
    out.print(f"end to end with every op on the target: {'pass' if e['passed'] else 'FAIL'} "
              f"(rel. error {e['rel_error']:.3g}; {_counts(res.counts)})")
    if res.localization is not None:
        out.print(_migration_line(res.localization), markup=False)
    if res.repro:
        out.print(f"repro: {res.repro}", markup=False)
    if res.html:
        out.print(f"report: {res.html}", markup=False)
    raise typer.Exit(res.exit_code)


@app.command()
def zoo() -> None:
    """List the embedded models: name, architecture, parameters, kind; and how many distinct architectures."""
    from tapml import zoo as z

    t = Table(title="TapML zoo", title_justify="left")
    for c in ("name", "architecture", "parameters", "kind", "config"):
        t.add_column(c, justify="right" if c == "parameters" else "left")
    for spec in z.catalog():
        t.add_row(spec.name, spec.architecture, f"{spec.parameters():,}", spec.kind, spec.summary)
    out.print(t)
    from tapml.graphpipe.models import pipe_models
    from tapml.parallel.models import SHAPES

    t = Table(title="graph-pipeline training (tapml graphpipe MODEL)", title_justify="left")
    for c in ("name", "parameters (tiny / gpu)", "summary"):
        t.add_column(c, justify="right" if c.startswith("param") else "left", no_wrap=c == "name")
    for m in pipe_models():
        t.add_row(m.name, f"{m.parameters('tiny'):,} / {m.parameters('gpu'):,}", m.summary)
    out.print(t)
    from tapml.place.models import catalog as place_models

    t = Table(title="placement models (tapml place MODEL)", title_justify="left")
    for c in ("name", "summary"):
        t.add_column(c, no_wrap=c == "name")
    for m in place_models():
        t.add_row(m.name, m.summary)
    out.print(t)
    t = Table(title="long-context decode shapes (tapml parallel --model NAME)", title_justify="left")
    for c in ("name", "parameters", "layers", "heads / KV heads", "summary"):
        t.add_column(c, justify="right" if c in ("parameters", "layers") else "left", no_wrap=c == "name")
    for s in SHAPES.values():
        t.add_row(s.name, f"{s.params():,}", str(s.layers), f"{s.heads} / {s.kv_heads}", s.summary)
    out.print(t)
    from tapml.zoo.census import architectures

    out.print(f"{len(architectures())} architectures in these tables")


@app.command()
def backends() -> None:
    """List installed backends, whether each can run here, and why not."""
    from tapml.backends import registered

    t = Table(title="backends (entry point group tapml.backends)", title_justify="left")
    for c in ("name", "usable", "description / reason"):
        t.add_column(c)
    for b in registered():
        t.add_row(escape(b.name), "[green]yes[/]" if b.available else "[red]no[/]",
                  escape(b.description if b.available else (b.reason or "")))
    out.print(t)


def _mount_subapps() -> None:
    """The systems' sub-apps (their modules import nothing heavy at import: `tapml --help` stays fast)."""
    from tapml.graphpipe.cli import app as graphpipe_app
    from tapml.parallel.cli import app as parallel_app
    from tapml.place.cli import place_command

    app.command("place")(place_command)

    app.add_typer(parallel_app, name="parallel", help="Cache parallelism for long-context decode (decode, advise).")
    app.add_typer(graphpipe_app, name="graphpipe", help="GraphPipe: DAG pipeline training (plan, train, bench).")


_mount_subapps()


def _one_line(text: str) -> str:
    """A message as one line: newlines and other control or unprintable characters (a path's, a non-UTF-8
    argument's) shown escaped, so the error is always exactly one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for ch in text.strip())


def _fail(message: str) -> None:
    err.print(f"tapml: error: {_one_line(message)}", soft_wrap=True, markup=False)
    sys.exit(2)


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, no-args-is-help, abort) of the click typer runs on: its own copy (typer ≥ 0.20 vendors
    click as typer._click) or click itself."""
    errors: tuple[type, ...] = ()
    no_args: tuple[type, ...] = ()
    abort: tuple[type, ...] = (typer.Abort,)
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            m = importlib.import_module(name)
        except ImportError:
            continue
        errors += (m.ClickException,)
        no_args += (m.NoArgsIsHelpError,) if hasattr(m, "NoArgsIsHelpError") else ()
        abort += (m.Abort,) if hasattr(m, "Abort") else ()
    return errors, no_args, abort


def _usage(e: Exception) -> str:
    """A click usage error (bad value, missing or unknown option) as one line, with where to read more."""
    ctx = getattr(e, "ctx", None)
    return e.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx is not None else "")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    usage_errors, no_args, aborts = _click_exceptions()
    try:
        # Not standalone: click's usage errors come here instead of as a multi-line panel; typer.Exit (and
        # --help, which exits 0) come back as the exit code.
        code = app(standalone_mode=False, prog_name="tapml")
    except TapmlError as e:
        _fail(str(e))
    except no_args as e:  # `tapml` alone: the help, as before (typer's rich help has printed itself already)
        if e.format_message().strip():
            e.show()
        sys.exit(e.exit_code)
    except usage_errors as e:  # UsageError, BadParameter, MissingParameter, NoSuchOption: all exit 2
        _fail(_usage(e))
    except aborts:  # end of input at a prompt
        err.print("Aborted!", markup=False)
        sys.exit(1)
    except Exception as e:  # a bug of ours: exit 3, so no script reads it as "culprit found" (1)
        if os.environ.get("TAPML_DEBUG", "") not in ("", "0"):
            raise
        err.print(f"tapml: internal error: {type(e).__name__}: {_one_line(first_line(e))} (a tapml bug; rerun with "
                  "TAPML_DEBUG=1 for the traceback)", soft_wrap=True, markup=False)
        sys.exit(INTERNAL_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""`tapml debug`: the whole top-down flow in one call — carve, test the carved cases on the target, run the
model with every op on the target (local check on each: the per-op error curve), localize the first op
instance that breaks the end-to-end result, write its repro, and render one HTML report.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tapml.backends import open_backend
from tapml.backends.faults import parse_fault
from tapml.errors import TapmlError
from tapml.migration.localize import (
    Localization,
    Session,
    check_fault_hits_the_run,
    check_settings,
    check_something_ran,
    localize,
)
from tapml.migration.placement import Placement
from tapml.migration.repro import check_culprit_store, migration_json, save_culprit, save_failure, write_repro
from tapml.paths import check_output_dir, check_output_file, short
from tapml.recorder import carve
from tapml.replay import run_tests
from tapml.report import write_atomic
from tapml.results import CarveResult, TestRun
from tapml.workload import check_precision, describe_precision, load_workload


@dataclass
class DebugResult:
    model: str
    target: str
    carved: CarveResult
    tested: TestRun
    drift: list[dict]  # per target op of the all-on-target run: call, op, module, phase, local/accumulated
    e2e: dict
    localization: Localization | None
    repro: str | None
    html: str | None
    counts: dict = field(default_factory=dict)  # the all-on-target run's calls placed, ran, refused
    precision: dict = field(default_factory=dict)  # the workload's dtype / weights when not the default

    @property
    def exit_code(self) -> int:
        bad = self.tested.exit_code  # a failing carved case or amplified variant
        return 1 if bad or (self.localization and self.localization.culprit) or not self.e2e["passed"] else 0


def debug(model: str, *, target: str, out_dir: str | os.PathLike | None = None, inject: str | None = None,
          strategy: str = "bisect", max_new_tokens: int = 4, prompt: str | None = None, tol: float | None = None,
          html_out: str | os.PathLike | None = None, remote: str | None = None,
          token_file: str | os.PathLike | None = None, log: Callable[[str], None] | None = None,
          dtype: str | None = None, weights: str = "float") -> DebugResult:
    """The whole top-down flow on MODEL against TARGET: carve, replay the carved cases on the target, run the
    model with every op on the target (checking each op against the reference on the same inputs), localize the
    first op instance that breaks the end-to-end result, write its repro, and render the HTML report.

    model, target, remote, token_file, inject, strategy, max_new_tokens, prompt, tol, dtype, weights: as for
    `migrate` (the carve, the reference and every mixed run are in that precision).
    out_dir: keep the store, the migrate JSON, the culprit store and the repro there (else a temp dir, removed
    again when the flow fails). html_out: the report. log(line): progress. Settings and paths are checked before
    anything runs.
    """
    say = log or (lambda s: None)
    check_settings(strategy, tol, max_new_tokens)
    check_precision(dtype, weights)
    fault = parse_fault(inject) if inject else None
    if html_out is not None:
        check_output_file(html_out, "--html")
    if out_dir is not None:
        work = check_output_dir(out_dir, "--out")
        check_output_dir(work / "cases", "--out")
        for name in ("migrate.json", "test_repro.py"):
            check_output_file(work / name, "--out")
        check_culprit_store(work / "culprit", f"--out {short(work)}: its culprit store")
    backend = open_backend(target, remote=remote, token_file=token_file, inject=fault)
    work_dir = Path(out_dir) if out_dir else None
    try:
        work_dir = work_dir or Path(tempfile.mkdtemp(prefix="tapml-debug-"))
        name, workload = load_workload(model, prompt, max_new_tokens, dtype, weights)
        session = Session(workload, backend, tol)
        # The reference run first: a fault on an op the model never runs is bad input, refused before the carve
        # (else the flow would report a clean target).
        try:
            check_fault_hits_the_run(session, fault)
        except TapmlError:
            raise
        except Exception as e:  # the model itself failed (as carve would report it)
            raise TapmlError(f"model {name} raised {type(e).__name__} while running: {e}") from None
        store = work_dir / "cases"
        say(f"1/4 carve {name} into {store}")
        carved = carve(name, store, workload=workload, progress=False)
        say(f"2/4 replay {carved.cases} carved cases and their amplified variants on {backend.name}")
        tested = run_tests(str(store), backend, progress=False, amplify=True)
        say("3/4 run the model with every op on the target, checking each op against the reference")
        run, verdict = session.trial(Placement.all(), local_check=Placement.all())
        drift = [r.as_dict() for r in run.records]
        check_something_ran(run, backend.name)
        loc, repro = None, None
        if not verdict.passed:
            say(f"4/4 the result diverges (rel. error {verdict.rel_error:.3g}); localizing with {strategy}")
            loc = localize(workload, name, backend, strategy=strategy, tol=tol, fault=fault)
            if loc.culprit is not None and loc.culprit_inputs is not None:
                case = save_culprit(loc, work_dir / "culprit")
                result = migration_json(loc, target, inject, str(work_dir / "culprit"), case)
                write_atomic(work_dir / "migrate.json", json.dumps(result, indent=1, default=str), "--out")
                repro = str(write_repro(result, work_dir / "test_repro.py"))
        else:
            say("4/4 the end-to-end result matches the reference: nothing to localize")
        res = DebugResult(name, backend.name, carved, tested, drift, verdict.as_dict(), loc, repro, None,
                          run.counts(), workload.precision)
        if html_out:
            write_atomic(html_out, to_html(res), "--html")
            res.html = str(html_out)
        return res
    except BaseException as e:
        if out_dir is not None and isinstance(e, Exception):  # what stopped it, where migrate.json would be
            save_failure(Path(out_dir) / "migrate.json", model, target, inject, e)
        if out_dir is None and work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)  # ours, and nothing in it is reported
        raise
    finally:
        backend.close()


# ----------------------------------------------------------------------------------------------- HTML


def _curve_svg(drift: list[dict], culprit_call: int | None, width: int = 900, height: int = 260) -> str:
    pts = [(d["call"], d.get("local_error"), d.get("accumulated_error")) for d in drift]
    if not pts:
        return "<p>(no target ops)</p>"
    n = max(p[0] for p in pts) + 1
    lo, hi = -12.0, 1.0

    def y(v: float | None) -> float | None:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        lv = hi if v == math.inf else max(lo, min(hi, math.log10(max(v, 1e-300))))
        return 10 + (hi - lv) / (hi - lo) * (height - 40)

    def x(c: int) -> float:
        return 50 + c / max(n - 1, 1) * (width - 60)

    dots = []
    for c, le, ae in pts:
        if (ya := y(ae)) is not None:
            dots.append(f'<circle cx="{x(c):.1f}" cy="{ya:.1f}" r="1.6" fill="#e08a00" opacity=".6"/>')
        if (yl := y(le)) is not None:
            dots.append(f'<circle cx="{x(c):.1f}" cy="{yl:.1f}" r="1.6" fill="#1f6fd1"/>')
    ticks = "".join(f'<text x="4" y="{y(10.0 ** e) + 4:.0f}" font-size="10">1e{e}</text>'
                    for e in range(int(lo), int(hi) + 1, 3))
    mark = ""
    if culprit_call is not None:
        mark = (f'<line x1="{x(culprit_call):.1f}" x2="{x(culprit_call):.1f}" y1="5" y2="{height - 28}" '
                f'stroke="#c62828" stroke-dasharray="4 3"/><text x="{x(culprit_call) + 4:.1f}" y="14" '
                f'font-size="11" fill="#c62828">culprit (call {culprit_call})</text>')
    return (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f'<rect x="50" y="5" width="{width - 60}" height="{height - 35}" fill="#fafafa" stroke="#ddd"/>'
            f'{ticks}{"".join(dots)}{mark}<text x="50" y="{height - 8}" font-size="11">op call in the run (0 … '
            f'{n - 1}) · <tspan fill="#1f6fd1">● local error</tspan> · <tspan fill="#e08a00">● accumulated '
            f'error</tspan> (relative RMS, log scale)</text></svg>')


def to_html(res: DebugResult) -> str:
    """The report, answer first: the verdict, the culprit (op, instance, module, phase, local or accumulated),
    the repro command and the drift plot; then the failing cases; the full tables last, collapsed."""
    esc = html.escape
    t = res.tested.totals()
    loc = res.localization
    c = loc.culprit if loc else None
    e = res.e2e
    bad_cases = [r for r in res.tested.results if r.status in ("fail", "error")]
    amplified = [r for r in getattr(res.tested, "amplified", []) if r.status in ("fail", "error")]
    clean = e["passed"] and not bad_cases and not amplified and c is None
    p = res.precision
    who = esc(res.model) + (f" ({esc(describe_precision(p.get('dtype', 'float32'), p.get('weights', 'float')))})"
                            if p else "")
    if clean:
        verdict, color = f"{who} runs correctly on {esc(res.target)}", "#2e7d32"
    elif c is not None:
        verdict, color = (f"{who} breaks on {esc(res.target)} at <code>{esc(c.op)}</code> @{c.index}", "#c62828")
    else:
        verdict, color = f"{who} has failing op cases on {esc(res.target)}", "#c62828"
    div = e.get("first_divergent_token")
    e2e = (f"end to end: {'pass' if e['passed'] else 'FAIL'}, relative error {e['rel_error']:.3g} (tolerance "
           f"{e['tol']:g})" + (f"; first divergent token at step {div['step']} row {div['row']}: reference "
                                f"{div['reference']}, target {div['target']}" if div else ""))
    if res.counts:
        n = res.counts
        e2e += (f"; {n.get('placed', 0)} calls placed on the target, {n.get('ran', 0)} ran there, "
                f"{n.get('refused', 0)} refused")
    carved = (f"carved op tests: {t['pass']} passed, {t['fail']} failed, {t['unsupported']} unsupported, "
              f"{t['error']} errors of {t['cases']} cases ({res.carved.calls} op calls)")
    if getattr(res.tested, "amplify_seed", None) is not None:
        a = res.tested.amplified_totals()
        carved += f"; amplified variants: {a['pass']} passed, {a['fail'] + a['error']} failing of {a['variants']}"
    answer = ""
    if c is not None:
        run_repro = f"pytest {res.repro}" if res.repro else "(no repro: the culprit's inputs were not recorded)"
        answer = (f'<table class="answer"><tr><th>culprit</th><td><code>{esc(c.op)}</code> instance @{c.index} '
                  f"(call {c.call} of {loc.calls})</td></tr><tr><th>module</th><td><code>{esc(c.module)}</code>"
                  f"</td></tr><tr><th>phase</th><td>{esc(c.phase)}</td></tr><tr><th>kind</th><td><b>"
                  f"{esc(c.verdict)}</b> (local error {_f(c.local_error)}, accumulated {_f(c.accumulated_error)})"
                  f"</td></tr><tr><th>repro</th><td><code>{esc(run_repro)}</code></td></tr><tr><th>found by</th>"
                  f"<td>{esc(loc.strategy)}, {loc.runs} model runs, {loc.seconds:.1f}s</td></tr></table>")
    failing = "".join(
        f"<tr><td>{esc(r.status)}</td><td><code>{esc(r.op)}</code></td><td>{esc(r.args)}</td>"
        f"<td>{esc(str(r.provenance.get('module', '')))} {esc(str(r.provenance.get('phase', '')))}</td>"
        f"<td>{esc(r.reason)}</td></tr>" for r in bad_cases[:200])
    failing_html = (f"<h2>Failing carved cases ({len(bad_cases)})</h2><table><tr><th>status</th><th>op</th>"
                    f"<th>arguments</th><th>where</th><th>why</th></tr>{failing}</table>" if bad_cases else "")
    amplified_html = "".join(
        f"<tr><td><code>{esc(r.op)}</code></td><td>{esc(r.variant)}: {esc(r.args)}</td><td>{esc(r.reason)}</td></tr>"
        for r in amplified[:200])
    if amplified_html:
        amplified_html = (f"<h2>Failing amplified variants ({len(amplified)})</h2><table><tr><th>op</th>"
                          f"<th>variant</th><th>why</th></tr>{amplified_html}</table>")
    kinds = "".join(
        f"<tr><td>{esc(op)}</td><td>{row['pass'] or ''}</td><td>{row['fail'] or ''}</td>"
        f"<td>{row['unsupported'] or ''}</td><td>{row['error'] or ''}</td><td>{row['calls']}</td></tr>"
        for op, row in res.tested.by_kind().items())
    steps = "".join(f"<tr><td>{s['phase']}</td><td>{s['max_abs']:.3g}</td><td>{s['kl']:.3g}</td>"
                    f"<td>{s['top5_overlap']:.2f}</td></tr>" for s in e.get("steps", []))
    repro_text = Path(res.repro).read_text() if res.repro else ""
    repro_html = (f"<details><summary>The repro file {esc(res.repro)}</summary><pre>{esc(repro_text)}</pre>"
                  "</details>" if res.repro else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>TapML debug: {esc(res.model)} on {esc(res.target)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:0;color:#222}} main{{padding:0 24px 24px}}
.verdict{{background:{color};color:#fff;padding:18px 24px;font-size:22px;font-weight:600}}
.verdict code{{background:rgba(255,255,255,.18);padding:0 4px}} .sub{{font-size:14px;font-weight:400;margin-top:6px}}
table{{border-collapse:collapse;font-size:12px;margin:8px 0}} td,th{{border-bottom:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}} table.answer{{font-size:15px}} table.answer th{{width:120px;color:#555}}
pre{{background:#f6f6f6;padding:8px;font-size:11px}} details{{margin:10px 0}} summary{{cursor:pointer;font-weight:600}}</style>
</head><body><div class="verdict" id="verdict">{verdict}<div class="sub">{esc(e2e)} · {esc(carved)}</div></div>
<main>{answer}
<h2>Error along the run, every op on the target</h2>{_curve_svg(res.drift, c.call if c else None)}
{failing_html}{amplified_html}
<details><summary>Every op kind of the carved tests ({t['cases']} cases)</summary>
<table><tr><th>op</th><th>pass</th><th>fail</th><th>unsupported</th><th>error</th><th>calls</th></tr>{kinds}</table>
</details>
<details><summary>Per decode step: logits against the reference</summary>
<table><tr><th>step</th><th>max |Δ logits|</th><th>KL</th><th>top-5 overlap</th></tr>{steps}</table></details>
{repro_html}
</main></body></html>
"""


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


"""Reports of test runs: rich terminal tables, JSON (one record per case + totals) and a self-contained HTML page.

Rendering only: results come from `tapml.replay`; nothing here runs ops or reads stores.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tapml.errors import TapmlError
from tapml.paths import check_output_file, short
from tapml.results import STATUSES, TestRun

_COLORS = {"pass": "#2e7d32", "fail": "#c62828", "unsupported": "#9e9e9e", "error": "#ef6c00"}


def write_atomic(path: str | os.PathLike, text: str, what: str = "output file") -> None:
    """Write a file whole or not at all: a temp file beside it, renamed over it. Any failure is a one-line
    TapmlError naming `what` (the option, e.g. "--json") and leaves nothing behind: no temp file, no folder
    this call made."""
    p = check_output_file(path, what)
    made: list[Path] = []  # folders this call creates, removed again when the write fails
    tmp, done = None, False
    try:
        missing = [a for a in [p.parent, *p.parent.parents] if not a.exists()]
        for a in reversed(missing):
            a.mkdir()
            made.append(a)
        # A short temp name: `p.name` may be near NAME_MAX already.
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tapml-", suffix=".tmp")
        # backslashreplace: a path from a non-UTF-8 argv (surrogates) must not fail the write after the run.
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make every report private to its writer
        os.replace(tmp, p)
        done = True
    except OSError as e:
        raise TapmlError(f"cannot write {what} {short(p)}: {e.strerror or e}; choose another path") from None
    finally:
        if not done:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            for a in reversed(made):
                with contextlib.suppress(OSError):
                    a.rmdir()


def print_summary(run: TestRun, console: Console | None = None, failures: int = 20) -> None:
    console = console or Console()
    # Store paths, op names, modules and reasons are data: escaped, so a "[" in them is not read as rich markup.
    table = Table(title=f"{escape(str(run.store))} on {escape(run.backend)}", title_justify="left")
    table.add_column("op")
    for s in STATUSES:
        table.add_column(s, justify="right", style={"pass": "green", "fail": "red", "error": "yellow",
                                                     "unsupported": "dim"}[s])
    table.add_column("calls", justify="right")
    for op, row in run.by_kind().items():
        table.add_row(escape(op), *[str(row[s] or "") for s in STATUSES], str(row["calls"]))
    console.print(table)
    bad = [r for r in run.results if r.status in ("fail", "error")]
    for r in bad[:failures]:
        p = r.provenance
        console.print(f"[red]{r.status.upper()}[/] {escape(r.op)} {escape(str(r.args))}  "
                      f"[dim]{escape(str(p.get('module', '')))} {escape(str(p.get('phase', '')))} "
                      f"#{escape(str(p.get('index', '')))}[/]\n    {escape(str(r.reason))}", highlight=False)
    if len(bad) > failures:
        console.print(f"... and {len(bad) - failures} more failing cases (see --json/--html)")
    t = run.totals()
    console.print(f"[bold]{t['cases']} cases[/] ({t['calls_covered']} calls): [green]{t['pass']} passed[/], "
                  f"[red]{t['fail']} failed[/], {t['unsupported']} unsupported, [yellow]{t['error']} errors[/] "
                  f"in {run.seconds:.1f}s", highlight=False)
    if run.amplify_seed is not None:
        print_amplified(run, console, failures)


def print_amplified(run: TestRun, console: Console, failures: int = 20) -> None:
    """The amplified variants apart from the real cases: each failing one (which variant, how it was made),
    then one line of totals."""
    bad = [r for r in run.amplified if r.status in ("fail", "error")]
    for r in bad[:failures]:
        console.print(f"[red]AMPLIFIED {r.status.upper()}[/] {escape(r.op)} {escape(r.args)}  [dim]case "
                      f"{r.case_id}, {escape(r.variant)}[/]\n    {escape(r.reason)}", highlight=False)
    if len(bad) > failures:
        console.print(f"... and {len(bad) - failures} more failing amplified variants (see --json/--html)")
    a = run.amplified_totals()
    console.print(f"[bold]amplified: {a['variants']} variants[/] of {a['cases']} cases (seed {run.amplify_seed}): "
                  f"[green]{a['pass']} passed[/], [red]{a['fail']} failed[/], {a['unsupported']} unsupported, "
                  f"[yellow]{a['error']} errors[/]", highlight=False)


def to_json(run: TestRun) -> str:
    return json.dumps(run.as_dict(), indent=1, default=_jsonable)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return repr(x)
    return str(x)


def _bar_svg(by_kind: dict[str, dict[str, int]], width: int = 560) -> str:
    rows = list(by_kind.items())[:60]
    h = 16
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 260}" height="{h * len(rows) + 4}">']
    for i, (op, row) in enumerate(rows):
        total = sum(row[s] for s in STATUSES) or 1
        x = 250
        parts.append(f'<text x="0" y="{i * h + 12}" font-size="11" font-family="monospace">{html.escape(op)}</text>')
        for s in STATUSES:
            w = width * row[s] / total
            if w:
                parts.append(f'<rect x="{x:.1f}" y="{i * h + 2}" width="{w:.1f}" height="{h - 4}" '
                             f'fill="{_COLORS[s]}"><title>{s}: {row[s]}</title></rect>')
            x += w
    parts.append("</svg>")
    return "".join(parts)


def to_html(run: TestRun) -> str:
    t = run.totals()
    esc = html.escape
    rows = []
    for r in run.results:
        p = r.provenance
        m = r.metrics
        metric = " ".join(f"{k}={m[k]:.3g}" for k in ("e_tgt", "e_ref", "max_abs", "cosine") if
                          isinstance(m.get(k), float))
        rows.append(
            f'<tr class="{r.status}"><td>{r.case_id}</td><td>{esc(r.op)}</td><td><code>{esc(r.args)}</code></td>'
            f'<td><b style="color:{_COLORS[r.status]}">{r.status}</b></td><td>{esc(r.rule)}</td>'
            f'<td>{esc(metric)}</td><td>{esc(str(p.get("module", "")))}</td><td>{esc(str(p.get("phase", "")))}</td>'
            f'<td>{r.calls}</td><td>{esc(r.reason)}</td></tr>')
    kinds = "".join(
        f"<tr><td>{esc(op)}</td>" + "".join(f"<td>{row[s] or ''}</td>" for s in STATUSES) + f"<td>{row['calls']}</td></tr>"
        for op, row in run.by_kind().items())
    amplified = _amplified_html(run) if run.amplify_seed is not None else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>TapML: {esc(run.store)} on {esc(run.backend)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}}
code{{font-size:11px}} .tot span{{margin-right:18px;font-size:16px}} tr.fail,tr.error{{background:#fff3f3}}
</style></head><body>
<h1>TapML test report</h1>
<p>store <code>{esc(run.store)}</code> · backend <b>{esc(run.backend)}</b> · {run.seconds:.1f}s</p>
<p class="tot"><span>{t['cases']} cases ({t['calls_covered']} calls)</span>
<span style="color:{_COLORS['pass']}">{t['pass']} passed</span><span style="color:{_COLORS['fail']}">{t['fail']} failed</span>
<span style="color:{_COLORS['unsupported']}">{t['unsupported']} unsupported</span>
<span style="color:{_COLORS['error']}">{t['error']} errors</span></p>
<h2>By op</h2>{_bar_svg(run.by_kind())}
<table><tr><th>op</th>{''.join(f'<th>{s}</th>' for s in STATUSES)}<th>calls</th></tr>{kinds}</table>
<h2>Cases</h2>
<p><label><input type="checkbox" id="bad" onchange="for(const r of document.querySelectorAll('#cases tr.pass,#cases tr.unsupported'))r.style.display=this.checked?'none':''"> only failures and errors</label></p>
<table id="cases"><tr><th>#</th><th>op</th><th>arguments</th><th>status</th><th>rule</th><th>metrics</th>
<th>module</th><th>phase</th><th>calls</th><th>reason</th></tr>{''.join(rows)}</table>
{amplified}
</body></html>
"""


def _amplified_html(run: TestRun) -> str:
    """The amplified variants' section: totals by variant kind, then every variant that did not pass."""
    esc = html.escape
    a = run.amplified_totals()
    kinds: dict[str, dict[str, int]] = {}
    for r in run.amplified:
        row = kinds.setdefault(r.variant.split(":", 1)[0], {s: 0 for s in STATUSES})
        row[r.status] += 1
    by_kind = "".join(f"<tr><td>{esc(k)}</td>" + "".join(f"<td>{row[s] or ''}</td>" for s in STATUSES) + "</tr>"
                      for k, row in sorted(kinds.items()))
    bad = "".join(
        f'<tr class="{r.status}"><td>{r.case_id}</td><td>{esc(r.op)}</td><td>{esc(r.variant)}</td>'
        f'<td><code>{esc(r.args)}</code></td><td><b style="color:{_COLORS[r.status]}">{r.status}</b></td>'
        f"<td>{esc(r.reason)}</td></tr>" for r in run.amplified if r.status != "pass")
    return (f'<h2 id="amplified">Amplified variants</h2><p class="tot"><span>{a["variants"]} variants of '
            f'{a["cases"]} cases (seed {run.amplify_seed})</span><span style="color:{_COLORS["pass"]}">{a["pass"]} '
            f'passed</span><span style="color:{_COLORS["fail"]}">{a["fail"]} failed</span><span style="color:'
            f'{_COLORS["unsupported"]}">{a["unsupported"]} unsupported</span><span style="color:{_COLORS["error"]}">'
            f'{a["error"]} errors</span></p><table><tr><th>variant kind</th>'
            + "".join(f"<th>{s}</th>" for s in STATUSES) + f"</tr>{by_kind}</table>"
            + (f'<table id="amplified-failing"><tr><th>case</th><th>op</th><th>variant</th><th>arguments</th>'
               f"<th>status</th><th>how it was made, and why it failed</th></tr>{bad}</table>" if bad else ""))

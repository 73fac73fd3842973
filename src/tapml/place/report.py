"""The placement as a picture and tables: one box per partition in execution order, colored by backend, labelled
with its ops and measured time (PNG via matplotlib, embedded in an HTML page); whole-model times per backend beside
the placed model, the greedy baseline, search time, candidates measured and those excluded for wrong numerics.

It must not search or measure; it renders a `Placement`.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")


def colors(backends: list[str]) -> dict[str, str]:
    return {b: PALETTE[k % len(PALETTE)] for k, b in enumerate(backends)}


def _ms(s: Any, escape: bool = True) -> str:
    if isinstance(s, float):
        return f"{s * 1e3:.3f} ms"
    return html.escape(str(s)) if escape else str(s)


def partition_rows(placement: Any) -> list[dict[str, Any]]:
    g = placement.placed.graph
    rows = []
    for k, p in enumerate(placement.partitions):
        kinds = [g.kind(i).removeprefix("aten.") for i in sorted(p.ops)]
        rows.append({"index": k, "backend": p.backend, "ops": len(p.ops), "seconds": p.seconds,
                     "kinds": ", ".join(dict.fromkeys(kinds))})
    return rows


def png(placement: Any) -> bytes:
    """Top: the partitions in execution order, width ∝ op count, colored by backend, labelled with measured time.
    Bottom: whole-model time of each single backend, the greedy baseline and the placed model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    cmap = colors(placement.backends)
    rows = partition_rows(placement)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6), gridspec_kw={"height_ratios": [1, 1.3]})
    x = 0.0
    for r in rows:
        top.add_patch(Rectangle((x, 0), r["ops"], 1, facecolor=cmap[r["backend"]], edgecolor="black", lw=0.6))
        if r["ops"] >= max(1, len(placement.placed.graph) / 40):
            label = f"{r['kinds'][:18]}\n{_ms(r['seconds']) if r['seconds'] else ''}"
            top.text(x + r["ops"] / 2, 0.5, label, ha="center", va="center", fontsize=6, rotation=90)
        x += r["ops"]
    top.set_xlim(0, max(x, 1))
    top.set_ylim(0, 1)
    top.set_yticks([])
    top.set_xlabel("ops in execution order (one box per partition)")
    top.legend(handles=[Patch(color=c, label=b) for b, c in cmap.items()], loc="upper center", ncol=len(cmap),
               bbox_to_anchor=(0.5, 1.35), fontsize=8)
    names, times, cols = [], [], []
    for b, t in placement.single.items():
        if isinstance(t, float):
            names.append(b)
            times.append(t * 1e3)
            cols.append(cmap[b])
    if placement.greedy.get("seconds"):
        names.append("greedy priority")
        times.append(placement.greedy["seconds"] * 1e3)
        cols.append("#bbbbbb")
    names.append("placed")
    times.append(placement.seconds * 1e3)
    cols.append("black")
    bottom.barh(names, times, color=cols)
    bottom.set_xlabel("whole-model time (ms, median)")
    if max(times) > 30 * min(times):  # one slow backend would flatten the rest to nothing
        bottom.set_xscale("log")
        bottom.set_xlabel("whole-model time (ms, median, log scale)")
    for k, t in enumerate(times):
        bottom.text(t, k, f" {t:.3f}", va="center", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def html_page(placement: Any, title: str = "TapML placement") -> str:
    s = placement.summary()
    cmap = colors(placement.backends)
    img = base64.b64encode(png(placement)).decode()
    best = s["best_single"]
    single = "".join(f"<tr><td>{html.escape(b)}</td><td>{_ms(t)}</td></tr>" for b, t in s["single"].items())
    greedy = s["greedy"].get("seconds")
    parts = "".join(
        f"<tr><td>{r['index']}</td><td style='background:{cmap[r['backend']]};color:white'>"
        f"{html.escape(r['backend'])}</td><td>{r['ops']}</td><td>{_ms(r['seconds']) if r['seconds'] else '-'}</td>"
        f"<td>{html.escape(r['kinds'])}</td></tr>" for r in partition_rows(placement))
    excluded = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                       for k, v in s["excluded"].items()) or "<tr><td colspan=2>none</td></tr>"
    speed = f"{s['speedup']:.3f}x over {html.escape(best[0])}" if best else "-"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>device {html.escape(s['device'])}; placed model {_ms(s['placed_seconds'])} ({speed});
{s['partitions']} partitions; search {s['search_seconds']:.2f} s; measuring {s['measure_seconds']:.1f} s;
{s['candidates']} candidates, {s['measured']} measured, {s['cached']} from the cost cache,
{len(s['excluded'])} excluded for wrong numerics, {s['unsupported']} unsupported;
{s['host_crossings']} tensors cross through host memory; final verdict
{'PASS' if s['verdict']['passed'] else 'FAIL'} ({html.escape(s['verdict']['rule'])}).</p>
<img src="data:image/png;base64,{img}" style="max-width:100%">
<h2>Whole-model time per backend</h2><table><tr><th>backend</th><th>time</th></tr>{single}
<tr><td>greedy priority ({html.escape(','.join(s['greedy'].get('priority', [])))})</td><td>{_ms(greedy) if greedy else '-'}</td></tr>
<tr><th>placed</th><th>{_ms(s['placed_seconds'])}</th></tr></table>
<h2>Partitions</h2><table><tr><th>#</th><th>backend</th><th>ops</th><th>measured</th><th>op kinds</th></tr>{parts}</table>
<h2>Excluded for wrong numerics</h2><table><tr><th>candidate</th><th>verdict</th></tr>{excluded}</table>
</body></html>"""


def write(placement: Any, html_path: str | Path, title: str = "TapML placement") -> tuple[Path, Path]:
    """The HTML page at `html_path` and the PNG beside it (same name, .png)."""
    html_path = Path(html_path)
    png_path = html_path.with_suffix(".png")
    png_path.write_bytes(png(placement))
    html_path.write_text(html_page(placement, title))
    return html_path, png_path


def text(placement: Any) -> str:
    """A plain-text summary for the terminal."""
    s = placement.summary()
    lines = [f"{'backend':<24} {'whole model':>14}"]
    for b, t in s["single"].items():
        lines.append(f"{b:<24} {_ms(t, False)[:90]:>14}")
    if s["greedy"].get("seconds"):
        lines.append(f"{'greedy priority':<24} {_ms(s['greedy']['seconds']):>14}")
    lines.append(f"{'placed':<24} {_ms(s['placed_seconds']):>14}")
    best = s["best_single"]
    if best:
        lines.append(f"speedup over the best single backend ({best[0]}): {s['speedup']:.3f}x")
    lines.append(f"partitions {s['partitions']} ({', '.join(f'{b}×{n}' for b, n in _counts(placement).items())}); "
                 f"search {s['search_seconds']:.2f} s; candidates {s['candidates']}, measured {s['measured']}, "
                 f"cached {s['cached']}, excluded for wrong numerics {len(s['excluded'])}")
    return "\n".join(lines)


def _counts(placement: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in placement.partitions:
        out[p.backend] = out.get(p.backend, 0) + 1
    return out

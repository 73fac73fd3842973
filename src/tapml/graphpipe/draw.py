"""Pictures of a pipeline: the stage DAG and per-device timelines (simulated and measured side by side), as a
self-contained HTML page (inline SVG) or a PNG (Pillow).

It only draws what it is given: events are (rank, kind, stage, micro-batch, start s, end s) rows.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#1f77b4", "#2ca02c"]
Row = Sequence[Any]  # rank, kind, stage, mb, start, end


def _color(stage: int, kind: str) -> str:
    base = PALETTE[stage % len(PALETTE)]
    if kind == "F":
        return base
    r, g, b = (int(base[i:i + 2], 16) for i in (1, 3, 5))
    return "#{:02x}{:02x}{:02x}".format(*(int(c * 0.6) for c in (r, g, b)))


def timeline_svg(events: Sequence[Row], title: str, width: int = 900, lane: int = 22,
                 horizon: float | None = None) -> str:
    """One lane per rank; forward boxes in the stage's colour, backward darker, labelled with the micro-batch."""
    ranks = sorted({int(e[0]) for e in events})
    end = horizon or max((float(e[5]) for e in events), default=1.0) or 1.0
    left, top = 60, 24
    h = top + lane * len(ranks) + 24
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" font-family="sans-serif" '
           f'font-size="10"><text x="4" y="14" font-size="12">{html.escape(title)}</text>')]
    scale = (width - left - 10) / end
    for i, r in enumerate(ranks):
        y = top + i * lane
        out.append(f'<text x="4" y="{y + lane * 0.65:.1f}">rank {r}</text>')
    for e in events:
        r, kind, stage, mb, start, stop = int(e[0]), str(e[1]), int(e[2]), int(e[3]), float(e[4]), float(e[5])
        y = top + ranks.index(r) * lane
        x, w = left + start * scale, max(0.5, (stop - start) * scale)
        out.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{lane - 4}" fill="{_color(stage, kind)}">'
                   f'<title>{kind} stage {stage} micro-batch {mb}: {start * 1e3:.3f}–{stop * 1e3:.3f} ms</title></rect>')
        if w > 14:
            out.append(f'<text x="{x + w / 2:.1f}" y="{y + lane * 0.65:.1f}" fill="white" text-anchor="middle">'
                       f'{kind}{mb}</text>')
    for k in range(6):
        t = end * k / 5
        x = left + t * scale
        out.append(f'<line x1="{x:.1f}" y1="{h - 20}" x2="{x:.1f}" y2="{h - 16}" stroke="black"/>'
                   f'<text x="{x:.1f}" y="{h - 6}" text-anchor="middle">{t * 1e3:.2f} ms</text>')
    out.append("</svg>")
    return "".join(out)


def stage_dag_svg(stages: Sequence[Sequence[str]], replicas: Sequence[int], edges: Sequence[tuple[int, int]],
                  title: str, width: int = 900) -> str:
    """Stages placed by their depth from the sources, edges as arrows; each box names its layers."""
    depth = [0] * len(stages)
    for s, t in sorted(edges, key=lambda e: e[1]):
        depth[t] = max(depth[t], depth[s] + 1)
    cols: dict[int, list[int]] = {}
    for s, d in enumerate(depth):
        cols.setdefault(d, []).append(s)
    bw, bh, gapx, gapy = 170, 46, 60, 14
    rows = max(len(v) for v in cols.values())
    h = 30 + rows * (bh + gapy)
    pos = {s: (10 + d * (bw + gapx), 26 + i * (bh + gapy)) for d, ss in cols.items() for i, s in enumerate(ss)}
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(width, 20 + len(cols) * (bw + gapx))}" '
           f'height="{h}" font-family="sans-serif" font-size="10"><defs><marker id="a" markerWidth="8" '
           f'markerHeight="8" refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z"/></marker></defs>'
           f'<text x="4" y="14" font-size="12">{html.escape(title)}</text>')]
    for s, t in edges:
        (x1, y1), (x2, y2) = pos[s], pos[t]
        out.append(f'<line x1="{x1 + bw}" y1="{y1 + bh / 2}" x2="{x2}" y2="{y2 + bh / 2}" stroke="#555" '
                   f'marker-end="url(#a)"/>')
    for s, (x, y) in pos.items():
        names = ", ".join(stages[s])
        short = names if len(names) <= 34 else names[:31] + "…"
        out.append(f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="5" fill="{_color(s, "F")}" '
                   f'opacity="0.9"><title>{html.escape(names)}</title></rect>'
                   f'<text x="{x + 6}" y="{y + 16}" fill="white" font-weight="bold">stage {s} × {replicas[s]} '
                   f'device{"s" if replicas[s] > 1 else ""}</text>'
                   f'<text x="{x + 6}" y="{y + 32}" fill="white">{html.escape(short)}</text>')
    out.append("</svg>")
    return "".join(out)


def write_html(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """A self-contained page: each section a heading and an SVG or preformatted text."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{c}" for h, c in sections)
    p = Path(path)
    p.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                 f'<style>body{{font-family:sans-serif;margin:20px}} pre{{background:#f4f4f4;padding:8px}}</style>'
                 f'</head><body><h1>{html.escape(title)}</h1>{body}</body></html>', encoding="utf-8")
    return p


def timeline_png(path: str | Path, panels: Sequence[tuple[str, Sequence[Row]]], width: int = 1200,
                 lane: int = 22) -> Path:
    """The timelines stacked in one PNG (simulated above measured, say), each on its own time axis."""
    from PIL import Image, ImageDraw

    heights = [30 + lane * max(1, len({int(e[0]) for e in ev})) + 20 for _, ev in panels]
    img = Image.new("RGB", (width, sum(heights) + 10), "white")
    d = ImageDraw.Draw(img)
    y0 = 5
    for (title, ev), hh in zip(panels, heights):
        ranks = sorted({int(e[0]) for e in ev})
        end = max((float(e[5]) for e in ev), default=1.0) or 1.0
        left = 60
        scale = (width - left - 10) / end
        d.text((4, y0), f"{title} ({end * 1e3:.2f} ms)", fill="black")
        for i, r in enumerate(ranks):
            d.text((4, y0 + 24 + i * lane + 4), f"rank {r}", fill="black")
        for e in ev:
            r, kind, stage, mb, start, stop = int(e[0]), str(e[1]), int(e[2]), int(e[3]), float(e[4]), float(e[5])
            y = y0 + 24 + ranks.index(r) * lane
            x1, x2 = left + start * scale, left + max(stop * scale, start * scale + 1)
            d.rectangle([x1, y + 2, x2, y + lane - 3], fill=_color(stage, kind))
            if x2 - x1 > 18:
                d.text((x1 + 2, y + 5), f"{kind}{mb}", fill="white")
        y0 += hh
    p = Path(path)
    img.save(p)
    return p

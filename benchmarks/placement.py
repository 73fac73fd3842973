"""Automatic backend placement (issue 13), each placed model beside its baselines in the same run: every single
backend's whole-model time, the greedy priority placement (torch-TensorRT style: the first backend in the list
takes its largest correct candidates, the next one what is left), the placed model (DP + evolutionary refinement),
its speedup over the best single backend, search seconds and partitions; per model, batch and dtype.

    .venv/bin/python benchmarks/placement.py --smoke                  # seconds: DCGAN (small), torch + onnxruntime
    .venv/bin/python benchmarks/placement.py                          # CPU: small models, torch inductor onnxruntime tvm iree
    .venv/bin/python benchmarks/placement.py --device cuda --full     # one H200: full sizes, batch 1 and 16, fp32 + fp16

A backend that cannot run on the device is reported as missing, not fatal. Markdown on stdout; rows in --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from tapml.errors import TapmlError, first_line
from tapml.place import models
from tapml.place.api import DEFAULT_CPU, DEFAULT_CUDA, place
from tapml.place.engines import engine


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def available(backends: list[str], device: str, cache_dir: str | None) -> tuple[list[str], dict[str, str]]:
    ok, missing = [], {}
    for b in backends:
        try:
            engine(b, device, cache_dir)
            ok.append(b)
        except Exception as e:  # not installed, no CUDA build, …: reported in the table, the run goes on
            missing[b] = first_line(e)[:120]
    return ok, missing


def cast(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def ms(t: object) -> str:
    return f"{t * 1e3:.3f}" if isinstance(t, float) else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration (seconds)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="full-size models (default: the small CPU configs)")
    ap.add_argument("--models", default=None, help=f"comma-separated, of {','.join(models.MODELS)}")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--dtypes", default=None, help="fp32 (CPU default) or fp32,fp16 (GPU default)")
    ap.add_argument("--backends", default=None)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of evolutionary refinement per model")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cache-dir", default=None, help="artifact cache (default: TAPML_CACHE_DIR)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    if a.smoke:
        names, batches, dtypes = ["dcgan"], [1], ["fp32"]
        backends = ["torch", "onnxruntime"] if not cuda else ["torch-cuda", "inductor"]
        a.budget, a.repeats = 1.0, 5
    else:
        names = a.models.split(",") if a.models else list(models.MODELS)
        batches = [int(b) for b in a.batches.split(",")]
        dtypes = (a.dtypes or ("fp32,fp16" if cuda else "fp32")).split(",")
        backends = a.backends.split(",") if a.backends else list(DEFAULT_CUDA if cuda else DEFAULT_CPU)
    backends, missing = available(backends, a.device, a.cache_dir)
    print(f"device {a.device}; backends {', '.join(backends)}"
          + "".join(f"\nmissing: {b}: {why}" for b, why in missing.items()))
    if not backends:
        sys.exit("no backend can run here")
    rows, records = [], []
    for name in names:
        spec = models.get(name)
        for batch in batches:
            for dt in dtypes:
                dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]
                model = spec.build(small=not a.full).to(dtype)
                inputs = cast(spec.inputs(batch, small=not a.full), dtype)
                t0 = time.perf_counter()
                try:
                    p = place(model, inputs, backends, a.device, budget=a.budget, repeats=a.repeats,
                              cache_dir=a.cache_dir, progress=lambda m: print("  " + m, file=sys.stderr))
                except TapmlError as e:
                    print(f"{name} b{batch} {dt}: cannot place: {e}")
                    continue
                s = p.summary()
                best = s["best_single"]
                row = {"model": name, "batch": batch, "dtype": dt, "single": s["single"], "best_single": best,
                       "greedy": s["greedy"].get("seconds"), "placed": s["placed_seconds"],
                       "speedup": s["speedup"], "search_s": s["search_seconds"], "measure_s": s["measure_seconds"],
                       "wall_s": time.perf_counter() - t0, "partitions": s["partitions"],
                       "backends_used": sorted({q.backend for q in p.partitions}),
                       "candidates": s["candidates"], "excluded": len(s["excluded"]),
                       "verdict": s["verdict"]["passed"]}
                records.append(row)
                rows.append([name, batch, dt, *[ms(s["single"].get(b)) for b in backends],
                             f"{best[0]} {ms(best[1])}" if best else "—", ms(row["greedy"]), ms(row["placed"]),
                             f"{row['speedup']:.3f}x" if row["speedup"] else "—", f"{row['search_s']:.1f}",
                             f"{row['partitions']} ({'+'.join(row['backends_used'])})", row["excluded"],
                             "pass" if row["verdict"] else "FAIL"])
                print(f"{name} b{batch} {dt}: placed {ms(row['placed'])} ms, best single {ms(best[1]) if best else '—'}"
                      f" ms, speedup {row['speedup'] or 0:.3f}x; greedy {ms(row['greedy'])} ms; "
                      + ", ".join(f"{b} {ms(t)}" for b, t in s["single"].items())
                      + f"; {row['partitions']} partitions, search {row['search_s']:.1f} s", flush=True)
                if a.json:  # after every row: a long run stopped early keeps what it measured
                    a.json.write_text(json.dumps({"device": a.device, "backends": backends, "missing": missing,
                                                  "rows": records}, indent=1, default=str))
    print()
    print(table(["model", "batch", "dtype", *[f"{b} (ms)" for b in backends], "best single (ms)",
                 "greedy priority (ms)", "placed (ms)", "speedup over best single", "search s", "partitions",
                 "excluded (numerics)", "verdict"], rows))
    speedups = [r["speedup"] for r in records if r["speedup"]]
    if speedups:
        geo = math.exp(sum(math.log(x) for x in speedups) / len(speedups))
        print(f"\ngeomean speedup over best single backend: {geo:.3f}x; worst {min(speedups):.3f}x "
              f"({len(speedups)} configurations)")
    if a.json:
        a.json.write_text(json.dumps({"device": a.device, "backends": backends, "missing": missing,
                                      "rows": records}, indent=1, default=str))


if __name__ == "__main__":
    main()

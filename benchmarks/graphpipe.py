"""GraphPipe figures, each beside its baseline in the same run:

1. predicted throughput (simulated step of each plan's schedule) for 2/4/8 devices: GraphPipe's stage DAG
   against the PipeDream-style chain under PyTorch's 1F1B and GPipe; search seconds of GraphPipe against the
   Piper-style planner (goal: ≥ 10x faster);
2. the simulator against a real run of the same schedule time-sliced on ONE device (every stage in turn);
3. a measured run of all three schedules under torchrun (gloo on the CPU, NCCL on GPUs) with equal ranks,
   global batch and micro-batch: samples/s, peak memory per rank, bubble, simulated beside measured step.

    .venv/bin/python benchmarks/graphpipe.py                          # CPU: tiny models, 4 gloo ranks
    .venv/bin/python benchmarks/graphpipe.py --device cuda            # one H200: GPU-size models, 1 + 2 (no 3)
    .venv/bin/python benchmarks/graphpipe.py --device cuda --launch 8 # 8 GPUs (NCCL): 1 + 2 + 3

Markdown tables on stdout; everything in --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

from tapml.errors import TapmlError
from tapml.graphpipe import api
from tapml.graphpipe.planner import plan_graphpipe, plan_pipedream, plan_piper
from tapml.graphpipe.schedule import GPIPE, ONE_F_ONE_B, build
from tapml.graphpipe.simulator import StageCosts, simulate


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def sim(p, lg, hw, kind):
    s = simulate(build(p, lg, kind), StageCosts.of(p, lg), hw)
    over = max(s.peak_memory.values()) > hw.memory
    return s, over


def predicted(models, size, device, dtype, devices, hw, piper_budget) -> tuple[list[list], list[list], dict]:
    """Rows of predicted samples/s and of search seconds, per model and device count."""
    rows, search, raw = [], [], {}
    for name in models:
        batch = api.default_batch(name, size)
        lg = api.profile(name, size, device, batch, dtype)
        piper_gave_up = None
        for d in devices:
            fits = [b for b in range(1, batch + 1) if batch % b == 0 and batch // b >= d]
            gp = plan_graphpipe(lg, d, batch, hw)
            dag = plan_graphpipe(lg, d, batch, hw, replicate=False)
            try:
                chain = plan_pipedream(lg, d, batch, hw, fits, exact=True)
            except TapmlError:
                chain = None
            cells = [name, d]
            rec = {}
            for label, p, kind in (("graphpipe", gp, ONE_F_ONE_B), ("graphpipe 1 dev/stage", dag, ONE_F_ONE_B),
                                   ("1f1b", chain, ONE_F_ONE_B), ("gpipe", chain, GPIPE)):
                if p is None:
                    cells.append("—")
                    continue
                s, over = sim(p, lg, hw, kind)
                rec[label] = {"samples_s": batch / s.step_s, "step_s": s.step_s, "bubble": s.bubble,
                              "stages": len(p.stages), "depth": p.estimate.depth, "micro": p.micro_batch,
                              "peak": max(s.peak_memory.values()), "over_memory": over}
                cells.append(f"{batch / s.step_s:,.1f}{' (OOM)' if over else ''} · {len(p.stages)}st/d{p.estimate.depth}")
            best_base = max((rec[k]["samples_s"] for k in ("1f1b", "gpipe") if k in rec and not rec[k]["over_memory"]),
                            default=math.nan)
            cells.append(f"{rec['graphpipe']['samples_s'] / best_base:.2f}x")
            rows.append(cells)
            t = time.perf_counter()
            if piper_gave_up is not None:  # more devices only make Piper's program longer
                pis, pis_txt = piper_gave_up, f"> {piper_gave_up:.1f} (stopped at fewer devices)"
            else:
                try:
                    pi = plan_piper(lg, d, batch, hw, limit=200_000, budget_s=piper_budget)
                    pis = pi.search_s
                    pis_txt = f"{pis:.3f}"
                except (TapmlError, TimeoutError):
                    pis = piper_gave_up = time.perf_counter() - t
                    pis_txt = f"> {pis:.1f} (stopped)"
            search.append([name, d, len(lg), f"{gp.search_s:.3f}", pis_txt,
                           f"{'≥ ' if piper_gave_up is not None else ''}{pis / gp.search_s:.0f}x"])
            raw[f"{name}/{d}"] = {"plans": rec, "graphpipe_search_s": gp.search_s, "piper_search_s": pis}
    return rows, search, raw


def sliced(models, size, device, dtype, devices, hw, steps) -> tuple[list[list], dict]:
    rows, raw = [], {}
    # every stage shares the one device: plan with its memory split over the devices the plan is for
    one = dataclasses.replace(hw, memory=hw.memory / devices)
    for name in models:
        batch = api.default_batch(name, size)
        lg = api.profile(name, size, device, batch, dtype)
        p = plan_graphpipe(lg, devices, batch, one)
        pred, meas, _ = api.time_sliced(name, p, lg, size, device, dtype, steps, hw)
        err = (pred - meas) / meas
        rows.append([name, f"{len(p.stages)} stages, {p.n_micro} × {p.micro_batch}", f"{pred * 1e3:.2f}",
                     f"{meas * 1e3:.2f}", f"{err:+.0%}"])
        raw[name] = {"predicted_s": pred, "measured_s": meas, "error": err}
    return rows, raw


def measured(models, size, device, dtype, devices, hw, steps, out) -> tuple[list[list], dict]:
    rows, raw = [], {}
    for name in models:
        runs, _lg = api.bench(name, devices, steps, size, device, None, dtype, 1e-3, "adam", hw,
                              Path(out) / name)
        base = max(r.samples_s for r in runs if r.label in ("1f1b", "gpipe"))
        for r in runs:
            b = r.bubble()
            peaks = sorted(r.result.peak_bytes.values())
            rows.append([name, r.label, f"{len(r.plan.stages)} (d{r.plan.estimate.depth})",
                         f"{r.plan.micro_batch} × {r.plan.n_micro}", f"{r.samples_s:,.1f}",
                         f"{r.step_s * 1e3:.2f}", f"{r.predicted.step_s * 1e3:.2f}",
                         "n/a" if b is None else f"{b:.0%}", f"{r.predicted.bubble:.0%}",
                         f"{api.fmt_bytes(peaks[0])}–{api.fmt_bytes(peaks[-1])}",
                         f"{r.samples_s / base:.2f}x" if r.label.startswith("graphpipe") else ""])
            raw[f"{name}/{r.label}"] = {"samples_s": r.samples_s, "step_s": r.step_s, "sim_step_s": r.predicted.step_s,
                                        "bubble": b, "sim_bubble": r.predicted.bubble,
                                        "peak_bytes": r.result.peak_bytes, "losses": r.result.losses}
    return rows, raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="mmt2,mmt4,dlrm,uno")
    ap.add_argument("--size", default=None, help="tiny or gpu (default: tiny on cpu, gpu on cuda)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--plan-devices", default="2,4,8")
    ap.add_argument("--sliced-devices", type=int, default=4)
    ap.add_argument("--launch", type=int, default=None,
                    help="ranks of the measured run (default: 4 on cpu; on cuda none unless given)")
    ap.add_argument("--measure-models", default="mmt4,dlrm,uno")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--piper-budget", type=float, default=30.0,
                    help="seconds before the Piper-style planner stops (it is not run again for more devices)")
    ap.add_argument("--out", default="graphpipe-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration: seconds, checks the script runs (tests/test_benchmarks.py)")
    a = ap.parse_args()
    if a.smoke:
        a.models, a.plan_devices, a.sliced_devices, a.steps, a.piper_budget = "uno", "2", 2, 2, 5.0
        a.launch, a.measure_models = 2, "uno"
    size = a.size or ("gpu" if a.device == "cuda" else "tiny")
    hw = api.hardware(a.device, "adam")
    models = a.models.split(",")
    launch = a.launch if a.launch is not None else (4 if a.device == "cpu" else 0)
    result: dict = {"device": a.device, "size": size, "hardware": hw.__dict__}
    print(f"# GraphPipe benchmark — {a.device}, {size} models, {a.dtype}\n")

    rows, search, result["predicted"] = predicted(models, size, a.device, a.dtype,
                                                  [int(x) for x in a.plan_devices.split(",")], hw, a.piper_budget)
    print("## Predicted samples/s (simulated step of each plan; stages/depth)\n")
    print(table(["model", "devices", "GraphPipe", "GraphPipe, 1 device/stage", "1F1B (chain)", "GPipe (chain)",
                 "GraphPipe / best baseline"], rows))
    print("\n## Planner search seconds\n")
    print(table(["model", "devices", "layers", "GraphPipe s", "Piper-style s", "speed-up"], search))

    rows, result["time_sliced"] = sliced(models, size, a.device, a.dtype, a.sliced_devices, hw, a.steps)
    print(f"\n## Simulator against the schedule time-sliced on one {a.device} device "
          f"(GraphPipe plan for {a.sliced_devices} devices)\n")
    print(table(["model", "plan", "predicted ms", "measured ms", "error"], rows))

    if launch:
        rows, result["measured"] = measured(a.measure_models.split(","), size, a.device, a.dtype, launch, hw,
                                            a.steps, a.out)
        print(f"\n## Measured on {launch} {'gloo processes' if a.device == 'cpu' else 'GPUs (NCCL)'} "
              "(median step after the first)\n")
        print(table(["model", "schedule", "stages", "micro-batch", "samples/s", "step ms", "simulated ms", "bubble",
                     "sim bubble", "peak/rank", "GraphPipe / best"], rows))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

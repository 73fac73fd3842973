"""Localization cost: model runs and seconds each strategy spends to find an injected fault, as one table.

Every fault is injected into the `torch` reference (so the bug's location is known) and localized by each
strategy on the same workload in the same run: `bisect`, `by-kind`, `by-module` and `carved`. A row says
whether the strategy named the injected instance, how many model runs it used (bisect's bound is
⌈log2 N⌉ + 2, N = op instances in one run) and the seconds it took.

Usage: python benchmarks/localize.py [--model llama] [--tokens 4] [--strategies bisect,by-kind,by-module,carved]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def faults_for(trace: list[tuple]) -> list[tuple[str, str, int | None]]:
    """(spec, op, expected per-overload index or None for 'the first instance that breaks') on this trace."""
    def instances(op: str, phase: str = "") -> list[int]:
        return [k for o, k, _m, p in trace if o == op and p.startswith(phase)]

    mm = "aten.mm.default"
    sdpa = "aten._scaled_dot_product_flash_attention_for_cpu.default"
    ks, dec = instances(mm), instances(mm, "decode:")
    out = [
        (f"noise:{mm}@{ks[len(ks) * 2 // 3]}", mm, ks[len(ks) * 2 // 3]),
        (f"offbyone:{mm}@{ks[len(ks) // 3]}", mm, ks[len(ks) // 3]),
        (f"zero:{mm}@{ks[len(ks) // 2]}", mm, ks[len(ks) // 2]),
        (f"fp16:{mm}@{ks[len(ks) // 4]}", mm, ks[len(ks) // 4]),
        (f"bf16:{mm}@{ks[-1]}", mm, ks[-1]),
        (f"decode-only:noise:{mm}@{dec[len(dec) // 2]}", mm, dec[len(dec) // 2]),
        ("decode-only:noise:aten.mul.Tensor", "aten.mul.Tensor", None),
        (f"dropmask:{sdpa}@0", sdpa, 0),
        ("fp16:aten.rsqrt.default", "aten.rsqrt.default", None),  # every instance: the first that breaks
    ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--strategies", default="bisect,by-kind,by-module,carved")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration: seconds, checks the script runs (tests/test_benchmarks.py)")
    a = ap.parse_args()
    if a.smoke:
        a.tokens, a.strategies = 2, "bisect"
    torch.set_num_threads(1)

    from rich.console import Console
    from rich.table import Table

    from tapml.backends import open_backend
    from tapml.backends.faults import parse_fault
    from tapml.migration import Placement, localize, run_mixed
    from tapml.workload import load_workload

    name, workload = load_workload(a.model, None, a.tokens)
    trace = run_mixed(workload, None, Placement.none()).trace
    n = len(trace)
    bound = math.ceil(math.log2(n)) + 2
    strategies = a.strategies.split(",")
    table = Table(title=f"localizing injected faults in zoo {name} ({n} op instances per run, "
                        f"{a.tokens} new tokens; bisect bound ⌈log2 N⌉+2 = {bound} runs)")
    for col in ("fault", "strategy", "named", "culprit", "runs", "seconds"):
        table.add_column(col, justify="right" if col in ("runs", "seconds") else "left")
    summary: dict[str, list[tuple[bool, int, float]]] = {s: [] for s in strategies}
    for spec, op, index in faults_for(trace)[: 1 if a.smoke else None]:
        for strategy in strategies:
            fault = parse_fault(spec)
            target = open_backend("torch", inject=fault)
            loc = localize(workload, name, target, strategy=strategy, tol=a.tol, fault=fault)
            c = loc.culprit
            # An instance fault: that instance. A kind fault: an instance the fault corrupts (in a decode step
            # for decode-only faults); which one breaks the result first is what the localizer finds out.
            hit = c is not None and c.op == op and (c.index == index if index is not None
                                                    else c.phase.startswith("decode:") or "decode-only" not in spec)
            summary[strategy].append((hit, loc.runs, loc.seconds))
            row = (spec, strategy, "yes" if hit else "NO",
                   f"{c.op}@{c.index} {c.phase} ({c.verdict.split(':')[0]})" if c else "none",
                   str(loc.runs), f"{loc.seconds:.1f}")
            print(" | ".join(row), flush=True)
            table.add_row(*row)
        table.add_section()
    console = Console(width=200)
    console.print(table)
    totals = Table(title="by strategy (medians over the faults above)")
    for col in ("strategy", "named", "model runs", "seconds"):
        totals.add_column(col)
    for strategy, rows in summary.items():
        totals.add_row(strategy, f"{sum(h for h, _r, _s in rows)}/{len(rows)}",
                       f"{statistics.median(r for _h, r, _s in rows):g} (max {max(r for _h, r, _s in rows)})",
                       f"{statistics.median(s for _h, _r, s in rows):.1f}")
    console.print(totals)


if __name__ == "__main__":
    main()

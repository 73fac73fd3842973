"""Run by torchrun from test_parallel_plans.py (not collected by pytest): on every rank, the collective merges
over uneven and empty shards, then transformers' generate() under each plan case; rank 0 writes what it saw."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tapml.parallel import run
from tapml.parallel.attention import attend
from tapml.parallel.merge import merge_all_gather, merge_tree


def merge_errors(rank: int, world: int) -> dict[str, float]:
    """Each rank attends over its slice of one shared K/V (uneven slices, rank 1's empty), then merges."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 8, 3, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 101, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 101, 16, generator=g, dtype=torch.float64)
    # rank 1 holds nothing; the others hold slices of different sizes
    bounds = [0, 101, 101] if world == 2 else [0, 37, 37] + [37 + 64 * i // (world - 2) for i in range(1, world - 1)]
    kk, vv = (t.repeat_interleave(4, 1) for t in (k, v))
    ref = torch.softmax(q @ kk.transpose(-1, -2) / 4.0, -1) @ vv
    errs = {}
    for dtype in (torch.float64, torch.float32):
        a, b = bounds[rank], bounds[rank + 1]
        out, lse = attend(q.to(dtype), k[:, :, a:b].to(dtype), v[:, :, a:b].to(dtype))
        for name, fn in (("tree", merge_tree), ("all-gather", merge_all_gather)):
            o, l_all = fn(out, lse)
            assert not torch.isnan(o).any() and not math.isnan(float(l_all.sum()))
            errs[f"{name}/{str(dtype).removeprefix('torch.')}"] = float((o.double() - ref).abs().max())
    errs["bounds"] = bounds
    return errs


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    rank, world, _ = run.init(run.DecodeJob("llama3-8b-small", timeout_s=60))
    report = {"merge": merge_errors(rank, world), "runs": {}}
    for name, case in cases.items():
        if case.get("mode", "eager") == "eager":  # transformers' generate() over the growing cache
            job = run.DecodeJob(case.pop("model"), context=45, steps=32, generate=True, timeout_s=60,
                                save_logits=str(out_dir / f"{name}.pt"), **case)
        else:  # the static cache's own decode loop: the prefill's token, 2 warm-up steps, 29 timed ones
            job = run.DecodeJob(case.pop("model"), context=45, steps=29, timeout_s=60, comm_steps=2, **case)
        r = run.run(job)
        report["runs"][name] = {k: r.get(k) for k in ("tokens", "ranks_agree", "shard_lengths", "plan", "world",
                                                         "params_held", "comm_share")}
    if rank == 0:
        (out_dir / "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

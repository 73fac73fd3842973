"""Every plan under torchrun with gloo ranks (4, and 3: cache parallelism takes any number): transformers'
generate() gives the single-process run's greedy tokens, logits within the fp64-oracle rule, and the
collective merges equal full attention over uneven and empty shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tapml.compare import compare_tensor
from tapml.parallel import models

WORKER = Path(__file__).parent / "parallel_ranks.py"
GEN = dict(do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=2, temperature=None, top_p=None, top_k=None,
           return_dict_in_generate=True, output_logits=True, max_new_tokens=32, min_new_tokens=32)
SMALL, MQA = "llama3-8b-small", "llama3-8b-mqa-small"

CASES = {
    4: {"small-tp": {"model": SMALL, "plan": "tp"},  # 4 ranks over 2 KV heads: each KV head held twice
        "small-cp": {"model": SMALL, "plan": "cp"},
        "small-cp-contig-empty": {"model": SMALL, "plan": "cp", "placement": "contiguous", "form": "all-gather",
                                  "capacity": 400},  # blocks of 100: ranks 1–3 hold nothing
        "small-hybrid": {"model": SMALL, "plan": "hybrid"},
        "mqa-tp": {"model": MQA, "plan": "tp"},  # one KV head on all four ranks
        "mqa-cp": {"model": MQA, "plan": "cp", "form": "all-gather"},
        "mqa-hybrid": {"model": MQA, "plan": "hybrid", "placement": "contiguous"},
        "small-hybrid-static": {"model": SMALL, "plan": "hybrid", "mode": "static"}},
    3: {"small-cp": {"model": SMALL, "plan": "cp"},
        "small-cp-contig": {"model": SMALL, "plan": "cp", "placement": "contiguous", "form": "all-gather"},
        "mqa-cp": {"model": MQA, "plan": "cp"},
        # the static cache over a group: 15 prefix tokens per rank, every new token written in each rank's
        # tail and visible only on its owner (interleaved)
        "mqa-cp-static": {"model": MQA, "plan": "cp", "mode": "static"}},
}


@pytest.fixture(scope="module")
def references():
    """The single-process run: stock transformers (sdpa, DynamicCache) in fp32, and its fp64 oracle."""
    res = {}
    for name in (SMALL, MQA):
        ids = models.context_ids(45, models.shape(name).vocab)
        res[name] = {dt: models.build(name, dtype=dt).generate(input_ids=ids, **GEN)
                     for dt in (torch.float32, torch.float64)}
    return res


def _launch(n: int, tmp_path: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "--max-restarts=0", str(WORKER), str(tmp_path), json.dumps(CASES[n])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "report.json").read_text())


@pytest.mark.parametrize("ranks", [4, 3])
def test_plans_decode_the_single_run_tokens_and_logits(ranks, tmp_path, references):
    report = _launch(ranks, tmp_path)
    merge = report["merge"]
    assert merge["bounds"][1] == merge["bounds"][2]  # rank 1 held an empty shard
    for form in ("tree", "all-gather"):
        assert merge[f"{form}/float64"] <= 1e-12, merge
        assert merge[f"{form}/float32"] <= 1e-6, merge
    for name, case in CASES[ranks].items():
        got = report["runs"][name]
        ref, oracle = references[case["model"]][torch.float32], references[case["model"]][torch.float64]
        assert got["world"] == ranks and got["ranks_agree"], (name, got)
        assert [t[0] for t in got["tokens"]] == ref.sequences[0, 45:].tolist(), name
        if case.get("mode") == "static":
            assert sum(got["shard_lengths"]) == 45 and got["comm_share"] is not None, (name, got)
            continue
        logits = torch.load(tmp_path / f"{name}.pt")  # [batch, steps, vocab]
        for step in range(32):
            v = compare_tensor(logits[:, step], ref.logits[step], oracle.logits[step])
            assert v.passed, (name, step, v.reason, v.metrics)
        if case["plan"] in ("cp", "hybrid"):
            assert sum(got["shard_lengths"]) == 45 + 31 and len(got["shard_lengths"]) == ranks
        full = models.shape(case["model"]).params()
        held = got["params_held"]  # rank 0's parameters: tp holds a slice of everything but norms/embeddings
        assert {"cp": held == full, "hybrid": full / 2 < held < full, "tp": held < full / 2}[case["plan"]], \
            (name, held, full)
        if name == "small-cp-contig-empty":
            assert got["shard_lengths"] == [76, 0, 0, 0]

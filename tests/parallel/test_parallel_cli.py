"""`tapml parallel advise` and `decode` as a user runs them (the sub-app alone: `python -m tapml.parallel.cli`),
and a rank that dies mid-decode: the others say so in one line and stop, never hang."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "tapml.parallel.cli"]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("model", "choice", "why"), [
    ("llama3-8b", "tp", "reads 8.0x the weights"),  # 8 KV heads: tp-8 shards the cache and the weights
    ("llama3-8b-mqa", "hybrid", "each KV head held 8x"),  # one KV head: tp duplicates the cache
])
def test_advise_names_the_plan_and_why(model, choice, why):
    p = _cli("advise", model, "--context", "1M", "--devices", "8", "--device", "h200")
    assert p.returncode == 0, p.stderr
    assert f"choice: {choice} —" in p.stdout and why in p.stdout
    for plan in ("single", "tp", "cp", "hybrid"):
        assert plan in p.stdout
    if model == "llama3-8b":  # 1M tokens of 8B KV (128 GiB) plus the weights exceed one H200
        assert "not fitting: single" in p.stdout


@pytest.mark.parametrize("args", [["advise", "gpt5"], ["advise", "llama3-8b", "--context", "lots"],
                                  ["advise", "llama3-8b", "--device", "tpu9"],
                                  ["decode", "llama3-8b-small", "--plan", "tp", "--devices", "3"],
                                  ["decode", "llama3-8b-small", "--plan", "ring"]])
def test_bad_input_is_one_line_and_exit_2(args):
    p = _cli(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tapml: error:"), p.stderr


def test_decode_times_a_plan_beside_its_prediction(tmp_path):
    out = tmp_path / "r.json"
    p = _cli("decode", "llama3-8b-small", "--plan", "cp", "--devices", "2", "--context", "600", "--chunk", "256",
             "--steps", "6", "--json", str(out), timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "measured ms/step" in p.stdout and "predicted ms/step" in p.stdout and "(calibrated)" in p.stdout
    assert "greedy tokens agree on every rank: True" in p.stdout
    r = json.loads(out.read_text())
    assert r["world"] == 2 and len(r["step_s"]) == 6 and r["median_s"] > 0
    assert sum(r["shard_lengths"]) == 600 + 2 + 6 + 8  # context, warm-up, timed and no-communication steps
    assert 0 <= r["comm_share"] < 1 and r["calibration"]["collective_latency_s"] > 0
    pred = r["predicted"]["calibrated"]
    assert pred["plan"] == "cp" and pred["devices"] == 2 and pred["comm_count"] == 2 * 2  # tree: 2 per layer


@pytest.mark.parametrize(("how", "timeout", "within"), [("vanish", 60, 45), ("stall", 8, 60)])
def test_a_rank_that_dies_mid_decode_stops_the_others_with_a_clear_error(tmp_path, how, timeout, within):
    # the last rank fails at decode step 3: it vanishes (exit 0, so torchrun does not kill the others for it)
    # and rank 0 notices through its collective at once, or it stalls and rank 0's wait ends at the group's
    # timeout; either way rank 0 says so in one line and exits 3, and the launch ends
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           "-m", "tapml.parallel.run", "llama3-8b-small", "--plan", "cp", "--context", "64", "--steps", "8",
           "--die-at", "3", "--die-how", how, "--timeout-s", str(timeout), "--out", str(tmp_path / "r.json")]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    took = time.monotonic() - t0
    assert p.returncode != 0 and not (tmp_path / "r.json").exists()
    said = [ln for ln in p.stderr.splitlines() if ln.startswith("tapml parallel: rank 0: decode step 3:")]
    assert said and "a peer rank died or stopped answering" in said[0], p.stderr[-2000:]
    assert took < within, took

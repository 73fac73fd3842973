"""`tapml graphpipe plan|train|bench` (the sub-app run alone): tables, pictures, one-line errors with exit 2."""

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "tapml.graphpipe.cli"]


def run(args, tmp_path, timeout=300):
    env = {"TAPML_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    import os

    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_plan_prints_and_draws(tmp_path):
    r = run(["plan", "uno", "--devices", "3", "--out", str(tmp_path / "o")], tmp_path)
    assert r.returncode == 0, r.stderr
    for planner in ("graphpipe", "pipedream", "piper"):
        assert planner in r.stdout
    assert "stage 0 (" in r.stdout
    html = (tmp_path / "o" / "plan-uno-3.html").read_text()
    assert "stage DAG" in html and "<svg" in html and "simulated" in html
    assert (tmp_path / "o" / "plan-uno-3.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, says", [
    (["plan", "uno", "--devices", "0"], "--devices must be ≥ 1"),
    (["plan", "resnet", "--devices", "2"], "unknown graphpipe model 'resnet'"),
    (["plan", "uno", "--devices", "2", "--size", "huge"], "unknown size 'huge'"),
    (["plan", "uno", "--devices", "2", "--memory-gb", "-1"], "--memory-gb must be a positive number"),
    (["train", "uno", "--devices", "2", "--steps", "0"], "--steps must be ≥ 1"),
    (["plan", "uno"], "Missing option '--devices'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, says):
    r = run([*args, "--out", str(tmp_path / "o")], tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and says in r.stderr and r.stderr.startswith("tapml: error: ")


@pytest.mark.slow
def test_train_and_bench(tmp_path):
    r = run(["train", "uno", "--devices", "2", "--steps", "2", "--out", str(tmp_path / "t")], tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "step 0: loss" in r.stdout and "step 1: loss" in r.stdout and "samples/s" in r.stdout
    assert (tmp_path / "t" / "train-uno-2.png").exists()
    r = run(["bench", "uno", "--devices", "2", "--steps", "2", "--out", str(tmp_path / "b")], tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    for label in ("graphpipe", "1f1b", "gpipe"):
        assert label in r.stdout
    assert "measured" in (tmp_path / "b" / "bench-uno-2.html").read_text()

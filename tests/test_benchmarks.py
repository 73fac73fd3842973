"""Every benchmark runs, in its smallest configuration (`--smoke`), as a fresh clone has it after `make setup`, so
none can rot unnoticed. Any script added to benchmarks/ is picked up and must accept --smoke."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py"))
# What each one's output must show: its baseline beside the measurement.
SHOWS = {
    "carve_overhead.py": "time ratio carve/eager",
    "localize.py": "by strategy",
    "rpc.py": "TVM time / TapML time",
    "bugfinding.py": "kill rate",
    "compiler_bug.py": "minifier / tapml",
    "webgpu_kernels.py": "dispatches",
    "cache_parallel.py": "LSE check",
    "graphpipe.py": "Planner search seconds",
    "placement.py": "speedup over best single",
}

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_in_its_smallest_configuration(script, tmp_path):
    r = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, f"{script} --smoke exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    assert SHOWS.get(script, "") in r.stdout, f"{script}: no {SHOWS.get(script)!r} in its output:\n{r.stdout[-2000:]}"


def test_every_benchmark_is_known():
    assert set(SCRIPTS) <= set(SHOWS), f"say what {set(SCRIPTS) - set(SHOWS)} must print in SHOWS"

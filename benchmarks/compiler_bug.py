"""Compiler replay at compile speed: an accuracy bug in Inductor's C++ code generation of one op kind, named by
`tapml carve` + `tapml test --backend inductor` and by PyTorch's accuracy minifier, side by side on this machine.

The bug is Inductor's own: `torch._inductor.config.cpp.inject_relu_bug_TESTING_ONLY = "accuracy"` makes its C++
codegen emit `x + 1` for relu (scalar and vectorized), the bug PyTorch's minifier tests plant. Both sides run in
fresh processes with empty caches (tapml's and Inductor's): tapml carves the zoo model on PyTorch and replays
every signature compiled by Inductor (many one-op graphs per compile); the minifier is the documented flow,
TORCHDYNAMO_REPRO_AFTER=aot TORCHDYNAMO_REPRO_LEVEL=4 on the model's forward (detect, dump the launcher), then
`python minifier_launcher.py` to a minimal repro. Prints both times, the ratio, and whether each named relu.

    python benchmarks/compiler_bug.py                 # zoo opt and resnet
    python benchmarks/compiler_bug.py --models resnet --max-new-tokens 1
    python benchmarks/compiler_bug.py --smoke         # the tests' two-layer model: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUG = "cpp.inject_relu_bug_TESTING_ONLY"
RELU = re.compile(r"\brelu_?\b")

TAPML_CHILD = r"""
import json, sys, time
import torch._inductor.config as ic
ic.cpp.inject_relu_bug_TESTING_ONLY = "accuracy"
from tapml.recorder import carve
from tapml.replay import run_tests
model, store, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
c = carve(model, store, max_new_tokens=n, progress=False)
t1 = time.perf_counter()
run = run_tests(store, "inductor", progress=False)
t2 = time.perf_counter()
bad = sorted({r.op for r in run.results if r.status in ("fail", "error")})
print("RESULT " + json.dumps({"carve_s": t1 - t0, "test_s": t2 - t1, "cases": c.cases, "failing_ops": bad,
                              "totals": run.totals()}))
"""

MINIFIER_CHILD = r"""
import json, sys, time
import torch
import torch._inductor.config as ic
ic.cpp.inject_relu_bug_TESTING_ONLY = "accuracy"
from tapml.workload import load_workload
_name, wl = load_workload(sys.argv[1], None, int(sys.argv[2]))
wl.model.forward = torch.compile(wl.model.forward, backend="inductor")
t0 = time.perf_counter()
try:
    with torch.no_grad():
        wl.run()
    detected = False
except Exception as e:
    detected = "accuracy" in repr(e).lower()
print("RESULT " + json.dumps({"detect_s": time.perf_counter() - t0, "detected": detected}))
"""


def _child(code: str, args: list[str], env: dict[str, str], cwd: str, timeout: float) -> tuple[dict, float, str]:
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    seconds = time.perf_counter() - start
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"child failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[7:]), seconds, p.stderr


def _env(tmp: Path) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TAPML_CACHE_DIR=str(tmp / "tapml-cache"), TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor-cache"),
               TORCH_COMPILE_DEBUG_DIR=str(tmp), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TORCHDYNAMO_REPRO_AFTER", None)
    env.pop("TORCHDYNAMO_REPRO_LEVEL", None)
    return env


def run_tapml(model: str, n: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="tapml-bench-") as tmp:
        res, seconds, _ = _child(TAPML_CHILD, [model, str(Path(tmp) / "store"), str(n)], _env(Path(tmp)), tmp,
                                 timeout)
    res["seconds"] = seconds
    res["named"] = ", ".join(res["failing_ops"]) or "(nothing)"
    res["right"] = bool(res["failing_ops"]) and all(RELU.search(op.split(".")[1]) for op in res["failing_ops"])
    return res


def run_minifier(model: str, n: int, timeout: float, minify: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="tapml-minifier-") as tmp:
        env = _env(Path(tmp))
        env.update(TORCHDYNAMO_REPRO_AFTER="aot", TORCHDYNAMO_REPRO_LEVEL="4")
        start = time.perf_counter()
        res, _, _ = _child(MINIFIER_CHILD, [model, str(n)], env, tmp, timeout)
        launchers = sorted(Path(tmp).rglob("minifier_launcher.py"))
        if minify and res["detected"] and launchers:
            # The launcher minifies in subprocesses and writes the minimal graph as repro.py in its cwd.
            subprocess.run([sys.executable, str(launchers[-1])], env=env, cwd=tmp, capture_output=True,
                           timeout=max(1.0, timeout - (time.perf_counter() - start)))
        res["seconds"] = time.perf_counter() - start
        repro = Path(tmp) / "repro.py"
        ops = sorted(set(re.findall(r"torch\.ops\.aten\.(\w+)", repro.read_text()))) if repro.exists() else []
    res["named"] = ", ".join(ops) or "(no minified repro)"
    res["right"] = bool(ops) and any(RELU.search(op) for op in ops) and len(ops) <= 2
    if not minify:  # smoke: whatever repro.py holds is the whole graph, not a minified one
        res["named"], res["right"] = ("(detected; not minified)" if res["detected"] else "(not detected)"), None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["opt", "resnet"])
    ap.add_argument("--max-new-tokens", type=int, default=4, help="LLM workload for both sides")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per side and model, seconds")
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration: the tests' two-layer model "
                    "(tests/models/tiny.py), checks the script runs (tests/test_benchmarks.py)")
    a = ap.parse_args()
    if a.smoke:
        a.models = [f"{Path(__file__).resolve().parents[1] / 'tests' / 'models' / 'tiny.py'}:make_model"]
        a.timeout = min(a.timeout, 600.0)
        print("smoke: the minifier side stops after detection (its minification takes minutes even here)")
    print(f"bug: torch._inductor.config.{BUG} = 'accuracy' (relu codegen emits x + 1); {os.cpu_count()} CPUs")
    rows = []
    for model in a.models:
        ours = run_tapml(model, a.max_new_tokens, a.timeout)
        print(f"{model}: tapml carve+test {ours['seconds']:.1f}s (carve {ours['carve_s']:.1f}s, test "
              f"{ours['test_s']:.1f}s, {ours['cases']} signatures) named {ours['named']} "
              f"[{'right' if ours['right'] else 'WRONG'}]", flush=True)
        theirs = run_minifier(model, a.max_new_tokens, a.timeout, minify=not a.smoke)
        ratio = theirs["seconds"] / ours["seconds"]
        rows.append((model, ours, theirs, ratio))
        print(f"{model}: minifier {theirs['seconds']:.1f}s (detect {theirs['detect_s']:.1f}s) named "
              f"{theirs['named']} [{ {True: 'right', False: 'WRONG', None: 'smoke'}[theirs['right']]}]; minifier / tapml = "
              f"{ratio:.2f}x",
              flush=True)
    print(json.dumps([{"model": m, "tapml_s": round(o["seconds"], 1), "minifier_s": round(t["seconds"], 1),
                       "ratio": round(r, 2), "tapml_right": o["right"], "minifier_right": t["right"]}
                      for m, o, t, r in rows]))


if __name__ == "__main__":
    main()

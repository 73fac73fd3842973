"""Carve overhead: carve time / plain eager time for zoo Llama generating 32 tokens, and the store's bytes
against a naive recorder that saves every call's tensors — both measured side by side in one run.

Goal (issue: TapML core): carve ≤ 1.3x eager time, store ≥ 5x smaller than the naive recording.
Carving is timed both ways, side by side: with the native (C++) dispatcher hook, tapml's default, and with the
Python TorchDispatchMode it falls back to (TAPML_CARVE_NATIVE=0).
Each ratio is the median over repeats of (variant time / the eager time measured next to it), so drift in the
machine's load between repeats cancels. Usage: python benchmarks/carve_overhead.py [--model llama] [--tokens 32]
[--repeat 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Bare(TorchDispatchMode):
    """A dispatch mode that only forwards each call: the cost every op-level recorder pays before recording."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration: seconds, checks the script runs (tests/test_benchmarks.py)")
    a = ap.parse_args()
    if a.smoke:
        a.tokens, a.repeat = 2, 1

    from tapml import zoo
    from tapml.recorder import carve

    torch.set_num_threads(1)  # the machines are shared and small: one thread keeps the ratio stable
    spec = zoo.get(a.model)
    work = spec.prepare(max_new_tokens=a.tokens)
    tmp = Path(tempfile.mkdtemp(prefix="tapml-bench-"))
    plain, bare, native_bare, carved, carved_py = [], [], [], [], []
    from tapml import _native

    t0 = time.perf_counter()
    hook = _native.carve_hook()  # build (or load from the cache) before timing anything
    t_build = time.perf_counter() - t0
    try:
        with torch.no_grad():
            work.run()  # warm-up: first-call allocations and lazy init are nobody's overhead
        for i in range(a.repeat):  # interleaved, so drift in machine load hits both sides alike
            t0 = time.perf_counter()
            with torch.no_grad():
                work.run()
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.no_grad(), _Bare():
                work.run()
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.no_grad(), _Bare():  # set up as the Recorder does; every key count-only after its 1st call
                hook.enable(lambda *_: None, lambda *_: False, lambda *_: None)
                try:
                    work.run()
                finally:
                    hook.disable()
            native_bare.append(time.perf_counter() - t0)
            order = (("1", carved), ("0", carved_py))
            for native, times in order if i % 2 == 0 else order[::-1]:  # alternate: neither goes first always
                os.environ["TAPML_CARVE_NATIVE"] = native
                out = tmp / f"s{i}"
                t0 = time.perf_counter()
                r = carve(spec.name, out, workload=work, samples=a.samples, max_new_tokens=a.tokens,
                          progress=False)
                times.append(time.perf_counter() - t0)
                shutil.rmtree(out)
        naive = carve(spec.name, tmp / "naive", workload=work, samples=a.samples, max_new_tokens=a.tokens,
                      progress=False, naive_bytes=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t_plain, t_bare, t_nbare, t_carve, t_py = (statistics.median(x)
                                               for x in (plain, bare, native_bare, carved, carved_py))
    r_bare, r_nbare, r_carve, r_py = (statistics.median(v / e for v, e in zip(x, plain))
                                      for x in (bare, native_bare, carved, carved_py))
    disk = naive.stats["disk_bytes"]
    print(f"model {spec.name} ({work.description}), {a.repeat} interleaved repeats, torch threads 1")
    print(f"  op calls per run          {r.calls}")
    print(f"  cases (signatures)        {naive.stats['cases']}  samples {naive.stats['samples']}")
    print(f"  plain eager (median)      {t_plain * 1e3:8.1f} ms")
    print(f"  empty dispatch mode       {t_bare * 1e3:8.1f} ms  ({r_bare:.2f}x: the floor of any "
          "Python TorchDispatchMode)")
    print(f"  native hook, no recording {t_nbare * 1e3:8.1f} ms  ({r_nbare:.2f}x: the C++ interception alone)")
    print(f"  carve, Python mode        {t_py * 1e3:8.1f} ms  ({r_py:.2f}x: TAPML_CARVE_NATIVE=0)")
    print(f"  carve, native hook        {t_carve * 1e3:8.1f} ms  (hook loaded in {t_build:.1f} s)")
    print(f"  time ratio carve/eager    {r_carve:8.2f}x   (goal <= 1.3x; native hook; per-repeat ratios: "
          + " ".join(f"{v / e:.2f}" for v, e in zip(carved, plain)) + ")")
    print(f"  naive recording           {naive.naive_bytes / 2**20:8.1f} MiB")
    print(f"  store on disk             {disk / 2**20:8.1f} MiB  (blobs {naive.stats['blob_bytes'] / 2**20:.1f} MiB)")
    print(f"  disk ratio naive/store    {naive.naive_bytes / disk:8.1f}x   (goal >= 5x)")


if __name__ == "__main__":
    main()

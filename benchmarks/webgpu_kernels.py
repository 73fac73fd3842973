"""WebGPU kernels beside torch on the same machine, as ratios measured in one run.

Kernels: fp32 matmul (1024³ and 4096³), elementwise add on 64 MB tensors, softmax and a row sum over 64 MB,
each timed as many dispatches in one submission with one final sync (GPU time, not host time) and printed
with GFLOP/s or GB/s beside torch on --device (cuda: TF32 off). Host overhead: what one op costs the host
in the backend (dispatch recording, caches, pool) beside an eager torch call of the same small op.

    python benchmarks/webgpu_kernels.py --device cuda          # on a GPU machine
    python benchmarks/webgpu_kernels.py --device cpu --small   # lavapipe: smaller sizes
    python benchmarks/webgpu_kernels.py --mode overhead        # per-op host overhead only
    python benchmarks/webgpu_kernels.py --sweep                # matmul tile configurations at the big size
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

from tapml.backends import get_backend
from tapml.backends.webgpu import kernels as K
from tapml.backends.webgpu.kernels import gemm
from tapml.ops import OpCall


def gpu_seconds(rt, record: Callable[[], None], iters: int, trials: int = 3) -> float:
    """Seconds per call on the device: `iters` calls recorded into one submission, timed from submit to a
    completed read-back (recording is host time and is left out)."""
    record()
    rt.sync()
    best = float("inf")
    for _ in range(trials):
        for _ in range(iters):
            record()
        t0 = time.perf_counter()
        rt.sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def torch_seconds(fn: Callable[[], object], iters: int, device: str, trials: int = 3) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def row(name: str, unit: str, work: float, t_wg: float, t_torch: float) -> None:
    wg, th = work / t_wg / 1e9, work / t_torch / 1e9
    print(f"{name:<26} webgpu {t_wg * 1e3:9.3f} ms {wg:9.1f} {unit}   torch {t_torch * 1e3:9.3f} ms {th:9.1f} {unit}"
          f"   webgpu/torch {wg / th:5.2f}x", flush=True)


def kernels(be, device: str, small: bool, iters: int) -> None:
    rt = be.rt
    print(f"webgpu: {be.device}; torch: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}"
          f" ({torch.__version__})")
    gen = torch.Generator().manual_seed(0)
    mm_sizes = (256, 512) if small else (1024, 4096)
    for n in mm_sizes:
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        ha, hb = be.upload(a), be.upload(b)
        out = K.new(rt, (n, n), torch.float32)
        t_wg = gpu_seconds(rt, lambda ha=ha, hb=hb, out=out: K.matmul(rt, ha, hb, out=out),
                           max(2, iters // (8 if n >= 4096 else 1)))
        got = be.download(out)
        da, db = a.to(device), b.to(device)
        t_th = torch_seconds(lambda da=da, db=db: da @ db, max(2, iters // (8 if n >= 4096 else 1)), device)
        err = (got - (da @ db).cpu()).abs().max().item()
        row(f"matmul fp32 {n}^3", "GFLOP/s", 2 * n**3, t_wg, t_th)
        print(f"{'':26} max |webgpu - torch| = {err:.2e}")
    numel = (4 << 20) // 4 if small else (64 << 20) // 4
    x, y = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen)
    hx, hy = be.upload(x), be.upload(y)
    hz = K.new(rt, (numel,), torch.float32)
    t_wg = gpu_seconds(rt, lambda: K.ew(rt, "a + b", [hx, hy], hz, ["f32", "f32"], "f32"), iters)
    dx, dy = x.to(device), y.to(device)
    dz = torch.empty_like(dx)
    t_th = torch_seconds(lambda: torch.add(dx, dy, out=dz), iters, device)
    row(f"add fp32 {numel * 4 >> 20} MB", "GB/s", 3 * numel * 4, t_wg, t_th)
    rows = 1024 if small else 4096
    m = torch.randn(rows, numel // rows, generator=gen)
    hm = be.upload(m)
    dm = m.to(device)
    t_wg = gpu_seconds(rt, lambda: K.softmax(rt, "softmax", hm, 1, torch.float32), iters)
    t_th = torch_seconds(lambda: torch.softmax(dm, 1), iters, device)
    row(f"softmax [{rows},{numel // rows}]", "GB/s", 2 * numel * 4, t_wg, t_th)
    t_wg = gpu_seconds(rt, lambda: K.reduce(rt, "sum", hm, [1], False, torch.float32, "f32"), iters)
    t_th = torch_seconds(lambda: dm.sum(1), iters, device)
    row(f"row sum [{rows},{numel // rows}]", "GB/s", numel * 4, t_wg, t_th)


def sweep(be, small: bool) -> None:
    """GFLOP/s of the register-blocked matmul for tile configurations (BM, BN, BK, TM, TN) at both sizes."""
    rt = be.rt
    default = gemm.FAST
    for n in (256, 512) if small else (1024, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        ha, hb = be.upload(a), be.upload(b)
        out = K.new(rt, (n, n), torch.float32)
        want = a @ b
        for cfg in [(128, 128, 8, 8, 8), (128, 128, 16, 8, 8), (128, 64, 8, 8, 8), (64, 128, 8, 8, 8),
                    (64, 128, 16, 8, 8), (64, 64, 8, 8, 8), (64, 64, 16, 8, 8), (64, 64, 16, 4, 4),
                    (32, 64, 16, 4, 8), (128, 256, 8, 8, 16), (128, 64, 16, 8, 4), (64, 64, 32, 8, 8)]:
            gemm.FAST = gemm.Tile(*cfg)
            try:
                t = gpu_seconds(rt, lambda ha=ha, hb=hb, out=out: K.matmul(rt, ha, hb, out=out, fast=True),
                                4 if n >= 4096 else 16)
                err = (be.download(out) - want).abs().max().item()
                print(f"matmul_fast {n}^3 {cfg}: {2 * n**3 / t / 1e9:9.1f} GFLOP/s  max err {err:.1e}", flush=True)
            except Exception as e:
                print(f"matmul_fast {n}^3 {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
    gemm.FAST = default


def overhead(be, n: int = 2000) -> None:
    """Host cost of one op in the backend: op lookup, output allocation from the pool, parameter packing,
    bind-group cache, dispatch recording (no GPU wait), beside eager torch on the CPU for the same op."""
    rt = be.rt
    x = torch.randn(64, 64)
    hx = be.upload(x)
    add = OpCall("aten.add.Tensor", (hx, hx), {})
    view = OpCall("aten.transpose.int", (hx, 0, 1), {})
    mm = OpCall("aten.mm.default", (hx, hx), {})
    soft = OpCall("aten._softmax.default", (hx, -1, False), {})

    def per_op(call: OpCall) -> float:
        for _ in range(50):
            be.run(call)
        rt.sync()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n // 5):
                be.run(call)
            samples.append((time.perf_counter() - t0) / (n // 5))
            rt.sync()
        return statistics.median(samples)

    s0 = rt.stats.__dict__.copy()
    results = {name: per_op(c) for name, c in (("add (elementwise)", add), ("transpose (view)", view),
                                               ("mm 64x64x64", mm), ("softmax", soft))}
    s1 = rt.stats.__dict__
    t0 = time.perf_counter()
    for _ in range(200):
        be.execute(OpCall("aten.add.Tensor", (x, x), {}))
    roundtrip = (time.perf_counter() - t0) / 200
    t0 = time.perf_counter()
    for _ in range(n):
        torch.add(x, x)
    eager = (time.perf_counter() - t0) / n
    print("per-op host overhead (µs per call, dispatch recorded, no GPU wait):")
    for name, t in results.items():
        print(f"  {name:<22} {t * 1e6:8.1f}")
    print(f"  {'upload+add+download':<22} {roundtrip * 1e6:8.1f}   (a host round trip of one 64x64 add)")
    print(f"  {'torch eager add (cpu)':<22} {eager * 1e6:8.1f}")
    hits = s1["bind_hits"] - s0["bind_hits"]
    misses = s1["bind_misses"] - s0["bind_misses"]
    ph, pm = s1["pool_hits"] - s0["pool_hits"], s1["pool_misses"] - s0["pool_misses"]
    print(f"  bind-group cache hit rate {hits / max(hits + misses, 1):.1%}, buffer pool hit rate "
          f"{ph / max(ph + pm, 1):.1%}, submits {s1['submits'] - s0['submits']} for "
          f"{s1['dispatches'] - s0['dispatches']} dispatches")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="small sizes (for lavapipe)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--mode", choices=["all", "kernels", "overhead"], default="all")
    p.add_argument("--sweep", action="store_true", help="also time matmul tile configurations")
    p.add_argument("--smoke", action="store_true", help="the smallest configuration: seconds, checks the script runs (tests/test_benchmarks.py)")
    args = p.parse_args()
    if args.smoke:
        args.small, args.iters = True, 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    be = get_backend("webgpu")
    if args.mode in ("all", "kernels"):
        kernels(be, args.device, args.small, args.iters)
    if args.sweep:
        sweep(be, args.small)
    if args.mode in ("all", "overhead"):
        overhead(be)


if __name__ == "__main__":
    main()

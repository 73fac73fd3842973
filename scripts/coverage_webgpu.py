"""Write docs/COVERAGE.md: what the WebGPU backend runs, measured rather than claimed.

Three tables: the dtype policy; op family x dtype, each cell a probe run on the device and compared with torch
(pass, wrong, or the backend's reason for turning it down); and every zoo model's carved cases replayed
(pass / fail / unsupported / error). Also lists every ATen overload in the op table.

    python scripts/coverage_webgpu.py                 # carve the zoo into a temp dir (about 2 minutes)
    python scripts/coverage_webgpu.py --stores /tmp/zoo --out docs/COVERAGE.md
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

from tapml.backends import get_backend
from tapml.ops import OpCall

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.float64]
SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32",
         torch.bool: "bool", torch.float64: "f64"}


def _t(shape, dt, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dt == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dt.is_floating_point:
        return torch.randint(-9, 9, shape, generator=g).to(dt)
    return torch.randn(shape, generator=g).to(dt)


# family -> (overload, args builder for a dtype); dtypes torch itself rejects for an op are skipped.
PROBES: dict[str, tuple[str, Callable[[torch.dtype], tuple]]] = {
    "add / sub / mul (broadcast)": ("aten.add.Tensor", lambda d: (_t((3, 4), d), _t((4,), d, 1))),
    "div (true)": ("aten.div.Tensor", lambda d: (_t((3, 4), d), _t((3, 4), d, 1).abs() + 1)),
    "maximum / minimum": ("aten.maximum.default", lambda d: (_t((3, 4), d), _t((3, 4), d, 1))),
    "comparisons (lt ...)": ("aten.lt.Tensor", lambda d: (_t((3, 4), d), _t((3, 4), d, 1))),
    "bitwise_and / or / not": ("aten.bitwise_and.Tensor", lambda d: (_t((3, 4), d), _t((3, 4), d, 1))),
    "where.self": ("aten.where.self", lambda d: (_t((3, 4), torch.bool), _t((3, 4), d), _t((3, 4), d, 1))),
    "masked_fill.Scalar": ("aten.masked_fill.Scalar", lambda d: (_t((3, 4), d), _t((3, 4), torch.bool), 1)),
    "neg / abs": ("aten.abs.default", lambda d: (_t((3, 4), d),)),
    "exp / log / sin / tanh / erf ...": ("aten.exp.default", lambda d: (_t((3, 4), d),)),
    "sigmoid / silu / gelu": ("aten.silu.default", lambda d: (_t((3, 4), d),)),
    "pow.Tensor_Scalar": ("aten.pow.Tensor_Scalar", lambda d: (_t((3, 4), d), 2)),
    "clamp": ("aten.clamp.default", lambda d: (_t((3, 4), d), -1, 1)),
    "_to_copy (to f32)": ("aten._to_copy.default", lambda d: (_t((3, 4), d),)),
    "clone (strided)": ("aten.clone.default", lambda d: (_t((4, 3), d).t(),)),
    "cat": ("aten.cat.default", lambda d: ([_t((2, 3), d), _t((1, 3), d, 1)], 0)),
    "sum.dim_IntList": ("aten.sum.dim_IntList", lambda d: (_t((3, 4), d), [1])),
    "mean.dim": ("aten.mean.dim", lambda d: (_t((3, 4), d), [-1], True)),
    "amax": ("aten.amax.default", lambda d: (_t((3, 4), d), [1])),
    "argmax": ("aten.argmax.default", lambda d: (_t((3, 4), d), -1)),
    "any / all": ("aten.any.dim", lambda d: (_t((3, 4), d), 1)),
    "cumsum": ("aten.cumsum.default", lambda d: (_t((3, 4), d), 1)),
    "_softmax": ("aten._softmax.default", lambda d: (_t((3, 4), d), -1, False)),
    "native_layer_norm": ("aten.native_layer_norm.default", lambda d: (_t((3, 8), d), [8], None, None, 1e-5)),
    "mm / bmm / addmm": ("aten.mm.default", lambda d: (_t((5, 7), d), _t((7, 3), d, 1))),
    "sdpa (flash_for_cpu)": ("aten._scaled_dot_product_flash_attention_for_cpu.default",
                             lambda d: (_t((1, 2, 3, 8), d), _t((1, 2, 5, 8), d, 1), _t((1, 2, 5, 8), d, 2))),
    "convolution (2-d)": ("aten.convolution.default", lambda d: (_t((1, 2, 5, 5), d), _t((3, 2, 3, 3), d, 1), None,
                                                                 [1, 1], [1, 1], [1, 1], False, [0, 0], 1)),
    "max_pool2d_with_indices": ("aten.max_pool2d_with_indices.default", lambda d: (_t((1, 2, 6, 6), d), [2, 2])),
    "embedding": ("aten.embedding.default", lambda d: (_t((10, 4), d), torch.tensor([[1, 7], [0, 9]]))),
    "index.Tensor": ("aten.index.Tensor", lambda d: (_t((5, 4), d), [torch.tensor([4, 0, 2])])),
    "gather": ("aten.gather.default", lambda d: (_t((3, 4), d), 1, torch.tensor([[0], [3], [1]]))),
    "sort / topk": ("aten.sort.default", lambda d: (_t((3, 6), d),)),
    "arange / full / zeros": ("aten.full.default", lambda d: ([2, 3], 1, )),
    "views (transpose ...)": ("aten.transpose.int", lambda d: (_t((3, 4), d), 0, 1)),
}


def probe(be, op: str, build: Callable, dt: torch.dtype) -> str:
    kwargs = {"dtype": dt} if op in ("aten.full.default",) else {}
    if op == "aten._to_copy.default":
        kwargs = {"dtype": torch.float32}
    try:
        args = build(dt)
        call = OpCall(op, args, kwargs)
        want = call.func()(*args, **kwargs)
    except Exception:
        return "n/a"  # torch has no kernel for this dtype either
    reason = be.supports(call)
    if reason:
        return f"— {reason.split(':')[0][:48]}"
    try:
        got = be.execute(call)
    except Exception as e:
        return f"error: {str(e)[:40]}"
    gl = [got] if isinstance(got, torch.Tensor) else list(got)
    wl = [want] if isinstance(want, torch.Tensor) else list(want)
    for g, w in zip(gl, wl):
        if g.dtype != w.dtype or g.shape != w.shape:
            return "wrong dtype/shape"
        if w.is_floating_point():
            tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(w.dtype, 1e-4)
            if not torch.allclose(g.double(), w.double(), atol=tol, rtol=tol, equal_nan=True):
                return "wrong"
        elif not torch.equal(g, w):
            return "wrong" if op != "aten.sort.default" else ("pass" if torch.equal(gl[0], wl[0]) else "wrong")
    return "pass"


def zoo_rows(be, stores: str | None) -> list[tuple]:
    from tapml.recorder import carve
    from tapml.replay import run_tests
    from tapml.zoo import names

    root = Path(stores) if stores else Path(tempfile.mkdtemp(prefix="tapml-coverage-"))
    rows = []
    for name in names():
        store = root / name
        if not (store / "cases.sqlite").exists():
            carve(name, store, max_new_tokens=2, samples=1, progress=False)
        t0 = time.perf_counter()
        res = run_tests(str(store), be, progress=False)
        tot = res.totals()
        rows.append((name, tot["cases"], tot["calls_covered"], tot["pass"], tot["fail"], tot["unsupported"],
                     tot["error"], time.perf_counter() - t0))
        print(f"{name}: {tot['pass']}/{tot['cases']}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stores", help="folder of zoo stores to reuse (missing ones are carved into it)")
    p.add_argument("--out", default="docs/COVERAGE.md")
    p.add_argument("--no-zoo", action="store_true")
    args = p.parse_args()
    be = get_backend("webgpu")
    from tapml.backends.webgpu import ops

    rt = be.rt
    lines = ["# WebGPU backend coverage", "",
             (f"Generated by `scripts/coverage_webgpu.py` on {be.device}; int64 mode "
             f"{'native (WGSL i64)' if rt.int64_native else 'narrow (int32, range-checked)'}, shader-f16 "
             f"{'on' if rt.f16 else 'off'}. Every cell below was run, not declared."), "",
             "## Dtypes", "", "| dtype | on the device | how |", "|---|---|---|"]
    how = {torch.float32: "f32", torch.float16: "WGSL f16 (adapter feature shader-f16)",
           torch.bfloat16: "stored as f32, rounded to nearest-even bfloat16 on every store (exact emulation)",
           torch.int64: "WGSL i64 where the adapter has shader-int64, else int32 with a range check on upload",
           torch.int32: "i32", torch.bool: "u32 0/1", torch.float64: "refused: WGSL has no f64"}
    from tapml.backends.webgpu.runtime import dtype_reason

    for dt in DTYPES:
        reason = dtype_reason(dt, rt.f16)
        lines.append(f"| {SHORT[dt]} | {'yes' if reason is None else 'no'} | {how[dt]} |")
    lines += ["", "int8, uint8 and int16 live as i32 and wrap on store.", "",
              "## Op families x dtype (probed: run on the device, compared with torch)", "",
              "| family (probe overload) | " + " | ".join(SHORT[d] for d in DTYPES) + " |",
              "|---|" + "---|" * len(DTYPES)]
    for fam, (op, build) in PROBES.items():
        cells = [probe(be, op, build, dt) for dt in DTYPES]
        lines.append(f"| {fam} (`{op.removeprefix('aten.')}`) | " + " | ".join(cells) + " |")
    lines += ["", ("`n/a`: torch itself has no kernel for that dtype; `—`: turned down by `supports` (reported "
              "unsupported, never pass)."), ""]
    if not args.no_zoo:
        rows = zoo_rows(be, args.stores)
        lines += ["## Zoo models (carved with --max-new-tokens 2, 1 sample; `tapml test STORE --backend webgpu`)", "",
                  "| model | cases | calls covered | pass | fail | unsupported | error | replay s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} | {r[7]:.1f} |")
        tot = [sum(r[i] for r in rows) for i in range(1, 7)]
        lines += [f"| **all** | {tot[0]} | {tot[1]} | {tot[2]} | {tot[3]} | {tot[4]} | {tot[5]} | |", ""]
    names = sorted(ops.OPS)
    lines += [f"## Overloads in the op table ({len(names)})", "", ", ".join(f"`{n.removeprefix('aten.')}`"
                                                                          for n in names), ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

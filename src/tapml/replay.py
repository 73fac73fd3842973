"""Replay carved cases on a backend and judge each against the reference: the API behind `tapml test`.

Every case ends as pass, fail, unsupported (with the backend's reason) or error (the backend raised); nothing
that did not run is ever reported as passed. A damaged store (StoreCorrupt, or any TapmlError of the store) ends
the whole run instead: it must never be charged to the backend. Rendering the results belongs to `tapml.report`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.amplify import DEFAULT_LIMIT, Variant, variants
from tapml.backends import Backend, open_backend
from tapml.backends.reference import TorchBackend, oracle
from tapml.compare import Verdict, judge
from tapml.errors import TapmlError, UnknownOp, first_line
from tapml.ops import OpCall, clone_layout, describe_signature, encode_args, tensor_meta
from tapml.progress import Bar
from tapml.results import AmplifiedResult, CaseResult, TestRun
from tapml.store import Case, CaseStore

# Cases whose samples a backend that compiles ahead (`Backend.prepare`) is handed at once: its batches come from
# them, and their inputs stay in memory while the backend is open.
PREPARE_CASES = 512


def clone_call(call: OpCall) -> OpCall:
    """A copy whose tensors the backend may mutate (in-place ops) without touching the original, each with the
    layout it was recorded with (strides of size-1 dims and storage offsets included) and all of its storage."""
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: clone_layout(t, whole=True),
                                        (call.args, call.kwargs))
    return OpCall(call.op, args, kwargs, call.outputs, call.provenance, call.rng_state)


def check_sample(backend: Backend, oracle: Backend, case: Case, call: OpCall) -> tuple[str, Verdict | None, str]:
    """Run one sample on `backend` and judge it. Returns (status, verdict, reason)."""
    if case.random and not backend.replays_torch_rng:
        return "unsupported", None, "seeded random op: this backend cannot reproduce torch's CPU generator stream"
    try:
        reason = backend.supports(call)
    except UnknownOp as e:  # e.g. a TVM kernel case (`tvm.fused_*`) offered to an ATen backend
        reason = str(e)
    if reason:
        return "unsupported", None, reason
    try:
        out = backend.execute(clone_call(call))
    except Exception as e:  # the backend's failure is the finding; keep its message
        return "error", None, f"{type(e).__name__}: {first_line(e, 500)}"
    ref_oracle = None
    if not case.random:
        try:
            ref_oracle = oracle.execute(clone_call(call))
        except Exception:  # no float64 kernel for this op: the verdict falls back to allclose
            ref_oracle = None
    verdict = judge(case.op, call.args, out, call.outputs, ref_oracle, case.random, call.kwargs)
    return ("pass" if verdict.passed else "fail"), verdict, verdict.reason


def run_case(store: CaseStore, backend: Backend, oracle: Backend, case: Case) -> CaseResult:
    sig_text = describe_signature(case.spec, case.metas) if case.replayable else str(case.spec)[:200]
    res = CaseResult(case.id, case.op, case.signature, sig_text, "pass", calls=case.count,
                     provenance=case.first)
    start = time.perf_counter()
    if not case.replayable:
        res.status, res.reason = "unsupported", f"not replayable: {case.reason}"
        return res
    for sample in store.samples(case.id):
        # Loaded here, outside check_sample's handler of the backend's exceptions: a blob failing its hash check
        # raises StoreCorrupt out of run_tests rather than becoming this case's `error` or `fail`.
        call = store.load_call(case, sample)
        status, verdict, reason = check_sample(backend, oracle, case, call)
        res.samples += 1
        if verdict is not None:
            res.rule, res.metrics = verdict.rule, verdict.metrics
        if status != "pass":
            res.status, res.reason = status, reason
            res.provenance = sample.provenance.as_dict()
            break
    res.seconds = time.perf_counter() - start
    return res


def with_reference(call: OpCall, reference: Backend, layout_only: bool = False) -> OpCall | None:
    """`call` with the reference's outputs as its expected ones; None when the reference refuses the call (an
    amplified variant that is not a valid call of the op). `layout_only`: the call holds a real sample's values
    in other layouts; None too when the reference then disagrees with itself on contiguous copies (its kernel
    assumes a layout: torch's CPU flash attention reads garbage for a query whose last dim is strided)."""
    try:
        out = reference.execute(clone_call(call))
        if layout_only:
            args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous(), (call.args, call.kwargs))
            # cloned: `.contiguous()` returns a dense tensor itself (a storage offset is dense), and an in-place
            # op would then change the variant's own inputs
            dense = reference.execute(clone_call(OpCall(call.op, args, kwargs, None, call.provenance,
                                                        call.rng_state)))
            if not _agree(out, dense):
                return None
    except Exception:
        return None
    return OpCall(call.op, call.args, call.kwargs, out, call.provenance, call.rng_state)


def _agree(a: Any, b: Any) -> bool:
    """Whether two runs of the reference agree up to rounding (a layout's different summation order), not
    garbage: same structure, equal integers, floats within 1e-3 of the larger magnitude."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            both_nan = isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
            if x != y and not both_nan:
                return False
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not (x.is_floating_point() or x.is_complex()):
            if not torch.equal(x, y):
                return False
            continue
        finite = torch.isfinite(y)
        scale = float(y[finite].abs().max()) if bool(finite.any()) else 1.0
        if not torch.isclose(x, y, rtol=1e-3, atol=1e-3 * scale, equal_nan=True).all():
            return False
    return True


def describe_call(call: OpCall) -> str:
    """A call's readable signature, as `describe_signature` gives a case's (`f32[4,64] f32[64,128]`)."""
    spec, tensors = encode_args(call.args, call.kwargs)
    return describe_signature(spec, [tensor_meta(t) for t in tensors])


def check_variant(backend: Backend, oracle: Backend, reference: Backend, case: Case,
                  variant: Variant) -> AmplifiedResult | None:
    """Judge one amplified variant by the real samples' rule against its reference outputs; None when the
    reference refuses it (dropped). The reason of a failure says which variant and how it was made."""
    call = with_reference(variant.call, reference, variant.layout_only)
    if call is None:
        return None
    start = time.perf_counter()
    status, verdict, reason = check_sample(backend, oracle, case, call)
    res = AmplifiedResult(case.id, case.op, variant.name, variant.description, describe_call(call), status,
                          provenance=call.provenance.as_dict(), seconds=time.perf_counter() - start)
    if verdict is not None:
        res.rule, res.metrics = verdict.rule, verdict.metrics
    if status != "pass":
        res.reason = f"amplified: {variant.description}: {reason}"
    return res


def amplify_case(store: CaseStore, backend: Backend, oracle: Backend, reference: Backend, case: Case,
                 seed: int = 0, limit: int = DEFAULT_LIMIT) -> list[AmplifiedResult]:
    """Every sample's amplified variants (`tapml.amplify`), each judged (none for cases that cannot replay or
    that draw random numbers)."""
    if not case.replayable or case.random:
        return []
    out = []
    bits = backend.int64_bits()
    for sample in store.samples(case.id):
        for v in variants(store.load_call(case, sample), seed=seed, limit=limit):
            if bits < 64 and v.name.startswith("int:"):  # out of the target's declared int64 range: said, not run
                out.append(AmplifiedResult(
                    case.id, case.op, v.name, v.description, describe_call(v.call), "unsupported",
                    reason=f"amplified: {v.description}: {backend.name} holds int64 as int{bits} (declared), so "
                           "integers past that range are outside what it can represent"))
                continue
            r = check_variant(backend, oracle, reference, case, v)
            if r is not None:
                out.append(r)
    return out


def run_tests(store: str | os.PathLike, backend: str | Backend, *, pattern: str | None = None,
              progress: bool = True, on_result: Callable[[CaseResult], None] | None = None,
              remote: str | None = None, token_file: str | os.PathLike | None = None, inject: str | None = None,
              backend_options: dict[str, Any] | None = None, json_out: str | os.PathLike | None = None,
              html_out: str | os.PathLike | None = None, amplify: bool = False, amplify_seed: int = 0) -> TestRun:
    """Replay every case of the store at `store` on `backend` and judge each against the fp64 oracle.

    backend: an open Backend (left open), or a name opened here with `open_backend` (remote, token_file, inject,
    backend_options; closed after). pattern: only ops matching it (substring, `not X`, `a or b`; it must match
    some case). on_result(case result) after each case; progress draws a bar on a terminal. json_out / html_out:
    reports written after the run, their paths checked before it. The store is checked before the backend opens.
    amplify: also replay each sample's amplified variants (`tapml.amplify`, drawn with `amplify_seed`), judged by
    the same rule and reported apart, in `TestRun.amplified`.
    """
    from tapml.paths import check_report_paths

    check_report_paths(json_out, html_out, store)
    CaseStore.open(store).close()  # a bad store fails before the backend starts
    be = backend if isinstance(backend, Backend) else open_backend(
        backend, remote=remote, token_file=token_file, inject=inject, **(backend_options or {}))
    try:
        run = _replay(str(store), be, pattern, progress, on_result, amplify_seed if amplify else None)
    finally:
        if be is not backend:
            be.close()
    if json_out is not None or html_out is not None:
        from tapml.report import to_html, to_json, write_atomic

        if json_out is not None:
            write_atomic(json_out, to_json(run), "--json")
        if html_out is not None:
            write_atomic(html_out, to_html(run), "--html")
    return run


def _replay(store_path: str, be: Backend, pattern: str | None, progress: bool,
            on_result: Callable[[CaseResult], None] | None, amplify_seed: int | None) -> TestRun:
    fp64, reference = oracle(), TorchBackend()
    amplified = []
    start = time.perf_counter()
    with CaseStore.open(store_path) as store:
        cases = store.cases(pattern)
        if pattern is not None and not cases:  # a typo in -k must not read as "all passed"
            raise TapmlError(f"-k {pattern!r} matches no case of {store_path}; see `tapml show {store_path}`")
        results = []
        with Bar(progress, "test", f"on {be.name}", len(cases), counts_bad=True) as bar:
            for i in range(0, len(cases), PREPARE_CASES):
                chunk = cases[i: i + PREPARE_CASES]
                if be.compiles_ahead:  # a compiler target compiles the chunk's signatures together
                    be.prepare([store.load_call(c, s) for c in chunk if c.replayable and not c.random
                                for s in store.samples(c.id)])
                for case in chunk:
                    r = run_case(store, be, fp64, case)
                    results.append(r)
                    if on_result:
                        on_result(r)
                    bad = r.status in ("fail", "error")
                    if amplify_seed is not None:
                        amps = amplify_case(store, be, fp64, reference, case, amplify_seed)
                        amplified += amps
                        bad = bad or any(a.status in ("fail", "error") for a in amps)
                    bar.advance(bad=bad)
    return TestRun(store_path, be.name, results, time.perf_counter() - start, amplified, amplify_seed)

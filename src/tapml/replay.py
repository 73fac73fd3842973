"""Replay carved cases on a backend and judge each against the reference: the API behind `tapml test`.

Every case ends as pass, fail, unsupported (with the backend's reason) or error (the backend raised); nothing
that did not run is ever reported as passed. A damaged store (StoreCorrupt, or any TapmlError of the store) ends
the whole run instead: it must never be charged to the backend. Rendering the results belongs to `tapml.report`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.backends import Backend, get_backend
from tapml.backends.reference import Float64Backend
from tapml.compare import Verdict, judge
from tapml.errors import TapmlError, UnknownOp
from tapml.ops import OpCall, describe_signature
from tapml.store import Case, CaseStore

STATUSES = ("pass", "fail", "unsupported", "error")


@dataclass
class CaseResult:
    case_id: int
    op: str
    signature: str
    args: str  # readable signature, e.g. "f32[4,64] f32[64,128]"
    status: str
    rule: str = ""
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    calls: int = 0
    samples: int = 0
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        return self.op.rsplit(".", 1)[0]

    def as_dict(self) -> dict[str, Any]:
        return {"case": self.case_id, "op": self.op, "signature": self.signature, "args": self.args,
                "status": self.status, "rule": self.rule, "reason": self.reason, "metrics": self.metrics,
                "provenance": self.provenance, "calls": self.calls, "samples": self.samples,
                "seconds": round(self.seconds, 6)}


@dataclass
class TestRun:
    store: str
    backend: str
    results: list[CaseResult]
    seconds: float

    def totals(self) -> dict[str, int]:
        t = {s: 0 for s in STATUSES}
        for r in self.results:
            t[r.status] += 1
        t["cases"] = len(self.results)
        t["calls_covered"] = sum(r.calls for r in self.results)
        return t

    def by_kind(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for r in self.results:
            row = table.setdefault(r.op, {s: 0 for s in STATUSES} | {"calls": 0})
            row[r.status] += 1
            row["calls"] += r.calls
        return dict(sorted(table.items(), key=lambda kv: (-kv[1]["fail"] - kv[1]["error"], kv[0])))

    @property
    def exit_code(self) -> int:
        t = self.totals()
        return 1 if t["fail"] or t["error"] else 0

    def as_dict(self) -> dict[str, Any]:
        return {"store": self.store, "backend": self.backend, "seconds": round(self.seconds, 3),
                "totals": self.totals(), "by_op": self.by_kind(), "cases": [r.as_dict() for r in self.results]}


def clone_call(call: OpCall) -> OpCall:
    """A copy whose tensors the backend may mutate (in-place ops) without touching the original."""
    args, kwargs = pytree.tree_map_only(torch.Tensor, _clone_keep_strides, (call.args, call.kwargs))
    return OpCall(call.op, args, kwargs, call.outputs, call.provenance, call.rng_state)


def _clone_keep_strides(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() and t.storage_offset() == 0:
        return t.clone()
    storage = torch.empty(t.untyped_storage().nbytes() // max(t.element_size(), 1), dtype=t.dtype)
    storage.copy_(torch.as_strided(t, storage.shape, (1,), 0))
    return torch.as_strided(storage, t.shape, t.stride(), t.storage_offset())


def check_sample(backend: Backend, oracle: Backend, case: Case, call: OpCall) -> tuple[str, Verdict | None, str]:
    """Run one sample on `backend` and judge it. Returns (status, verdict, reason)."""
    if case.random and not getattr(backend, "replays_torch_rng", False):
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
        return "error", None, f"{type(e).__name__}: {e}".splitlines()[0][:500]
    ref_oracle = None
    if not case.random:
        try:
            ref_oracle = oracle.execute(clone_call(call))
        except Exception:  # no float64 kernel for this op: the verdict falls back to allclose
            ref_oracle = None
    verdict = judge(case.op, call.args, out, call.outputs, ref_oracle, case.random)
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


def run_tests(store_path: str, backend: str | Backend, pattern: str | None = None,
              progress: bool = True, on_result: Callable[[CaseResult], None] | None = None) -> TestRun:
    """Replay every case of the store at `store_path` on `backend` (a registered name or an instance)."""
    be = get_backend(backend) if isinstance(backend, str) else backend
    oracle = Float64Backend(narrow=False)
    start = time.perf_counter()
    with CaseStore.open(store_path) as store:
        cases = store.cases(pattern)
        if pattern is not None and not cases:  # a typo in -k must not read as "all passed"
            raise TapmlError(f"-k {pattern!r} matches no case of {store_path}; see `tapml show {store_path}`")
        results = []
        with _bar(progress, len(cases), be.name) as advance:
            for case in cases:
                r = run_case(store, be, oracle, case)
                results.append(r)
                if on_result:
                    on_result(r)
                advance(r)
    return TestRun(str(store_path), be.name, results, time.perf_counter() - start)


class _bar:
    def __init__(self, enabled: bool, total: int, name: str):
        self.enabled, self.total, self.name = enabled, total, name

    def __enter__(self) -> Callable[[CaseResult], None]:
        if not self.enabled:
            return lambda r: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.p = Progress("[bold]test[/] {task.description}", BarColumn(), MofNCompleteColumn(),
                          "[red]{task.fields[bad]} bad", TimeRemainingColumn(), console=Console(stderr=True))
        self.p.__enter__()
        task = self.p.add_task(f"on {self.name}", total=self.total, bad=0)
        bad = [0]

        def advance(r: CaseResult) -> None:
            bad[0] += r.status in ("fail", "error")
            self.p.update(task, advance=1, bad=bad[0])

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.p.__exit__(*exc)

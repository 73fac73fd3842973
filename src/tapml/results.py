"""What the long jobs return: a carve's `CarveResult`, a replay's `TestRun` of `CaseResult`s. Plain data that the
reports render and the CLI prints; it must not run anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tapml.ops import op_kind


@dataclass
class CarveResult:
    store: str
    run_id: int
    model: str
    description: str
    calls: int
    cases: int  # distinct signatures seen in this run
    new_cases: int
    samples: int
    seconds: float
    stats: dict
    naive_bytes: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


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
        return op_kind(self.op)

    def as_dict(self) -> dict[str, Any]:
        return {"case": self.case_id, "op": self.op, "signature": self.signature, "args": self.args,
                "status": self.status, "rule": self.rule, "reason": self.reason, "metrics": self.metrics,
                "provenance": self.provenance, "calls": self.calls, "samples": self.samples,
                "seconds": round(self.seconds, 6)}


@dataclass
class AmplifiedResult:
    """One amplified variant of a real sample (`tapml.amplify`), judged like a case but reported apart: `variant`
    is its short name, `description` how it was made, `args` its readable signature."""

    case_id: int
    op: str
    variant: str
    description: str
    args: str
    status: str
    rule: str = ""
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        return op_kind(self.op)

    def as_dict(self) -> dict[str, Any]:
        return {"case": self.case_id, "op": self.op, "variant": self.variant, "description": self.description,
                "args": self.args, "status": self.status, "rule": self.rule, "reason": self.reason,
                "metrics": self.metrics, "provenance": self.provenance, "seconds": round(self.seconds, 6)}


@dataclass
class TestRun:
    store: str
    backend: str
    results: list[CaseResult]
    seconds: float
    # amplified variants (`run_tests(amplify=True)`), apart from the real cases; the seed they were drawn with,
    # None when the run did not amplify
    amplified: list[AmplifiedResult] = field(default_factory=list)
    amplify_seed: int | None = None

    def amplified_totals(self) -> dict[str, int]:
        t = {s: 0 for s in STATUSES}
        for r in self.amplified:
            t[r.status] += 1
        t["variants"] = len(self.amplified)
        t["cases"] = len({r.case_id for r in self.amplified})
        return t

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
        """1 when a real case or an amplified variant failed or errored (a variant's failure is a finding too)."""
        t, a = self.totals(), self.amplified_totals()
        return 1 if t["fail"] or t["error"] or a["fail"] or a["error"] else 0

    def as_dict(self) -> dict[str, Any]:
        d = {"store": self.store, "backend": self.backend, "seconds": round(self.seconds, 3),
             "totals": self.totals(), "by_op": self.by_kind(), "cases": [r.as_dict() for r in self.results]}
        if self.amplify_seed is not None:
            d["amplified"] = {"seed": self.amplify_seed, "totals": self.amplified_totals(),
                              "variants": [r.as_dict() for r in self.amplified]}
        return d

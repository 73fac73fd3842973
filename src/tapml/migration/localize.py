"""Localization: migrate a model to the target step by step until the end-to-end result breaks, and name the
first op instance that breaks it, telling local error (the op is wrong) from accumulated error (its inputs
had drifted).

Strategies: `carved` (replay the carved store), `by-kind` (op kinds one at a time, most frequent first, then
the instance), `bisect` (the shortest prefix of the run on the target that breaks the verdict), `by-module`
(layer by layer, then the instance). Every strategy counts the model runs it used.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tapml.backends import Backend, open_backend
from tapml.backends.faults import Fault, parse_fault
from tapml.compare import rel_max
from tapml.errors import TapmlError, first_line
from tapml.migration.mixed import OpRecord, RunResult, run_mixed
from tapml.migration.placement import Placement
from tapml.ops import OpCall, Provenance
from tapml.workload import Workload, check_precision, load_workload

STRATEGIES = ("bisect", "by-kind", "by-module", "carved")
DEFAULT_TOL = 1e-4
# The end-to-end tolerance when none is given, by the workload's dtype: 1e-4 is ~840 float32 ulps, far below one
# float16 ulp (9.8e-4), so a float16 run on any other target would always "diverge". About 10 ulps of the
# half types (a 4-layer Llama on WebGPU: 1e-3 in float16, 8e-3 in bfloat16); a flipped token still fails.
DEFAULT_TOLS = {"float16": 1e-2, "bfloat16": 5e-2}


def default_tol(dtype: str) -> float:
    return DEFAULT_TOLS.get(dtype, DEFAULT_TOL)


# ----------------------------------------------------------------------------------------------- verdicts


@dataclass
class E2EVerdict:
    """End-to-end: outputs for plain models; for LLMs the generated tokens and the logits per step."""

    passed: bool
    rel_error: float  # max |Δ| / max |reference| over outputs (or logits of every step)
    tol: float
    first_divergent_token: dict | None = None  # {"step", "row", "reference", "target"}
    steps: list[dict] = field(default_factory=list)  # per step: max_abs, kl, top5_overlap

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compare_runs(golden: RunResult, run: RunResult, generates: bool, tol: float) -> E2EVerdict:
    """Judge a mixed run against the clean reference run."""
    first = None
    steps = []
    if generates and golden.logits:
        n = len(golden.logits)
        g_tok, t_tok = golden.output, run.output
        if isinstance(g_tok, torch.Tensor) and isinstance(t_tok, torch.Tensor) and g_tok.shape == t_tok.shape:
            gen_g, gen_t = g_tok[:, -n:], t_tok[:, -n:]
            diff = (gen_g != gen_t).nonzero()
            if len(diff):
                s = int(diff[:, 1].min())
                row = int(diff[diff[:, 1] == s][0, 0])
                first = {"step": s, "row": row, "reference": int(gen_g[row, s]), "target": int(gen_t[row, s])}
        rel = 0.0
        for s, (g, t) in enumerate(zip(golden.logits, run.logits)):
            if g.shape != t.shape:
                rel = math.inf
                break
            max_abs = float((g - t).abs().max())
            lp_g, lp_t = torch.log_softmax(g.double(), -1), torch.log_softmax(t.double(), -1)
            kl = float((lp_g.exp() * (lp_g - lp_t)).sum(-1).mean())
            k = min(5, g.shape[-1])
            top_g, top_t = g.topk(k, -1).indices, t.topk(k, -1).indices
            overlap = float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_g, top_t))
                            / (k * g.shape[0]))
            steps.append({"step": s, "phase": "prefill" if s == 0 else f"decode:{s - 1}", "max_abs": max_abs,
                          "kl": kl, "top5_overlap": overlap})
            rel = max(rel, max_abs / max(float(g.abs().max()), 1e-12))
        if len(run.logits) != len(golden.logits):
            rel = math.inf
        passed = first is None and rel <= tol
        return E2EVerdict(passed, rel, tol, first, steps)
    rel = rel_max(golden.output, run.output)
    return E2EVerdict(rel <= tol, rel, tol)


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Culprit:
    op: str
    index: int | None  # the n-th call of this overload in the run (from 0)
    call: int  # position in the whole run
    module: str
    phase: str
    local_error: float | None
    accumulated_error: float | None
    local_pass: bool | None
    local_rule: str = ""

    @property
    def verdict(self) -> str:
        if self.local_pass is False:
            return "local: the op is wrong on its own inputs"
        if self.local_pass is True:
            return "accumulated: the op is right on its inputs; drift it received broke the result"
        return "unknown"

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "verdict": self.verdict}


@dataclass
class Localization:
    model: str
    target: str
    strategy: str
    diverged: bool
    culprit: Culprit | None
    runs: int
    seconds: float
    calls: int  # op instances in one run
    e2e: E2EVerdict | None  # the verdict of the run that put the most on the target
    crossings: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)  # what each model run placed and its verdict
    note: str = ""
    drift: list[dict] = field(default_factory=list)  # per target op: call, op, local and accumulated error
    culprit_inputs: tuple | None = None  # host copies of the culprit's inputs (for the repro store)
    culprit_store: str | None = None  # where `repro.save_migration` saved those inputs
    counts: dict = field(default_factory=dict)  # the widest run's calls placed on, ran on, refused by the target
    precision: dict = field(default_factory=dict)  # the workload's dtype / weights when not the default

    @property
    def exit_code(self) -> int:
        return 1 if self.culprit is not None or self.diverged else 0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("culprit_inputs",)}
        d["culprit"] = self.culprit.as_dict() if self.culprit else None
        d["e2e"] = self.e2e.as_dict() if self.e2e else None
        return d


# ----------------------------------------------------------------------------------------------- session


class Session:
    """One workload against one target: counts model runs, keeps the clean reference run."""

    def __init__(self, workload: Workload, target: Backend, tol: float | None = None,
                 on_trial: Callable[[str, E2EVerdict], None] | None = None):
        self.workload, self.target = workload, target
        self.tol = default_tol(workload.dtype) if tol is None else tol  # None: by the workload's dtype
        self.runs = 0
        self.trials: list[dict] = []
        self.on_trial = on_trial
        self.golden: RunResult | None = None
        self.widest: tuple[RunResult, E2EVerdict] | None = None
        self.carved_counts: dict[str, int] = {}  # the `carved` strategy's cases placed, ran, refused

    def reference(self) -> RunResult:
        if self.golden is None:
            try:
                self.golden = run_mixed(self.workload, None, Placement.none(), keep_outputs=True)
            except Exception as e:  # the model itself fails on PyTorch: the user's to fix (a mixed run's is ours)
                raise TapmlError(f"model raised {type(e).__name__} on PyTorch alone: {first_line(e)}") from None
            self.runs += 1
        return self.golden

    def trial(self, placement: Placement, check: int | None = None,
              local_check: Placement | None = None) -> tuple[RunResult, E2EVerdict]:
        golden = self.reference()
        if check is not None:
            local_check = Placement(instances=frozenset([check]))
        keep = frozenset([check]) if check is not None else frozenset()
        run = run_mixed(self.workload, self.target, placement, local_check, keep, golden=golden.golden)
        self.runs += 1
        v = compare_runs(golden, run, self.workload.generates, self.tol)
        self.trials.append({"placement": placement.describe(), "on_target": run.on_target, **run.counts(),
                            "passed": v.passed, "rel_error": v.rel_error})
        if self.widest is None or (run.on_target, run.placed) > (self.widest[0].on_target, self.widest[0].placed):
            self.widest = (run, v)
        if self.on_trial:
            self.on_trial(placement.describe(), v)
        return run, v

    def culprit(self, run: RunResult, call: int) -> tuple[Culprit, tuple | None]:
        op, k, module, phase = self.reference().trace[call]
        if call < len(run.trace) and run.trace[:call + 1] != self.reference().trace[:call + 1]:
            # Call indices are only meaningful while the mixed run makes the same calls as the reference.
            i = next(j for j, (a, b) in enumerate(zip(run.trace, self.reference().trace)) if a != b)
            raise TapmlError(f"the run on {self.target.name} made different op calls than the reference from call "
                             f"{i} on ({run.trace[i][0]} where the reference ran {self.reference().trace[i][0]}), "
                             "so no instance can be named; report this as a tapml bug")
        rec: OpRecord | None = next((r for r in run.records if r.call == call), None)
        if rec is None:
            return Culprit(op, k, call, module, phase, None, None, None, "not run on the target"), None
        return (Culprit(op, k, call, module, phase, rec.local_error, rec.accumulated_error, rec.local_pass,
                        rec.local_rule), rec.inputs)


def _bisect_prefix(session: Session, calls: list[int], placement_for: Callable[[int], Placement],
                   hi_run: RunResult) -> tuple[int, RunResult]:
    """Smallest m such that placing calls[:m] breaks the verdict, given that m = len(calls) does."""
    lo, hi, best = 0, len(calls), hi_run
    while hi - lo > 1:
        mid = (lo + hi) // 2
        run, v = session.trial(placement_for(mid), check=calls[mid - 1])
        if v.passed:
            lo = mid
        else:
            hi, best = mid, run
    return calls[hi - 1], best


def bisect(session: Session) -> tuple[int | None, RunResult | None]:
    """≤ ⌈log2 N⌉ + 2 model runs: the reference, everything on the target, then binary search on the prefix."""
    n = session.reference().calls
    full, v = session.trial(Placement.all(), check=n - 1)
    if v.passed:
        return None, None
    return _bisect_prefix(session, list(range(n)), lambda m: Placement(calls=range(m)), full)


def by_kind(session: Session) -> tuple[int | None, RunResult | None]:
    trace = session.reference().trace
    counts: dict[str, list[int]] = {}
    for i, (op, _k, _m, _p) in enumerate(trace):
        counts.setdefault(op, []).append(i)
    for op in sorted(counts, key=lambda o: -len(counts[o])):
        calls = counts[op]
        run, v = session.trial(Placement(ops=frozenset([op])), check=calls[-1])
        if not v.passed:
            return _bisect_prefix(session, calls,
                                  lambda m, op=op: Placement(ops=frozenset([op]), op_indices=range(m)), run)
    return None, None


def module_group(path: str) -> str:
    """The layer a module path belongs to: up to its first numeric component (model.layers.3), else the
    first two components."""
    parts = path.split(".")
    for j, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: j + 1])
    return ".".join(parts[:2])


def by_module(session: Session) -> tuple[int | None, RunResult | None]:
    """Layer by layer in run order: each (layer, phase) alone on the target, then the instance within it."""
    trace = session.reference().trace
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (_op, _k, module, phase) in enumerate(trace):
        groups.setdefault((module_group(module), phase), []).append(i)
    for calls in groups.values():
        run, v = session.trial(Placement(instances=frozenset(calls)), check=calls[-1])
        if not v.passed:
            return _bisect_prefix(session, calls, lambda m, c=calls: Placement(instances=frozenset(c[:m])), run)
    return None, None


# ----------------------------------------------------------------------------------------------- entry point


def check_settings(strategy: str = "bisect", tol: float | None = None, max_new_tokens: int | None = None) -> None:
    """The one check of the settings `localize`, `migrate` and `debug` share, made before anything runs: a NaN
    tolerance fails every comparison (a false culprit), an infinite one passes every run, a negative one makes
    an exact run diverge (None: the default of the workload's dtype, `default_tol`)."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise TapmlError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol)
                            or tol <= 0):
        raise TapmlError(f"--tol must be a finite number > 0, e.g. 1e-4 (got {tol!r})")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise TapmlError(f"--max-new-tokens must be an integer ≥ 1 (got {max_new_tokens!r})")


def check_fault_hits_the_run(session: Session, fault: Fault | None) -> None:
    """A fault must hit the run: its op runs in the model (often enough for @N; in a decode step when
    decode-only). Needs the session's reference run."""
    if fault is None:
        return
    trace = session.reference().trace
    counts: dict[str, int] = {}
    for op, *_ in trace:
        counts[op] = counts.get(op, 0) + 1
    phase = "decode:0" if fault.decode_only else "forward"
    hits = [op for op in counts
            if fault.applies(OpCall(op, (), {}, None, Provenance(phase=phase, op_index=fault.index)))]
    spec = fault.spec
    if not hits:
        common = ", ".join(sorted(counts, key=lambda o: -counts[o])[:8])
        raise TapmlError(f"--inject {spec}: {fault.op} never runs in this model; its most frequent ops: {common}")
    if fault.index is not None and all(counts[op] <= fault.index for op in hits):
        raise TapmlError(f"--inject {spec}: {hits[0]} runs only {counts[hits[0]]} times (@0..@{counts[hits[0]] - 1})")
    if fault.decode_only and not any(p.startswith("decode:") for _op, _k, _m, p in trace):
        raise TapmlError(f"--inject {spec}: decode-only faults need a generating model with --max-new-tokens ≥ 2")


def localize(workload: Workload, model: str, target: Backend, *, strategy: str = "bisect", tol: float | None = None,
             fault: Fault | None = None, store: str | None = None,
             on_trial: Callable[[str, E2EVerdict], None] | None = None) -> Localization:
    """Find the first op instance of `workload` that breaks the end-to-end result on `target` (an open backend,
    with `fault` injected when it is a FaultyBackend: the fault must hit the run). `store`: where the `carved`
    strategy carves (a temp dir when None)."""
    check_settings(strategy, tol)
    start = time.perf_counter()
    session = Session(workload, target, tol, on_trial)
    golden = session.reference()
    check_fault_hits_the_run(session, fault)
    note = ""
    culprit, inputs = None, None
    if strategy == "carved":
        culprit, note = _carved(session, model, store)
        diverged = culprit is not None
    else:
        fn = {"bisect": bisect, "by-kind": by_kind, "by-module": by_module}[strategy]
        call, run = fn(session)
        if call is None and strategy != "bisect":
            # No single kind/module breaks it alone: check the whole run before saying all is well.
            _full, v = session.trial(Placement.all())
            if not v.passed:
                note = f"no single {'op kind' if strategy == 'by-kind' else 'module'} breaks the result alone; " \
                       "falling back to bisect"
                call, run = bisect(session)
        diverged = call is not None
        if call is not None:
            culprit, inputs = session.culprit(run, call)
    widest = session.widest
    e2e = widest[1] if widest else None
    crossings = widest[0].crossings.as_dict() if widest else {}
    refused = widest[0].refused if widest else {}
    drift = [r.as_dict() for r in widest[0].records if r.local_error is not None] if widest else []
    counts = widest[0].counts() if widest else session.carved_counts
    if widest is not None:
        check_something_ran(widest[0], target.name)
    return Localization(model, target.name, strategy, diverged, culprit, session.runs,
                        time.perf_counter() - start, golden.calls, e2e, crossings, refused, session.trials, note,
                        drift, inputs, counts=counts, precision=workload.precision)


def check_something_ran(run: RunResult, target: str) -> None:
    """A migration in which the target ran none of the calls placed on it tested nothing: an error, never
    "no divergence"."""
    if run.placed and not run.on_target:
        why = "; ".join(f"{op}: {reason}" for op, reason in list(run.refused.items())[:3])
        raise TapmlError(f"no op ran on {target}: it refused all {run.placed} calls placed on it "
                         f"({len(run.refused)} op kinds; {why}); nothing was tested — fix the target's setup "
                         "or see `tapml test` on a carved store for each op's reason")


def _carved(session: Session, model: str, store: str | None) -> tuple[Culprit | None, str]:
    from tapml.recorder import carve
    from tapml.replay import run_tests

    with tempfile.TemporaryDirectory(prefix="tapml-carved-") as tmp:
        path = store or str(Path(tmp) / "store")
        carve(model, path, workload=session.workload, progress=False)
        session.runs += 1
        result = run_tests(path, session.target, progress=False)
    t = result.totals()
    session.carved_counts = {"placed": t["cases"], "ran": t["cases"] - t["unsupported"], "refused": t["unsupported"]}
    if t["cases"] and t["unsupported"] == t["cases"]:
        raise TapmlError(f"no carved case ran on {session.target.name}: it refused all {t['cases']}; nothing was "
                         "tested — see `tapml test` on the store for each op's reason")
    bad = [r for r in result.results if r.status in ("fail", "error")]
    if not bad:
        return None, (f"all {len(result.results)} carved cases pass on the target (instance- or drift-dependent "
                      "bugs need a migrating strategy)")
    bad.sort(key=lambda r: r.provenance.get("index", 0))
    r = bad[0]
    call = int(r.provenance.get("index", 0))
    trace = session.reference().trace
    _op, k, module, phase = trace[call] if call < len(trace) else (r.op, None, r.provenance.get("module", ""),
                                                                    r.provenance.get("phase", ""))
    m = r.metrics or {}
    err = m.get("rmse_target") or m.get("max_rel")
    return (Culprit(r.op, k, call, module, phase, err, None, False, r.rule or r.status),
            f"{len(bad)} of {len(result.results)} carved cases fail; the first by position in the run is named")


def migrate(model: str, *, target: str, strategy: str = "bisect", inject: str | None = None,
            max_new_tokens: int = 4, prompt: str | None = None, tol: float | None = None, remote: str | None = None,
            token_file: str | os.PathLike | None = None, json_out: str | os.PathLike | None = None,
            dtype: str | None = None, weights: str = "float",
            on_trial: Callable[[str, E2EVerdict], None] | None = None,
            log: Callable[[str], None] | None = None) -> Localization:
    """Migrate MODEL to TARGET op by op and name the first op instance that breaks the end-to-end result.

    model: a zoo name or path/to/file.py:make_model. target: a registered backend (with `remote`, the one the
    `tapml serve` at ws://HOST:PORT hosts; `token_file` for it). strategy: bisect | by-kind | by-module | carved.
    inject: a fault spec (`noise:aten.mm.default@3`, see `tapml.backends.faults`) to watch localization work.
    max_new_tokens / prompt: the LLM workload. dtype / weights: its precision (`tapml.workload.set_precision`):
    the reference run and every mixed run are in it. tol: end-to-end tolerance, max |Δ| / max |reference|
    (None: 1e-4, 1e-2 in float16, 5e-2 in bfloat16: `default_tol`).
    json_out: write the result there, and the culprit's inputs beside it (`<json_out without suffix>.culprit`)
    for `tapml repro`. on_trial(placement, verdict) after each model run; log(line) for progress.
    Every setting and path is checked before the target opens or the model runs.
    """
    check_settings(strategy, tol, max_new_tokens)
    check_precision(dtype, weights)
    fault = parse_fault(inject) if inject else None
    if json_out is not None:
        from tapml.migration.repro import check_migration_out

        check_migration_out(json_out)
    backend = open_backend(target, remote=remote, token_file=token_file, inject=fault)
    name = model
    try:
        name, workload = load_workload(model, prompt, max_new_tokens, dtype, weights)
        if log:
            log(f"migrating {name} to {backend.name} ({strategy}) …")
        loc = localize(workload, name, backend, strategy=strategy, tol=tol, fault=fault, on_trial=on_trial)
    except Exception as e:  # the JSON says what stopped it; an error that is no TapmlError is a tapml bug
        if json_out is not None:
            from tapml.migration.repro import save_failure

            save_failure(json_out, name, target, inject, e)
        raise
    finally:
        backend.close()
    if json_out is not None:
        from tapml.migration.repro import save_migration

        save_migration(loc, json_out, target, inject)
    return loc

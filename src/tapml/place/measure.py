"""Measured cost, correctness first: each distinct (subgraph, backend) compiled once and timed on the device (CUDA
events on a GPU, perf_counter on the CPU, median of ≥ 20 runs after warm-up), times kept on disk in a `CostCache`
keyed by (subgraph digest, backend, library versions, device); every instance judged on the model's real
activations against the subgraph run in float64 by TapML's verdict rule, and a failing one excluded with its reason.

It must not search; it hands the search a cost per eligible candidate and the reasons for the rest.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from tapml.compare import Verdict, compare_tensor
from tapml.place.candidates import Candidate, Candidates
from tapml.place.engines import Compiled, Engine, Unplaceable
from tapml.place.graph import Subgraph

REPEATS = 20
WARMUP = 3


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    import platform

    return f"cpu:{platform.machine()}:{os.cpu_count()}"


class CostCache:
    """Measured seconds on disk: one JSON file, `key -> {"seconds", "when"}`; written atomically (tmp + rename)."""

    def __init__(self, path: Path | None = None):
        if path is None:
            from tapml.backends.compilers import cache_root

            path = cache_root() / "place" / "costs.json"
        self.path = Path(path)
        try:
            self.entries: dict[str, dict] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.hits = 0

    @staticmethod
    def key(digest: str, backend: str, versions: dict[str, str], device: str) -> str:
        return json.dumps([digest, backend, sorted(versions.items()), device], separators=(",", ":"))

    def get(self, key: str) -> float | None:
        e = self.entries.get(key)
        if e is None:
            return None
        self.hits += 1
        return float(e["seconds"])

    def put(self, key: str, seconds: float) -> None:
        self.entries[key] = {"seconds": seconds, "when": round(time.time())}

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError:  # a read-only cache costs a re-measure next time, nothing else
            pass


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = REPEATS, warmup: int = WARMUP) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` (CUDA events on a GPU)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        samples = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
    return statistics.median(samples)


# --- the verdict on one subgraph --------------------------------------------------------------------------------

_NARROW = {torch.float32, torch.float16, torch.bfloat16}


class _Float64(fx.Interpreter):
    """The subgraph in float64: floating inputs widened, dtype arguments naming a narrower float widened too."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        def widen(x: Any) -> Any:
            if isinstance(x, torch.dtype) and x in _NARROW:
                return torch.float64
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype in _NARROW:
                return x.double()
            return x

        args, kwargs = torch.utils._pytree.tree_map(widen, (args, kwargs))
        return super().call_function(target, args, kwargs)


def oracle_outputs(sub: Subgraph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    wide = [x.detach().cpu().double() if x.is_floating_point() else x.detach().cpu() for x in inputs]
    with torch.no_grad():
        return list(_Float64(sub.module).run(*wide))


def judge_outputs(outs: list[torch.Tensor], refs: list[torch.Tensor], oracles: list[torch.Tensor]) -> Verdict:
    """Every output by the fp64-oracle rule (compare.compare_tensor); the first failing one decides."""
    if len(outs) != len(refs):
        return Verdict(False, "structure", reason=f"{len(outs)} outputs, reference has {len(refs)}")
    last = Verdict(True, "empty")
    for k, (o, r, g) in enumerate(zip(outs, refs, oracles)):
        v = compare_tensor(o.detach().cpu(), r.detach().cpu(), g)
        if not v.passed:
            v.reason = f"output {k}: {v.reason}"
            return v
        last = v
    return last


# --- measuring every candidate ----------------------------------------------------------------------------------

@dataclass
class Measured:
    """What the search and the report read: cost per eligible candidate, reasons for the others."""

    cost: dict[Candidate, float] = field(default_factory=dict)
    excluded: dict[Candidate, str] = field(default_factory=dict)  # wrong numerics: the verdict's reason
    unsupported: dict[Candidate, str] = field(default_factory=dict)  # the backend cannot compile it
    compiled: dict[tuple[str, str], Compiled] = field(default_factory=dict)
    measured: int = 0  # distinct (backend, digest) timed in this run
    cached: int = 0  # taken from the CostCache
    seconds: float = 0.0


class Measurer:
    """Compiles, judges and times candidates with engines on the model's real activations (`values`)."""

    def __init__(self, engines: dict[str, Engine], values: dict[str, torch.Tensor], constants: set[str],
                 device: torch.device, cache: CostCache | None = None, repeats: int = REPEATS,
                 progress: Callable[[str], None] | None = None):
        self.engines, self.values, self.constants = engines, values, constants
        self.device, self.cache, self.repeats = device, cache, repeats
        self.progress = progress or (lambda _m: None)
        self.dev_name = device_name(device)
        self.compiled: dict[tuple[str, str], Compiled | str] = {}

    def compile(self, backend: str, sub: Subgraph) -> Compiled:
        """The compiled subgraph (memoized by backend and digest); raises Unplaceable."""
        key = (backend, sub.digest)
        hit = self.compiled.get(key)
        if hit is None:
            example = sub.example(self.values)
            consts = {i for i, n in enumerate(sub.inputs) if n in self.constants}
            try:
                hit = self.engines[backend].compile(sub.module, example, consts)
            except Unplaceable as e:
                hit = str(e)
            self.compiled[key] = hit
        if isinstance(hit, str):
            raise Unplaceable(hit)
        return hit

    def verdict(self, backend: str, sub: Subgraph) -> Verdict:
        example = sub.example(self.values)
        fn = self.compile(backend, sub)
        with torch.no_grad():
            outs = fn(*example)
        refs = [self.values[n] for n in sub.outputs]
        return judge_outputs(outs, refs, oracle_outputs(sub, example))

    def seconds(self, backend: str, sub: Subgraph) -> float:
        eng = self.engines[backend]
        key = CostCache.key(sub.digest, backend, eng.versions(), self.dev_name) if self.cache else ""
        if self.cache:
            got = self.cache.get(key)
            if got is not None:
                return got
        fn = self.compile(backend, sub)
        example = sub.example(self.values)
        s = time_call(lambda: fn(*example), self.device, self.repeats)
        if self.cache:
            self.cache.put(key, s)
        return s

    def run(self, cands: Candidates) -> Measured:
        start = time.perf_counter()
        out = Measured()
        groups = cands.distinct()
        for k, ((backend, _digest), instances) in enumerate(groups.items()):
            first = cands.subgraph(instances[0].ops)
            self.progress(f"[{k + 1}/{len(groups)}] {backend} {len(first.module.graph.nodes)} nodes "
                          f"× {len(instances)}")
            try:
                self.compile(backend, first)
            except Unplaceable as e:
                for c in instances:
                    out.unsupported[c] = str(e)
                continue
            ok = []
            for c in instances:  # every instance on its own activations: one wrong layer is enough to exclude it
                try:
                    v = self.verdict(backend, cands.subgraph(c.ops))
                except Exception as e:  # a runtime failure on real inputs is as disqualifying as wrong values
                    out.excluded[c] = f"failed on the model's inputs: {type(e).__name__}: {e}"[:300]
                    continue
                if v.passed:
                    ok.append(c)
                else:
                    out.excluded[c] = v.reason
            if not ok:
                continue
            before = self.cache.hits if self.cache else 0
            s = self.seconds(backend, first)
            if self.cache and self.cache.hits > before:
                out.cached += 1
            else:
                out.measured += 1
            for c in ok:
                out.cost[c] = s
        if self.cache:
            self.cache.save()
        out.seconds = time.perf_counter() - start
        return out

"""`tapml.place.place(model, inputs, backends=..., device=..., budget=...)`: export, enumerate candidates, compile,
judge and time them, search (DP, then the evolutionary refinement), build and check the placed model; and `load`.

It holds the workflow only; the algorithms live in the modules it calls.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tapml.compare import Verdict, compare_tensor
from tapml.errors import TapmlError
from tapml.place.candidates import Candidate, Candidates, enumerate_candidates
from tapml.place.engines import Engine, Unplaceable, engine
from tapml.place.graph import ModelGraph, Subgraph, export_model
from tapml.place.measure import CostCache, Measured, Measurer, time_call
from tapml.place.placed import Partition, PlacedModel, partitions_of, read_plan
from tapml.place.rules import Rule
from tapml.place.search import LAUNCH, Option, best_cover, merge_runs, refine

DEFAULT_CPU = ("torch", "inductor", "onnxruntime", "tvm", "iree")
DEFAULT_CUDA = ("torch-cuda", "inductor", "inductor-max-autotune", "tvm", "iree")


@dataclass
class Placement:
    """What `place` returns: the placed model and everything the report shows."""

    placed: PlacedModel
    backends: list[str]
    device: str
    seconds: float  # the placed model, measured whole
    single: dict[str, float | str]  # backend -> whole-model seconds, or why it has none
    dp_seconds: float  # the DP placement, measured whole
    predicted: float  # the DP's own estimate
    search_seconds: float
    measure_seconds: float
    candidates: int
    measured: int
    cached: int
    excluded: dict[str, str]  # "backend ops…" -> verdict reason
    unsupported: int
    verdict: Verdict
    evolution: dict[str, Any] = field(default_factory=dict)
    greedy: dict[str, Any] = field(default_factory=dict)

    @property
    def partitions(self) -> list[Partition]:
        return self.placed.partitions

    @property
    def best_single(self) -> tuple[str, float] | None:
        times = [(b, t) for b, t in self.single.items() if isinstance(t, float)]
        return min(times, key=lambda x: x[1]) if times else None

    def summary(self) -> dict[str, Any]:
        best = self.best_single
        return {"device": self.device, "backends": self.backends, "placed_seconds": self.seconds,
                "dp_seconds": self.dp_seconds, "predicted_seconds": self.predicted, "single": self.single,
                "best_single": best, "speedup": (best[1] / self.seconds) if best else None,
                "partitions": len(self.partitions), "search_seconds": self.search_seconds,
                "measure_seconds": self.measure_seconds, "candidates": self.candidates, "measured": self.measured,
                "cached": self.cached, "excluded": self.excluded, "unsupported": self.unsupported,
                "host_crossings": self.placed.host_crossings, "verdict": self.verdict.as_dict(),
                "evolution": self.evolution, "greedy": self.greedy}


def _engines(backends: Sequence[str], device: str, cache_dir: str | None,
             extra: dict[str, Engine] | None) -> dict[str, Engine]:
    out: dict[str, Engine] = {}
    for b in backends:
        out[b] = (extra or {}).get(b) or engine(b, device, cache_dir)
    return out


class Session:
    """One model on one device with its engines, activations and compiled subgraphs: shared by the search, the
    evolutionary step, the greedy baseline and the final check."""

    def __init__(self, model: torch.nn.Module, inputs: Sequence[torch.Tensor], backends: Sequence[str],
                 device: str, cache_dir: str | None = None, engines: dict[str, Engine] | None = None,
                 cost_cache: CostCache | None = None, repeats: int = 20,
                 progress: Callable[[str], None] | None = None):
        self.device = torch.device(device)
        if not backends:
            raise TapmlError("give at least one backend (e.g. --backends torch,inductor)")
        self.backends = list(dict.fromkeys(backends))
        self.model = model.eval().to(self.device)
        self.inputs = tuple(x.to(self.device) for x in inputs)
        self.progress = progress or (lambda _m: None)
        self.graph: ModelGraph = export_model(self.model, self.inputs)
        self.values = self.graph.values_of_run(list(self.inputs))
        self.constants = {n.name for n in self.graph.gm.graph.nodes if n.op == "get_attr"}
        self.engines = _engines(self.backends, device, cache_dir, engines)
        self.measurer = Measurer(self.engines, self.values, self.constants, self.device, cost_cache, repeats,
                                 self.progress)
        self.repeats = repeats

    def compile(self, backend: str, sub: Subgraph) -> Callable[..., list[torch.Tensor]]:
        return self.measurer.compile(backend, sub)

    def build(self, partitions: Sequence[Partition]) -> PlacedModel:
        return PlacedModel(self.graph, partitions, self.compile, self.device,
                           lambda b: self.engines[b].host_crossing)

    def time(self, placed: PlacedModel) -> float:
        return time_call(lambda: placed(*self.inputs), self.device, self.repeats)

    def whole_verdict(self, placed: PlacedModel) -> Verdict:
        """The placed model's output against the model run in float64 (and the float32 reference)."""
        out = placed(*self.inputs)
        with torch.no_grad():
            ref = self.model(*self.inputs)
            wide = copy.deepcopy(self.model).cpu().double()
            oracle = wide(*[x.cpu().double() if x.is_floating_point() else x.cpu() for x in self.inputs])
        leaves = torch.utils._pytree.tree_leaves
        v = Verdict(True, "empty")
        for o, r, g in zip(leaves(out), leaves(ref), leaves(oracle)):
            v = compare_tensor(o.cpu(), r.cpu(), g)
            if not v.passed:
                return v
        return v


def _label(graph: ModelGraph, c: Candidate) -> str:
    kinds = [graph.kind(i).removeprefix("aten.") for i in sorted(c.ops)]
    shown = "+".join(kinds[:4]) + (f"+…({len(kinds)})" if len(kinds) > 4 else "")
    return f"{c.backend} [{graph.ops[min(c.ops)].name}] {shown}"


HOST_BYTES_PER_S = 25e9  # PCIe 4/5 x16 as measured by a device-to-host copy, not the link's peak


def crossing_seconds(s: Session, cands: Candidates, c: Candidate) -> float:
    """What a candidate on a backend that cannot share the device's memory adds: each activation crosses the bus
    twice (device → host, then host → the backend's own device memory, and the same way back for outputs; weights
    are uploaded once). Zero on the CPU, where the host is the device."""
    eng = s.engines[c.backend]
    if not eng.host_crossing or s.device.type == "cpu":
        return 0.0
    sub = cands.subgraph(c.ops)
    moved = [s.values[n] for n in (*sub.inputs, *sub.outputs) if n not in s.constants]
    return 2 * sum(t.numel() * t.element_size() for t in moved if isinstance(t, torch.Tensor)) / HOST_BYTES_PER_S


def search_dp(graph: ModelGraph, cands: Candidates, measured: Measured, launch: float = LAUNCH,
              extra: Callable[[Candidate], float] | None = None) -> tuple[float, list[Partition]]:
    """The DP on the measured costs plus `extra` per candidate (the host crossings)."""
    options = [Option(c.bits, s + (extra(c) if extra else 0.0), c) for c, s in measured.cost.items()]
    cost, plan = best_cover(len(graph), graph.preds, options, launch)
    if cost == float("inf"):
        missing = set(range(len(graph))) - {i for c in measured.cost for i in c.ops}
        what = ", ".join(sorted({graph.kind(i) for i in missing})[:5]) or "a valid order"
        raise TapmlError(f"no correct placement covers the model with these backends (nothing runs {what}); "
                         "add torch (or torch-cuda) to --backends")
    return cost, [Partition(o.payload.backend, o.payload.ops, o.cost, o.payload.digest) for o in plan]


def greedy_priority(graph: ModelGraph, measured: Measured, priority: Sequence[str]) -> list[Partition] | None:
    """torch-TensorRT-style baseline: the first backend in `priority` takes its largest eligible candidates
    greedily in graph order, the next backend what is left, and so on; None when it cannot cover the model."""
    taken = 0
    parts: list[Partition] = []
    for b in priority:
        mine = sorted((c for c in measured.cost if c.backend == b), key=lambda c: (-len(c.ops), min(c.ops)))
        for c in mine:
            if c.bits & taken:
                continue
            parts.append(Partition(b, c.ops, measured.cost[c], c.digest))
            taken |= c.bits
    if taken != (1 << len(graph)) - 1:
        return None
    # an executable order of the chosen partitions (fall back to None when their quotient is cyclic)
    return _order(graph, parts)


def _order(graph: ModelGraph, parts: list[Partition]) -> list[Partition] | None:
    owner = {i: k for k, p in enumerate(parts) for i in p.ops}
    deps = [{owner[j] for i in p.ops for j in range(len(graph)) if (graph.preds[i] >> j) & 1} - {k}
            for k, p in enumerate(parts)]
    done: list[int] = []
    left = set(range(len(parts)))
    while left:
        ready = sorted((k for k in left if deps[k] <= set(done)), key=lambda k: min(parts[k].ops))
        if not ready:
            return None
        done.append(ready[0])
        left.remove(ready[0])
    return [parts[k] for k in done]


def place(model: torch.nn.Module, inputs: Sequence[torch.Tensor], backends: Sequence[str] | None = None,
          device: str = "cpu", budget: float = 60.0, graph_backend: str | None = None,
          rules: dict[str, list[Rule]] | None = None, cache_dir: str | None = None,
          engines: dict[str, Engine] | None = None, repeats: int = 20, launch: float = LAUNCH, seed: int = 0,
          progress: Callable[[str], None] | None = None, cost_cache: CostCache | None | bool = True) -> Placement:
    """Place every subgraph of `model(*inputs)` on the fastest correct backend among `backends` on `device`.

    `budget`: seconds for the evolutionary refinement (0 skips it). `graph_backend`: the backend the
    evolutionary step may hand partitions to (default: the fastest whole-model backend). `engines` injects
    engines by name (a third-party or a test double). Raises TapmlError for what the user can fix."""
    backends = list(backends or (DEFAULT_CUDA if torch.device(device).type == "cuda" else DEFAULT_CPU))
    cache = CostCache() if cost_cache is True else (cost_cache or None)
    s = Session(model, inputs, backends, device, cache_dir, engines, cache, repeats, progress)
    graph = s.graph
    cands = enumerate_candidates(graph, s.backends, rules)
    measured = s.measurer.run(cands)
    t0 = time.perf_counter()
    predicted, dp_parts = search_dp(graph, cands, measured, launch, lambda c: crossing_seconds(s, cands, c))
    search_s = time.perf_counter() - t0
    dp_model = s.build(dp_parts)
    dp_seconds = s.time(dp_model)

    whole = frozenset(range(len(graph)))
    single: dict[str, float | str] = {}
    single_models: dict[str, PlacedModel] = {}
    for b in s.backends:
        c = next((c for c in cands.items if c.backend == b and c.ops == whole), None)
        if c in measured.cost:
            single_models[b] = s.build([Partition(b, whole, measured.cost[c], c.digest)])
            single[b] = s.time(single_models[b])
        else:
            single[b] = (measured.excluded.get(c) or measured.unsupported.get(c) or "not measured")[:200]
    timed = {b: t for b, t in single.items() if isinstance(t, float)}

    best_model, best_seconds, evolution = dp_model, dp_seconds, {}
    if budget > 0 and len(dp_parts) >= 2 and timed:
        g = graph_backend or min(timed, key=timed.__getitem__)
        if g not in s.engines:
            raise TapmlError(f"graph backend {g} is not among --backends {','.join(s.backends)}")
        t1 = time.perf_counter()
        evo = refine(len(dp_parts), lambda bits: _evaluate(s, dp_parts, g, bits), budget, seed)
        search_s += time.perf_counter() - t1
        evolution = {"graph_backend": g, "generations": evo.generations, "evaluated": evo.evaluated,
                     "seeds": evo.seeds, "best": evo.fitness, "seconds": evo.seconds}
        if evo.fitness < best_seconds and any(evo.best):
            best_model = s.build(_decode(s, dp_parts, g, evo.best))
            best_seconds = s.time(best_model)
    # The single-backend placements are in the space and were measured whole beside the searched one: when one
    # of them is faster as measured (the DP's sum of parts misjudged, or noise), it is the answer.
    if timed and min(timed.values()) < best_seconds:
        b = min(timed, key=timed.__getitem__)
        best_model, best_seconds = single_models[b], timed[b]
    verdict = s.whole_verdict(best_model)
    if not verdict.passed and best_model is not dp_model:
        best_model, best_seconds, verdict = dp_model, dp_seconds, s.whole_verdict(dp_model)
    greedy = greedy_priority(graph, measured, s.backends)
    greedy_info: dict[str, Any] = {"priority": s.backends}
    if greedy is not None:
        gm = s.build(greedy)
        greedy_info.update(seconds=s.time(gm), partitions=len(greedy))
    return Placement(best_model, s.backends, str(s.device), best_seconds, single, dp_seconds, predicted, search_s,
                     measured.seconds, len(cands), measured.measured, measured.cached,
                     {_label(graph, c): r for c, r in measured.excluded.items()}, len(measured.unsupported),
                     verdict, evolution, greedy_info)


def _decode(s: Session, parts: list[Partition], g: str, bits: Sequence[int]) -> list[Partition]:
    out: list[Partition] = []
    runs = {a: b for a, b in merge_runs(bits)}
    k = 0
    while k < len(parts):
        if k in runs:
            ops = frozenset().union(*(p.ops for p in parts[k:runs[k]]))
            out.append(Partition(g, ops))
            k = runs[k]
        else:
            out.append(parts[k])
            k += 1
    return out


def _evaluate(s: Session, parts: list[Partition], g: str, bits: Sequence[int]) -> float:
    """An individual built and measured whole; inf when a merged region does not compile or is wrong."""
    decoded = _decode(s, parts, g, bits)
    for p in decoded:
        if p.seconds is None:
            try:
                v = s.measurer.verdict(p.backend, s.graph.subgraph(p.ops))
            except Unplaceable:
                return float("inf")
            if not v.passed:
                return float("inf")
    return s.time(s.build(decoded))


def load(path: str | Path, model: torch.nn.Module, inputs: Sequence[torch.Tensor], device: str = "cpu",
         cache_dir: str | None = None, engines: dict[str, Engine] | None = None) -> PlacedModel:
    """A saved placement rebuilt on `model` (exported again on `inputs`); artifacts come from the caches."""
    data = read_plan(path)
    backends = sorted({p["backend"] for p in data["partitions"]})
    s = Session(model, inputs, backends, device, cache_dir, engines, None, 1)
    parts = partitions_of(s.graph, data)
    return s.build(parts)

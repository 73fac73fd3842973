"""Planners: GraphPipe's dynamic program over the series-parallel tree (a DAG of stages), and the sequential
baselines — a PipeDream-style chain partition of a topological order and a Piper-style program over downsets —
all minimizing the same predicted step (cost.evaluate) under a memory limit per device.

Each returns a Plan with its search time. They choose stages, replicas per stage, the micro-batch size and the
in-flight micro-batches per stage; they must not run anything.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from tapml.errors import TapmlError
from tapml.graphpipe.cost import CHAIN, DAG, Estimate, Hardware, evaluate, stage_graph
from tapml.graphpipe.graph import LayerGraph
from tapml.graphpipe.sp import LEAF, PARALLEL, SERIES, SPTree, decompose

INF = math.inf


@dataclass
class Plan:
    """Stages (layer indices) in a topological order of the stage graph, replicas per stage (ranks taking its
    micro-batches round-robin), the micro-batch, and what the cost model predicts."""

    method: str
    topology: str
    stages: list[list[int]]
    replicas: list[int]
    micro_batch: int
    batch: int
    estimate: Estimate
    search_s: float
    layer_names: list[list[str]]
    simulated_s: float | None = None  # the simulator's step, when the planner ran it

    @property
    def n_micro(self) -> int:
        return self.batch // self.micro_batch

    @property
    def devices(self) -> int:
        return sum(self.replicas)

    def ranks(self) -> list[list[int]]:
        """The ranks of each stage's replicas: consecutive, in stage order."""
        out, r = [], 0
        for d in self.replicas:
            out.append(list(range(r, r + d)))
            r += d
        return out

    def to_json(self) -> dict[str, Any]:
        e = self.estimate
        return {"method": self.method, "topology": self.topology, "stages": self.stages, "replicas": self.replicas,
                "micro_batch": self.micro_batch, "batch": self.batch, "search_s": self.search_s,
                "layer_names": self.layer_names, "simulated_s": self.simulated_s,
                "estimate": {"step_s": e.step_s, "tau": e.tau, "depth": e.depth, "inflight": e.inflight,
                             "memory": e.memory, "feasible": e.feasible, "edges": [list(x) for x in e.edges]}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        e = d["estimate"]
        est = Estimate(e["step_s"], e["tau"], e["depth"], e["inflight"], e["memory"], e["feasible"],
                       [tuple(x) for x in e["edges"]])
        return cls(d["method"], d["topology"], d["stages"], d["replicas"], d["micro_batch"], d["batch"], est,
                   d["search_s"], d["layer_names"], d.get("simulated_s"))

    def describe(self) -> str:
        e = self.estimate
        return (f"{self.method}: {len(self.stages)} stages on {self.devices} devices, depth {e.depth}, "
                f"micro-batch {self.micro_batch} × {self.n_micro}, τ {e.tau * 1e3:.3f} ms, "
                f"predicted step {e.step_s * 1e3:.2f} ms, search {self.search_s * 1e3:.1f} ms")


def micro_batches(batch: int, max_micro: int = 64) -> list[int]:
    """Micro-batch sizes tried: divisors of the batch giving at most `max_micro` micro-batches."""
    return [b for b in range(1, batch + 1) if batch % b == 0 and batch // b <= max_micro]


def _check(lg: LayerGraph, devices: int, batch: int) -> None:
    if devices < 1:
        raise TapmlError(f"--devices must be ≥ 1 (got {devices})")
    if batch < 1:
        raise TapmlError(f"--batch must be ≥ 1 (got {batch})")
    if len(lg) == 0:
        raise TapmlError("the model has no layers to partition")


def _finish(method: str, topology: str, lg: LayerGraph, stages: list[list[int]], replicas: list[int], b: int,
            batch: int, hw: Hardware, t0: float, predicted: float | None) -> Plan:
    """The Plan, checked against the cost the program claimed for it (None: a bound, not a claim)."""
    est = evaluate(lg, stages, replicas, b, batch, hw, topology)
    if predicted is not None and not math.isclose(est.step_s, predicted, rel_tol=1e-9, abs_tol=1e-15):
        raise AssertionError(f"{method}: the program's cost {predicted} disagrees with the plan's {est.step_s}")
    names = [[lg.layers[i].name for i in s] for s in stages]
    return Plan(method, topology, stages, replicas, b, batch, est, time.perf_counter() - t0, names)


def _infeasible(devices: int, hw: Hardware) -> TapmlError:
    return TapmlError(f"no plan fits in {hw.memory / 2**30:.2f} GiB per device on {devices} devices; give more "
                      "devices or memory per device, or a smaller batch")


def make_plan(lg: LayerGraph, stages: Sequence[Sequence[int]], replicas: Sequence[int], micro_batch: int,
              batch: int, hw: Hardware | None = None, method: str = "manual", topology: str = DAG) -> Plan:
    """A Plan for a partition chosen by hand (stages are put in a topological order of the stage graph)."""
    hw = hw or Hardware()
    if sorted(v for s in stages for v in s) != list(range(len(lg))):
        raise TapmlError("the stages must cover every layer exactly once")
    if batch % micro_batch:
        raise TapmlError(f"the micro-batch {micro_batch} must divide the batch {batch}")
    st = [sorted(s) for s in stages]
    if topology == DAG:
        g = stage_graph(lg, st)
        if not nx.is_directed_acyclic_graph(g):
            raise TapmlError("these stages depend on each other in a cycle; make each stage convex")
        order = list(nx.lexicographical_topological_sort(g, key=lambda s: min(st[s])))
    else:
        order = list(range(len(st)))
    est = evaluate(lg, [st[i] for i in order], [replicas[i] for i in order], micro_batch, batch, hw, topology)
    return Plan(method, topology, [st[i] for i in order], [replicas[i] for i in order], micro_batch, batch, est,
                0.0, [[lg.layers[i].name for i in st[k]] for k in order])


# ----------------------------------------------------------------------------------------------- array algebra
# Tables are indexed [d, q, p] (GraphPipe) or [d, k] (chains): at most d devices; q stages after this part on the
# longest path to the sink (it sets the micro-batches in flight, hence memory); at most p (k) stages deep. The
# value is the slowest stage's τ. Every formula repeats cost.stage_time/stage_memory operation for operation, so
# a value found again while rebuilding a plan compares equal bit for bit.


@dataclass
class _Aggs:
    """Additive costs of sets of layers as arrays (one entry per set): compute and activation bytes linear in
    the micro-batch b (a + c·b), parameter bytes, boundary bytes per sample and messages."""

    ca: np.ndarray
    cc: np.ndarray
    aa: np.ndarray
    ac: np.ndarray
    params: np.ndarray
    cross: np.ndarray
    msgs: np.ndarray

    def __getitem__(self, k: Any) -> _Aggs:
        return _Aggs(*(np.atleast_1d(getattr(self, f)[k]) for f in self.__dataclass_fields__))


def _aggs_of(lg: LayerGraph, sets: Sequence[Sequence[int]]) -> _Aggs:
    rows = []
    for nodes in sets:
        s = set(nodes)
        lay = [lg.layers[i] for i in nodes]
        cross = [(w, 1) for (u, v), w in lg.edges.items() if (u in s) != (v in s)]
        rows.append([sum(x.fwd[0] + x.bwd[0] for x in lay), sum(x.fwd[1] + x.bwd[1] for x in lay),
                     sum(x.act[0] for x in lay), sum(x.act[1] for x in lay), sum(x.params for x in lay),
                     sum(w for w, _ in cross), len(cross)])
    a = np.array(rows, dtype=float).reshape(-1, 7)
    return _Aggs(*(a[:, i] for i in range(7)))


def _tau(g: _Aggs, b: int, m: int, D: int, hw: Hardware, max_r: int | None = None) -> np.ndarray:
    """[set, r, q] τ of each set as one stage with exactly r replicas and q stages after it; INF over memory."""
    rmax = min(D, m, max_r or D)
    r = np.arange(1, rmax + 1, dtype=float)
    compute, act = g.ca + g.cc * b, g.aa + g.ac * b
    t = (compute + 2 * (g.cross * b / hw.bandwidth + g.msgs * hw.latency))[:, None] / r[None, :]
    # the replicas' all-reduce, amortized (zero for one replica: x + 0.0 is x, as stage_time leaves it)
    t = t + ((2 * (r - 1) / r)[None, :] * g.params[:, None] / hw.bandwidth + (2 * (r - 1) * hw.latency)[None, :]) / m
    ok = (g.params * hw.state_factor)[:, None, None] + _inflight(m, D, rmax)[None] * act[:, None, None] <= hw.memory
    v = np.full((len(compute), D + 1, D + 1), INF)
    v[:, 1: rmax + 1, :] = np.where(ok, t[:, :, None], INF)
    return v


@functools.lru_cache(maxsize=4096)
def _inflight(m: int, D: int, rmax: int) -> np.ndarray:
    """[r - 1, q] micro-batches one of r replicas holds with q stages after it (of m)."""
    return np.array([[math.ceil(min(m, q + 1) / r) for q in range(D + 1)] for r in range(1, rmax + 1)],
                    dtype=float)


def _best_r(raw: np.ndarray, d: int, q: int, value: float) -> int:
    """The fewest replicas ≤ d reaching `value` in a row of _tau."""
    return next(r for r in range(1, d + 1) if raw[r, q] == value)


class _Shifts:
    """Index grids for one device count D."""

    def __init__(self, D: int):
        n = D + 1
        d1, d = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        self.dd, self.dmask = np.clip(d - d1, 0, D), d < d1  # [d1, d] -> d - d1
        q, p2 = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        self.qp, self.qpmask = np.clip(q + p2, 0, D), q + p2 > D  # [q, p2] -> q + p2

    def by_dev(self, a: np.ndarray) -> np.ndarray:
        """[d1, d, ...] = a[d - d1, ...], INF where d < d1."""
        out = a[self.dd]
        out[self.dmask] = INF
        return out

    def q_plus_p(self, u: np.ndarray) -> np.ndarray:
        """[..., d1, q, p2] = u[..., d1, q + p2], INF past the last q."""
        out = u[..., self.qp]
        out[..., self.qpmask] = INF
        return out


def _monotone(a: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    for ax in axes:
        a = np.minimum.accumulate(a, axis=ax)
    return a


# ----------------------------------------------------------------------------------------------- GraphPipe


@dataclass(frozen=True)
class _Ctx:
    b: int  # micro-batch
    m: int  # micro-batches
    D: int  # devices
    hw: Hardware
    max_r: int | None  # replicas per stage allowed (None: up to D)


class _Node:
    """An SP-tree node prepared for the program: its layers, children, costs as one unit, and for a series
    node the costs of every run of consecutive children [ranges[i][j - i] for children i..j]."""

    def __init__(self, kind: str, nodes: tuple[int, ...], children: list[_Node], lg: LayerGraph):
        self.kind, self.nodes, self.children = kind, nodes, children
        self.agg = _aggs_of(lg, [nodes])
        self.ranges: list[_Aggs] = []
        self.table = np.empty(0)
        self.raw_unit = np.empty(0)

    def unit_table(self) -> np.ndarray:
        return np.minimum.accumulate(self.raw_unit, axis=0)


def _prepare(t: SPTree, lg: LayerGraph, max_series: int) -> _Node:
    """Parallel nodes made binary (Huffman order: the two cheapest branches pair first, so small branches can
    share a stage); series with more than `max_series` children cut into that many balanced coarsened blocks."""
    if t.kind == LEAF:
        return _Node(LEAF, t.nodes, [], lg)
    kids = [_prepare(c, lg, max_series) for c in t.children]
    work = lambda k: float(k.agg.ca[0] + k.agg.cc[0])
    if t.kind == PARALLEL:
        while len(kids) > 2:
            kids.sort(key=work)
            a, b = kids.pop(0), kids.pop(0)
            kids.append(_Node(PARALLEL, a.nodes + b.nodes, [a, b], lg))
        return _Node(PARALLEL, t.nodes, kids, lg)
    if len(kids) > max_series:
        cum = np.cumsum([work(k) for k in kids])
        cuts = sorted({int(np.searchsorted(cum, cum[-1] * i / max_series)) for i in range(1, max_series)})
        bounds = sorted({0, *[min(c + 1, len(kids)) for c in cuts], len(kids)})
        blocks = [kids[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        kids = [b[0] if len(b) == 1 else _Node(LEAF, tuple(v for k in b for v in k.nodes), [], lg) for b in blocks]
    node = _Node(SERIES, t.nodes, kids, lg)
    # Runs of consecutive children: additive costs; boundary traffic is the children's minus twice the edges
    # between children of the run.
    pos = {v: i for i, k in enumerate(kids) for v in k.nodes}
    k = len(kids)
    w, c = np.zeros((k, k)), np.zeros((k, k))
    for (u, v), x in lg.edges.items():
        if u in pos and v in pos and pos[u] != pos[v]:
            w[pos[u], pos[v]] += x
            c[pos[u], pos[v]] += 1
    base = np.array([[getattr(kid.agg, f)[0] for f in _Aggs.__dataclass_fields__] for kid in kids])
    for i in range(k):
        acc = np.cumsum(base[i:], axis=0)
        inner_w = np.cumsum([w[i:j, j].sum() for j in range(i, k)])
        inner_c = np.cumsum([c[i:j, j].sum() for j in range(i, k)])
        acc[:, 5] -= 2 * inner_w
        acc[:, 6] -= 2 * inner_c
        node.ranges.append(_Aggs(*(acc[:, f] for f in range(7))))
    return node


def _solve(x: _Node, c: _Ctx, sh: _Shifts) -> None:
    b, m, D, hw = c.b, c.m, c.D, c.hw
    n = D + 1
    x.raw_unit = _tau(x.agg, b, m, D, hw, c.max_r)[0]
    unit = x.unit_table()
    if x.kind == LEAF:
        x.table = np.repeat(unit[:, :, None], n, axis=2)
        x.table[:, :, 0] = INF
        return
    for kid in x.children:
        _solve(kid, c, sh)
    if x.kind == PARALLEL:  # the branches on disjoint devices, or together as one stage
        left, right = x.children
        x.table = np.maximum(left.table[:, None], sh.by_dev(right.table)).min(axis=0)
        x.table[:, :, 1:] = np.minimum(x.table[:, :, 1:], unit[:, :, None])
        return
    kids, k = x.children, len(x.children)
    suffix = np.zeros((k + 1, n, n, n))  # suffix[i]: children i.. ; suffix[k]: nothing left (τ 0, depth 0)
    shifted = np.zeros((k + 1, n, n, n, n))  # [i, d1, d, q, p2] = suffix[i][d - d1, q, p2]
    shifted[k] = sh.by_dev(suffix[k])
    x.raw = [np.empty(0)] * k  # type: ignore[attr-defined]
    for i in range(k - 1, -1, -1):
        best = np.full((n, n, n), INF)
        # Children i..j as one stage, the rest after it: [j, d1, q, p2] against [j, d1, d, q, p2].
        u = sh.q_plus_p(np.minimum.accumulate(_tau(x.ranges[i], b, m, D, hw, c.max_r), axis=1))
        cand = np.maximum(u[:, :, None], shifted[i + 1:]).min(axis=(0, 1))
        best[:, :, 1:] = cand[:, :, :D]
        if kids[i].kind != LEAF:  # child i planned on its own (p - p2 deep), the rest after it (p2 deep)
            ct = kids[i].table
            for p2 in range(D):
                child = np.full((n, n, n), INF)  # [d1, q, p] = ct[d1, q + p2, p - p2]
                child[:, : n - p2, p2 + 1:] = ct[:, p2:, 1: n - p2]
                np.minimum(best, np.maximum(child[:, None], shifted[i + 1, :, :, :, p2, None]).min(axis=0),
                           out=best)
        x.raw[i] = best  # type: ignore[attr-defined]
        suffix[i] = _monotone(best, (0, 2))
        shifted[i] = sh.by_dev(suffix[i])
    x.suffix = suffix  # type: ignore[attr-defined]
    x.table = suffix[0]


def _rebuild(x: _Node, d: int, q: int, p: int, c: _Ctx, out: list[tuple[tuple[int, ...], int]]) -> None:
    """Append (layers, replicas) of each stage of x's best plan at [d, q, p]."""
    v = x.table[d, q, p]
    if x.kind == LEAF or (x.kind == PARALLEL and x.unit_table()[d, q] == v):
        out.append((x.nodes, _best_r(x.raw_unit, d, q, v)))
    elif x.kind == PARALLEL:
        left, right = x.children
        d1 = next(d1 for d1 in range(d + 1) if max(left.table[d1, q, p], right.table[d - d1, q, p]) == v)
        _rebuild(left, d1, q, p, c, out)
        _rebuild(right, d - d1, q, p, c, out)
    else:
        _rebuild_series(x, 0, d, q, p, c, out)


def _rebuild_series(x: _Node, i: int, d: int, q: int, p: int, c: _Ctx,
                    out: list[tuple[tuple[int, ...], int]]) -> None:
    kids, D = x.children, c.D
    if i == len(kids):
        return
    suffix, v = x.suffix, x.suffix[i][d, q, p]  # type: ignore[attr-defined]
    raw = x.raw[i]  # type: ignore[attr-defined]
    dd, pp = next((a, c) for a in range(d + 1) for c in range(p + 1) if raw[a, q, c] == v)
    rows = _tau(x.ranges[i], c.b, c.m, D, c.hw, c.max_r)
    for jj in range(len(rows)):
        u = np.minimum.accumulate(rows[jj], axis=0)
        p2 = pp - 1
        for d1 in range(dd + 1):
            if p2 >= 0 and q + p2 <= D and max(u[d1, q + p2], suffix[i + jj + 1][dd - d1, q, p2]) == v:
                out.append((tuple(n for c in kids[i:i + jj + 1] for n in c.nodes),
                            _best_r(rows[jj], d1, q + p2, u[d1, q + p2])))
                _rebuild_series(x, i + jj + 1, dd - d1, q, p2, c, out)
                return
    for p2 in range(pp):
        for d1 in range(dd + 1):
            if q + p2 <= D and max(kids[i].table[d1, q + p2, pp - p2], suffix[i + 1][dd - d1, q, p2]) == v:
                _rebuild(kids[i], d1, q + p2, pp - p2, c, out)
                _rebuild_series(x, i + 1, dd - d1, q, p2, c, out)
                return
    raise AssertionError("series choice not found")


def _tree(lg: LayerGraph, devices: int, max_series: int | None) -> _Node:
    return _prepare(decompose(lg.graph), lg, max_series or max(16, 2 * devices))


def search_space(lg: LayerGraph, devices: int, max_series: int | None = None) -> list[frozenset[int]]:
    """Every set of layers GraphPipe may make a stage (a subtree of its prepared series-parallel tree, or a run
    of consecutive children of a series node); a plan is any partition of the layers into these, with replicas.
    Brute force over this space must find what the program finds."""
    out: set[frozenset[int]] = set()

    def walk(x: _Node) -> None:
        out.add(frozenset(x.nodes))
        for c in x.children:
            walk(c)
        if x.kind == SERIES:
            k = x.children
            out.update(frozenset(v for c in k[i:j + 1] for v in c.nodes) for i in range(len(k))
                       for j in range(i, len(k)))

    walk(_tree(lg, devices, max_series))
    return sorted(out, key=lambda f: (len(f), sorted(f)))


def plan_graphpipe(lg: LayerGraph, devices: int, batch: int, hw: Hardware | None = None,
                   micro: Sequence[int] | None = None, max_series: int | None = None, chain: bool = True,
                   replicate: bool = True, refine: int = 4) -> Plan:
    """GraphPipe: the best stage DAG whose stages are units of the series-parallel tree, with replicas per
    stage and the micro-batch, for the predicted step (M + P − 1)·τ; exact over `search_space` (series longer
    than `max_series` children, default max(16, 2·devices), are first cut into balanced blocks).

    With `chain`, the PipeDream-style chain of the same topological order is a candidate too, run as a DAG
    (each stage sends straight to its consumers, nothing relayed): a cut across parallel branches is outside
    the series-parallel units. With `refine` > 0 the program's best plans for the `refine` best (micro-batch,
    depth) pairs and the chain candidate are simulated (1F1B on the stage DAG) and the fastest simulated one is
    returned: (M + P − 1)·τ is exact for balanced chains only. `refine=0`: the program's optimum (or the chain's
    when that predicts better). `replicate=False`: one device per stage (the stage graph alone)."""
    hw = hw or Hardware()
    _check(lg, devices, batch)
    t0 = time.perf_counter()
    D, sh = devices, _Shifts(devices)
    max_r = None if replicate else 1
    tree = _tree(lg, devices, max_series)
    found: list[tuple[float, int, int]] = []
    for b in micro or micro_batches(batch):
        m = batch // b
        _solve(tree, _Ctx(b, m, D, hw, max_r), sh)
        found += [((m + p - 1) * tree.table[D, 0, p], b, p) for p in range(1, D + 1)
                  if (m + p - 1) * tree.table[D, 0, p] < INF]
    found.sort()
    cands: list[Plan] = []
    for k, (cost, b, p) in enumerate(found[: max(1, refine)]):
        ctx = _Ctx(b, batch // b, D, hw, max_r)
        _solve(tree, ctx, sh)
        units: list[tuple[tuple[int, ...], int]] = []
        _rebuild(tree, D, 0, p, ctx, units)
        stages = [sorted(u) for u, _ in units]
        g = stage_graph(lg, stages)
        order = list(nx.lexicographical_topological_sort(g, key=lambda s: min(stages[s])))
        # The best pair's cost is exact; the others bound plans that may be shallower than their depth p.
        plan = _finish("graphpipe", DAG, lg, [stages[s] for s in order], [units[s][1] for s in order], b, batch,
                       hw, t0, cost if k == 0 else None)
        if all((plan.stages, plan.replicas, plan.micro_batch) != (c.stages, c.replicas, c.micro_batch)
               for c in cands):
            cands.append(plan)
    if chain:
        coarse, groups = lg.coarsen_order(max(64, 4 * devices))
        try:
            seq = plan_pipedream(coarse, devices, batch, hw, micro, replicate=replicate)
        except TapmlError:
            seq = None
        if seq is not None:
            stages = [[v for g in st for v in groups[g]] for st in seq.stages]
            alt = make_plan(lg, stages, seq.replicas, seq.micro_batch, batch, hw, "graphpipe", DAG)
            if alt.estimate.feasible:
                cands.append(alt)
    if not cands:
        raise _infeasible(devices, hw)
    if refine > 0:
        from tapml.graphpipe.schedule import build
        from tapml.graphpipe.simulator import StageCosts, simulate

        for c in cands:
            c.simulated_s = simulate(build(c, lg), StageCosts.of(c, lg), hw, check=False).step_s
        out = min(cands, key=lambda c: (c.simulated_s, c.estimate.step_s))
    else:
        out = min(cands, key=lambda c: c.estimate.step_s)
    out.search_s = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------------------------- chains


def _chain_dp(first: list[_Aggs], nxt: list[np.ndarray], b: int, m: int, D: int, hw: Hardware, sh: _Shifts,
              max_r: int | None, exact: bool, deadline: float = INF) -> list[np.ndarray]:
    """Chains over a lattice of prefixes (positions, or downsets): tables[i][d, k] is the best τ of everything
    after prefix i with at most d devices in at most (`exact`: exactly) k stages; first[i] holds the costs of
    each candidate next stage, nxt[i] the prefix each one reaches. Every nxt is numbered above its prefix."""
    n = len(first)
    size = D + 1
    tables = [np.empty(0)] * n
    tables[n - 1] = np.zeros((size, size))
    if exact:
        tables[n - 1][:, 1:] = INF
    shifted = np.zeros((n, size, size, size))  # [i, d1, d, k] = tables[i][d - d1, k - 1]
    for i in range(n - 1, -1, -1):
        if time.perf_counter() > deadline:
            raise TimeoutError("the planner passed its time budget")
        if i < n - 1:
            u = np.minimum.accumulate(_tau(first[i], b, m, D, hw, max_r), axis=1)  # [j, d1, q = k - 1]
            uk = np.full_like(u, INF)
            uk[:, :, 1:] = u[:, :, :D]
            best = np.maximum(uk[:, :, None, :], shifted[nxt[i]]).min(axis=(0, 1))
            tables[i] = _monotone(best, (0,) if exact else (0, 1))
        prev = np.full((size, size), INF)
        prev[:, 1:] = tables[i][:, :D]
        shifted[i] = sh.by_dev(prev)
    return tables


def _chain_rebuild(tables, first, nxt, b, m, D, hw, max_r, exact, d, k) -> list[tuple[int, int, int]]:
    """(prefix, next prefix, replicas) of each stage of the best chain from prefix 0 at [d, k]."""
    out, i, last = [], 0, len(tables) - 1
    while i != last:
        v = tables[i][d, k]
        raw = _tau(first[i], b, m, D, hw, max_r)
        u = np.minimum.accumulate(raw, axis=1)
        hit = next((jj, d1, kk) for kk in ([k] if exact else range(1, k + 1)) for jj in range(len(nxt[i]))
                   for d1 in range(1, d + 1)
                   if max(u[jj, d1, kk - 1], tables[nxt[i][jj]][d - d1, kk - 1]) == v)
        jj, d1, kk = hit
        out.append((i, int(nxt[i][jj]), _best_r(raw[jj], d1, kk - 1, u[jj, d1, kk - 1])))
        i, d, k = int(nxt[i][jj]), d - d1, kk - 1
    return out


def _plan_chain(method: str, lg: LayerGraph, devices: int, batch: int, hw: Hardware, micro, first, nxt,
                stage_of, t0: float, max_r: int | None, exact: bool, budget_s: float = INF) -> Plan:
    D, sh = devices, _Shifts(devices)
    best = None
    for b in micro or micro_batches(batch):
        m = batch // b
        tables = _chain_dp(first, nxt, b, m, D, hw, sh, max_r, exact, t0 + budget_s)
        for k in [D] if exact else range(1, D + 1):
            c = (m + k - 1) * tables[0][D, k]
            if c < INF and (best is None or c < best[0]):
                best = (c, b, k)
    if best is None:
        raise _infeasible(devices, hw)
    cost, b, k = best
    m = batch // b
    tables = _chain_dp(first, nxt, b, m, D, hw, sh, max_r, exact)
    cuts = _chain_rebuild(tables, first, nxt, b, m, D, hw, max_r, exact, D, k)
    return _finish(method, CHAIN, lg, [stage_of(i, j) for i, j, _ in cuts], [r for _, _, r in cuts], b, batch, hw,
                   t0, cost)


def plan_pipedream(lg: LayerGraph, devices: int, batch: int, hw: Hardware | None = None,
                   micro: Sequence[int] | None = None, replicate: bool = True, exact: bool = False) -> Plan:
    """PipeDream-style: the layers in their topological order cut into a chain of contiguous stages, with
    replicas when `replicate`. `exact`: exactly `devices` stages of one device each (what the single-stage
    schedules of torch.distributed.pipelining run)."""
    hw = hw or Hardware()
    _check(lg, devices, batch)
    n = len(lg)
    if exact and devices > n:
        raise TapmlError(f"{devices} stages need at least {devices} layers; the model has {n}")
    t0 = time.perf_counter()
    rows = np.array([[x.fwd[0] + x.bwd[0], x.fwd[1] + x.bwd[1], x.act[0], x.act[1], x.params] for x in lg.layers])
    pre = np.vstack([np.zeros(5), np.cumsum(rows, axis=0)])
    w, c = np.zeros((n + 1, n + 1)), np.zeros((n + 1, n + 1))
    for (u, v), x in lg.edges.items():
        w[u, v] += x
        c[u, v] += 1
    # rel[i, j]: edges u < i <= j <= v (live at i, still live at j); rel[i, i] is what is live at boundary i.
    rel = np.zeros((n + 2, n + 2))
    relc = np.zeros((n + 2, n + 2))
    rel[1:n + 2, : n + 1] = np.flip(np.cumsum(np.flip(np.cumsum(w, axis=0), axis=1), axis=1), axis=1)
    relc[1:n + 2, : n + 1] = np.flip(np.cumsum(np.flip(np.cumsum(c, axis=0), axis=1), axis=1), axis=1)
    first, nxt = [], []
    for i in range(n):
        j = np.arange(i + 1, n + 1)
        s = pre[j] - pre[i]
        live = np.diagonal(rel)[j]
        first.append(_Aggs(s[:, 0], s[:, 1], s[:, 2], s[:, 3] + rel[i, j], s[:, 4], rel[i, i] + live,
                           relc[i, i] + np.diagonal(relc)[j]))
        nxt.append(j)
    first.append(_Aggs(*([np.empty(0)] * 7)))
    return _plan_chain("pipedream", lg, devices, batch, hw, micro, first, nxt,
                       lambda i, j: list(range(i, j)), t0, 1 if exact or not replicate else None, exact)


def _ideals(lg: LayerGraph, limit: int) -> list[int]:
    """Every downward-closed set of layers, as bitmasks, smallest first."""
    n = len(lg)
    preds = [0] * n
    for u, v in lg.edges:
        preds[v] |= 1 << u
    seen, frontier = {0}, [0]
    while frontier:
        nxt = []
        for s in frontier:
            for v in range(n):
                bit = 1 << v
                if not s & bit and preds[v] & s == preds[v] and s | bit not in seen:
                    seen.add(s | bit)
                    nxt.append(s | bit)
        if len(seen) > limit:
            raise TapmlError(f"the Piper-style planner would visit more than {limit} downsets of this {n}-layer "
                             "graph; coarsen the model's layers or raise the limit")
        frontier = nxt
    return sorted(seen, key=lambda s: (s.bit_count(), s))


def plan_piper(lg: LayerGraph, devices: int, batch: int, hw: Hardware | None = None,
               micro: Sequence[int] | None = None, limit: int = 50_000, budget_s: float = INF) -> Plan:
    """Piper-style: a chain of stages, each the difference of two downsets of the layer DAG (any convex set, in
    a linear order), with replicas, by a program over all pairs of downsets. Its cost grows with the number of
    downsets, which multiplies with every parallel branch. Past `budget_s` seconds it raises TimeoutError."""
    hw = hw or Hardware()
    _check(lg, devices, batch)
    t0 = time.perf_counter()
    n = len(lg)
    ideals = _ideals(lg, limit)
    member = np.array([[(s >> v) & 1 for v in range(n)] for s in ideals], dtype=bool)
    rows = np.array([[x.fwd[0] + x.bwd[0], x.fwd[1] + x.bwd[1], x.act[0], x.act[1], x.params] for x in lg.layers])
    tot = member.astype(float) @ rows
    w, c = np.zeros((n, n)), np.zeros((n, n))
    for (u, v), x in lg.edges.items():
        w[u, v] += x
        c[u, v] += 1
    out_w, out_c = member.astype(float) @ w, member.astype(float) @ c  # [ideal, v]: from the ideal into v
    live, live_c = (out_w * ~member).sum(1), (out_c * ~member).sum(1)
    sizes = member.sum(1)
    first, nxt = [], []
    for i in range(len(ideals)):
        sup = np.flatnonzero(member[:, member[i]].all(axis=1) & (sizes > sizes[i]))
        s = tot[sup] - tot[i]
        relay = (~member[sup]).astype(float) @ out_w[i]  # held by the stage: from before it to after it
        first.append(_Aggs(s[:, 0], s[:, 1], s[:, 2], s[:, 3] + relay, s[:, 4], live[i] + live[sup],
                           live_c[i] + live_c[sup]))
        nxt.append(sup)
    return _plan_chain("piper", lg, devices, batch, hw, micro, first, nxt,
                       lambda i, j: [v for v in range(n) if member[j, v] and not member[i, v]], t0, None, False,
                       budget_s)


PLANNERS = {"graphpipe": plan_graphpipe, "pipedream": plan_pipedream, "piper": plan_piper}


def plan(method: str, lg: LayerGraph, devices: int, batch: int, hw: Hardware | None = None, **kw: Any) -> Plan:
    """Run one planner by name."""
    if method not in PLANNERS:
        raise TapmlError(f"unknown planner {method!r}; choose one of: {', '.join(PLANNERS)}")
    return PLANNERS[method](lg, devices, batch, hw, **kw)

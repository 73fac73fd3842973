"""GraphPipe's planners against brute force on small graphs with simulated costs, the series-parallel
decomposition, and the planners' speed on a 300-layer graph."""

import itertools
import math
import random
import time

import networkx as nx
import pytest

from tapml.errors import TapmlError
from tapml.graphpipe.cost import CHAIN, DAG, Hardware, evaluate
from tapml.graphpipe.graph import LayerGraph
from tapml.graphpipe.planner import (
    Plan,
    _ideals,
    make_plan,
    micro_batches,
    plan_graphpipe,
    plan_pipedream,
    plan_piper,
    search_space,
)
from tapml.graphpipe.sp import LEAF, PARALLEL, SERIES, decompose, is_series_parallel

# ----------------------------------------------------------------------------------------------- graphs


def random_sp(n: int, rng: random.Random) -> nx.DiGraph:
    """A random series-parallel DAG on n nodes (series: every sink of the first part feeds every source of the
    second), numbered in a topological order."""
    def build(k):
        if k == 1:
            one = nx.DiGraph()
            one.add_node(0)
            return one, [0], [0], 1
        split = rng.randint(1, k - 1)
        ga, sa, ta, na = build(split)
        gb, sb, tb, nb = build(k - split)
        g = nx.DiGraph()
        g.add_nodes_from(range(na + nb))
        g.add_edges_from(ga.edges)
        g.add_edges_from((u + na, v + na) for u, v in gb.edges)
        if rng.random() < 0.5:
            g.add_edges_from((t, s + na) for t in ta for s in sb)
            return g, sa, [t + na for t in tb], na + nb
        return g, sa + [s + na for s in sb], ta + [t + na for t in tb], na + nb

    g = build(n)[0]
    order = {v: i for i, v in enumerate(nx.topological_sort(g))}
    return nx.relabel_nodes(g, order)


def random_dag(n: int, rng: random.Random, p: float = 0.3) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    for v in range(1, n):
        for u in [u for u in range(v) if rng.random() < p] or [rng.randrange(v)]:
            g.add_edge(u, v)
    return g


def costs(g: nx.DiGraph, rng: random.Random) -> LayerGraph:
    n = g.number_of_nodes()
    lg = LayerGraph.synthetic(g, {i: rng.uniform(0.1, 1.0) for i in range(n)},
                              act={i: rng.uniform(0, 10) for i in range(n)},
                              params={i: rng.randint(0, 10) for i in range(n)}, edge_bytes=rng.uniform(0, 2))
    for lay in lg.layers:  # a per-micro-batch constant too, as measured layers have
        lay.fwd = (rng.uniform(0, 0.5), lay.fwd[1])
        lay.bwd = (rng.uniform(0, 1.0), lay.bwd[1])
    return lg


def hardware(rng: random.Random) -> Hardware:
    return Hardware(memory=rng.choice([math.inf, rng.uniform(20, 200)]), bandwidth=rng.uniform(1, 10),
                    latency=rng.uniform(0, 0.1), state_factor=rng.choice([1, 2, 4]))


def best_of(lg, D, B, hw, partitions, topology):
    best = math.inf
    for stages in partitions:
        if len(stages) > D:
            continue
        for reps in itertools.product(range(1, D + 1), repeat=len(stages)):
            if sum(reps) > D:
                continue
            for b in micro_batches(B):
                e = evaluate(lg, stages, reps, b, B, hw, topology)
                if e.feasible:
                    best = min(best, e.step_s)
    return best


def covers(n, blocks):
    """Every partition of range(n) into the given blocks (exact cover by backtracking)."""
    out = []

    def rec(covered, cur):
        if len(covered) == n:
            out.append([sorted(x) for x in cur])
            return
        v = min(set(range(n)) - covered)
        for blk in blocks:
            if v in blk and not blk & covered:
                rec(covered | blk, [*cur, blk])

    rec(frozenset(), [])
    return out


def agree(got: float, want: float) -> bool:
    return got == want == math.inf or math.isclose(got, want, rel_tol=1e-9)


def planned(fn, *a, **kw) -> float:
    try:
        return fn(*a, **kw).estimate.step_s
    except TapmlError:
        return math.inf


# ----------------------------------------------------------------------------------------------- brute force


def test_graphpipe_equals_brute_force_over_its_space():
    rng = random.Random(0)
    for _ in range(120):
        n = rng.randint(1, 9)
        g = random_sp(n, rng) if rng.random() < 0.7 else random_dag(n, rng)
        lg, hw = costs(g, rng), hardware(rng)
        D, B = rng.randint(1, 4), rng.choice([4, 6, 8])
        want = best_of(lg, D, B, hw, covers(n, search_space(lg, D)), DAG)
        got = planned(plan_graphpipe, lg, D, B, hw, chain=False, refine=0)
        assert agree(got, want), (list(g.edges), D, B, hw, got, want)


def test_graphpipe_on_ten_nodes_equals_brute_force():
    rng = random.Random(1)
    for _ in range(6):
        g = random_sp(10, rng)
        lg, hw = costs(g, rng), hardware(rng)
        want = best_of(lg, 3, 4, hw, covers(10, search_space(lg, 3)), DAG)
        assert agree(planned(plan_graphpipe, lg, 3, 4, hw, chain=False, refine=0), want)


def ideal_chains(ideals: list[int], n: int, most: int) -> list[list[list[int]]]:
    """Every chain ∅ ⊂ I1 ⊂ … ⊂ all of at most `most` steps, as the stages (set differences) it makes."""
    full, out = (1 << n) - 1, []

    def grow(ch):
        if ch[-1] == full:
            out.append([[v for v in range(n) if (j >> v) & 1 and not (i >> v) & 1] for i, j in itertools.pairwise(ch)])
            return
        if len(ch) <= most:
            for j in ideals:
                if j & ch[-1] == ch[-1] and j != ch[-1]:
                    grow([*ch, j])

    grow([0])
    return out


def test_chain_planners_equal_brute_force():
    rng = random.Random(2)
    for _ in range(80):
        n = rng.randint(1, 7)
        g = random_sp(n, rng) if rng.random() < 0.5 else random_dag(n, rng)
        lg, hw = costs(g, rng), hardware(rng)
        D, B = rng.randint(1, 3), rng.choice([4, 6])
        contiguous = [[list(range(a, b)) for a, b in itertools.pairwise([0, *cut, n])]
                      for k in range(1, D + 1) for cut in itertools.combinations(range(1, n), k - 1)]
        assert agree(planned(plan_pipedream, lg, D, B, hw), best_of(lg, D, B, hw, contiguous, CHAIN))
        chains = ideal_chains(_ideals(lg, 10**6), n, D)
        assert agree(planned(plan_piper, lg, D, B, hw), best_of(lg, D, B, hw, chains, CHAIN))
        exact = [c for c in contiguous if len(c) == D]
        want = math.inf
        for stages in exact:
            for b in micro_batches(B):
                e = evaluate(lg, stages, [1] * D, b, B, hw, CHAIN)
                want = min(want, e.step_s if e.feasible else math.inf)
        if n >= D:
            assert agree(planned(plan_pipedream, lg, D, B, hw, exact=True), want)


def test_graphpipe_never_predicts_worse_than_the_chain():
    from tapml.graphpipe.schedule import build
    from tapml.graphpipe.simulator import StageCosts, simulate

    rng = random.Random(3)
    for _ in range(40):
        g = random_sp(rng.randint(2, 14), rng)
        lg, hw = costs(g, rng), hardware(rng)
        D, B = rng.randint(2, 6), 16
        # the program's choice by the cost model...
        assert planned(plan_graphpipe, lg, D, B, hw, refine=0) <= planned(plan_pipedream, lg, D, B, hw) * (1 + 1e-12)
        # ...and the refined choice by the simulator, against the chain's stages run as a DAG
        try:
            pd = plan_pipedream(lg, D, B, hw)
        except TapmlError:
            continue
        gp = plan_graphpipe(lg, D, B, hw)
        alt = make_plan(lg, pd.stages, pd.replicas, pd.micro_batch, B, hw)
        assert gp.simulated_s <= simulate(build(alt, lg), StageCosts.of(alt, lg), hw).step_s * (1 + 1e-12)


def test_branches_on_their_own_stages_beat_the_chain():
    # Four equal branches joined by a small head: on five devices the DAG (branches side by side, then the
    # head) is 2 stages deep; a chain of one device per stage is 5 deep and relays every branch's output.
    g = nx.DiGraph()
    g.add_nodes_from(range(9))
    for br in range(4):
        g.add_edge(2 * br, 2 * br + 1)
        g.add_edge(2 * br + 1, 8)
    lg = LayerGraph.synthetic(g, {i: (0.1 if i == 8 else 1.0) for i in range(9)}, edge_bytes=1.0)
    hw = Hardware(bandwidth=100.0, latency=0.0)
    gp = plan_graphpipe(lg, 5, 8, hw, replicate=False)
    pd = plan_pipedream(lg, 5, 8, hw, replicate=False)
    assert gp.estimate.depth == 2 and len(gp.stages) == 5
    assert gp.estimate.step_s < 0.8 * pd.estimate.step_s


# ----------------------------------------------------------------------------------------------- SP trees


def test_decompose_known_shapes():
    dlrm = nx.DiGraph([(0, 1), (1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 7), (7, 8), (8, 9)])
    assert str(decompose(dlrm)) == "(((0 → 1) | 2 | 3 | 4 | 5) → 6 → 7 → 8 → 9)"
    complete = nx.DiGraph([(0, 2), (0, 3), (1, 2), (1, 3)])
    assert str(decompose(complete)) == "((0 | 1) → (2 | 3))"
    n_graph = nx.DiGraph([("s", "a"), ("s", "b"), ("a", "c"), ("b", "d"), ("a", "d"), ("c", "t"), ("d", "t")])
    t = decompose(n_graph)
    assert str(t) == "(s → {a,b,c,d} → t)" and not is_series_parallel(n_graph)


def test_decompose_invariants():
    rng = random.Random(4)
    for _ in range(100):
        g = random_sp(rng.randint(1, 20), rng) if rng.random() < 0.5 else random_dag(rng.randint(1, 20), rng)
        t = decompose(g)
        leaves = [v for x in t.walk() if x.kind == LEAF for v in x.nodes]
        assert sorted(leaves) == sorted(g.nodes)
        for x in t.walk():
            if x.kind == SERIES:
                for a, b in itertools.pairwise(x.children):
                    assert all(nx.has_path(g, u, v) for u in a.nodes for v in b.nodes)
            if x.kind == PARALLEL:
                for a, b in itertools.combinations(x.children, 2):
                    assert not any(g.has_edge(u, v) or g.has_edge(v, u) for u in a.nodes for v in b.nodes)
    for _ in range(30):  # series-parallel graphs need no coarsening
        assert is_series_parallel(random_sp(rng.randint(1, 25), rng))


# ----------------------------------------------------------------------------------------------- scale


def branches(n_branch: int, length: int, top: int, rng: random.Random) -> LayerGraph:
    g, n, ends = nx.DiGraph(), 0, []
    for _ in range(n_branch):
        for k in range(length):
            g.add_node(n)
            if k:
                g.add_edge(n - 1, n)
            n += 1
        ends.append(n - 1)
    for k in range(top):
        g.add_node(n)
        g.add_edges_from([(e, n) for e in ends] if k == 0 else [(n - 1, n)])
        n += 1
    return LayerGraph.synthetic(g, {i: rng.uniform(1e-4, 1e-3) for i in range(n)}, act={i: 1e4 for i in range(n)},
                                params={i: 10**6 for i in range(n)}, edge_bytes=1e3)


def test_three_hundred_layers_planned_in_under_two_seconds():
    lg = branches(4, 70, 20, random.Random(5))
    assert len(lg) == 300
    t0 = time.perf_counter()
    p = plan_graphpipe(lg, 8, 64, Hardware(memory=2e9))
    assert time.perf_counter() - t0 < 2.0
    assert p.estimate.feasible and sorted(v for s in p.stages for v in s) == list(range(300))


def test_graphpipe_searches_faster_than_piper():
    lg = branches(4, 4, 3, random.Random(6))
    hw = Hardware(memory=2e9)
    gp = plan_graphpipe(lg, 4, 16, hw)
    pi = plan_piper(lg, 4, 16, hw)
    assert gp.search_s * 5 < pi.search_s
    assert gp.estimate.step_s <= pi.estimate.step_s * 1.5


# ----------------------------------------------------------------------------------------------- API


def test_plan_round_trips_and_bad_input():
    rng = random.Random(7)
    lg = costs(random_sp(6, rng), rng)
    p = plan_graphpipe(lg, 3, 8, Hardware())
    q = Plan.from_json(p.to_json())
    assert (q.stages, q.replicas, q.micro_batch, q.estimate.step_s) == (p.stages, p.replicas, p.micro_batch,
                                                                          p.estimate.step_s)
    assert q.ranks()[-1][-1] == p.devices - 1
    with pytest.raises(TapmlError, match="devices"):
        plan_graphpipe(lg, 0, 8)
    with pytest.raises(TapmlError, match="no plan fits"):
        plan_graphpipe(lg, 2, 8, Hardware(memory=1e-3), chain=False, refine=0)
    with pytest.raises(TapmlError, match="cover every layer"):
        make_plan(lg, [[0]], [1], 1, 8)

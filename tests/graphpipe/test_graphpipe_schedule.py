"""Schedules (1F1B generalized to a DAG, GPipe) and the event simulator: deadlock refusal, closed-form step
times, in-flight micro-batches and memory."""

import random

import networkx as nx
import pytest
from test_graphpipe_planner import costs, random_dag, random_sp

from tapml.graphpipe.cost import CHAIN, DAG, Hardware
from tapml.graphpipe.graph import LayerGraph
from tapml.graphpipe.planner import make_plan, plan_graphpipe, plan_pipedream
from tapml.graphpipe.schedule import GPIPE, ONE_F_ONE_B, Action, Schedule, build, stage_order
from tapml.graphpipe.simulator import Deadlock, ScheduleError, StageCosts, check_deadlock, simulate

F, B = "F", "B"
FREE = Hardware(bandwidth=1e30, latency=0.0)


def chain_graph(n: int, f: float = 1.0) -> LayerGraph:
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from((i, i + 1) for i in range(n - 1))
    return LayerGraph.synthetic(g, dict.fromkeys(range(n), f), act=dict.fromkeys(range(n), 10.0))


def test_stage_order_1f1b_and_gpipe():
    assert [str(a) for a in stage_order(ONE_F_ONE_B, 4, 2)] == ["F0.0", "F0.1", "B0.0", "F0.2", "B0.1", "F0.3",
                                                                 "B0.2", "B0.3"]
    assert [str(a) for a in stage_order(GPIPE, 2, 9)] == ["F0.0", "F0.1", "B0.0", "B0.1"]


def test_chain_1f1b_matches_closed_form():
    # S equal stages, M micro-batches, free communication: (M + S - 1)·(f + b), bubble (S - 1)/(M + S - 1),
    # stage s holds S - s micro-batches under 1F1B and all M under GPipe.
    S, M = 4, 8
    lg = chain_graph(S)
    p = make_plan(lg, [[i] for i in range(S)], [1] * S, 1, M, FREE, topology=CHAIN)
    sim = simulate(build(p, lg, ONE_F_ONE_B), StageCosts.of(p, lg), FREE)
    assert sim.step_s == pytest.approx((M + S - 1) * 3.0)
    assert sim.bubble == pytest.approx((S - 1) / (M + S - 1))
    assert [sim.peak_memory[r] for r in range(S)] == [10.0 * (S - r) for r in range(S)]
    gp = simulate(build(p, lg, GPIPE), StageCosts.of(p, lg), FREE)
    assert all(gp.peak_memory[r] == 10.0 * M for r in range(S))
    assert p.estimate.step_s == pytest.approx(sim.step_s)


def test_dag_warmup_follows_the_longest_path_to_the_sink():
    g = nx.DiGraph([(0, 1), (1, 3), (2, 3), (3, 4)])  # a 2-layer branch and a 1-layer branch into a chain
    lg = LayerGraph.synthetic(g, dict.fromkeys(range(5), 1.0))
    p = make_plan(lg, [[0], [1], [2], [3], [4]], [1] * 5, 1, 8)
    s = build(p, lg)
    assert s.warmup == [4, 3, 3, 2, 1]
    sim = simulate(s, StageCosts.of(p, lg), FREE)
    held = {}
    for e in sim.events:  # micro-batches in flight per stage never exceed its warm-up
        held.setdefault(e.action.stage, [0, 0])
        h = held[e.action.stage]
        h[0] += 1 if e.action.kind == F else -1
        h[1] = max(h[1], h[0])
    assert [held[s_][1] for s_ in range(5)] == s.warmup


def test_generated_schedules_never_deadlock():
    rng = random.Random(11)
    for _ in range(120):
        n = rng.randint(2, 12)
        g = random_sp(n, rng) if rng.random() < 0.6 else random_dag(n, rng)
        lg = costs(g, rng)
        hw = Hardware(bandwidth=rng.uniform(5, 50), latency=1e-3)
        D, batch = rng.randint(2, 8), rng.choice([4, 8, 12])
        for p in (plan_graphpipe(lg, D, batch, hw), plan_pipedream(lg, D, batch, hw)):
            for kind in (ONE_F_ONE_B, GPIPE):
                s = build(p, lg, kind)
                check_deadlock(s)
                sim = simulate(s, StageCosts.of(p, lg), hw)
                assert sim.step_s >= max(sum(e.end - e.start for e in sim.events if e.rank == r)
                                         for r in s.actions) - 1e-12


def two_stages(a0: list, a1: list, m: int = 2) -> Schedule:
    return Schedule(ONE_F_ONE_B, m, [[0], [1]], [(0, 1)], {(0, 1): 1.0}, [2, 1], {0: a0, 1: a1})


def test_simulator_rejects_a_deadlocking_schedule():
    # The consumer takes micro-batch 1 first while the producer sends micro-batch 0 first: each waits on the
    # other forever.
    s = two_stages([Action(F, 0, 0), Action(F, 0, 1), Action(B, 0, 0), Action(B, 0, 1)],
                   [Action(F, 1, 1), Action(B, 1, 1), Action(F, 1, 0), Action(B, 1, 0)])
    with pytest.raises(Deadlock, match="rank 0 waits .* rank 1 waits|rank 1 waits .* rank 0 waits"):
        simulate(s, StageCosts([1.0, 1.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0]))
    # A producer that waits for a gradient before sending the activation its consumer still needs.
    s = two_stages([Action(F, 0, 0), Action(B, 0, 0), Action(F, 0, 1), Action(B, 0, 1)],
                   [Action(F, 1, 0), Action(F, 1, 1), Action(B, 1, 0), Action(B, 1, 1)])
    with pytest.raises(Deadlock):
        check_deadlock(s)
    # The same two ranks in 1F1B order finish.
    check_deadlock(two_stages([Action(F, 0, 0), Action(F, 0, 1), Action(B, 0, 0), Action(B, 0, 1)],
                              [Action(F, 1, 0), Action(B, 1, 0), Action(F, 1, 1), Action(B, 1, 1)]))


def test_simulator_rejects_incomplete_schedules():
    with pytest.raises(ScheduleError, match="no rank runs B1.1"):
        check_deadlock(two_stages([Action(F, 0, 0), Action(F, 0, 1), Action(B, 0, 0), Action(B, 0, 1)],
                                  [Action(F, 1, 0), Action(B, 1, 0), Action(F, 1, 1)]))
    with pytest.raises(ScheduleError, match="before its forward"):
        check_deadlock(two_stages([Action(B, 0, 0), Action(F, 0, 0), Action(F, 0, 1), Action(B, 0, 1)],
                                  [Action(F, 1, 0), Action(B, 1, 0), Action(F, 1, 1), Action(B, 1, 1)]))


def test_replicas_take_micro_batches_round_robin():
    lg = chain_graph(2)
    p = make_plan(lg, [[0], [1]], [2, 1], 1, 6)
    s = build(p, lg)
    assert s.ranks == [[0, 1], [2]]
    assert [a.mb for a in s.actions[0] if a.kind == F] == [0, 2, 4]
    assert [a.mb for a in s.actions[1] if a.kind == F] == [1, 3, 5]
    sim = simulate(s, StageCosts.of(p, lg), FREE)
    one = simulate(build(make_plan(lg, [[0], [1]], [1, 1], 1, 6), lg), StageCosts.of(p, lg), FREE)
    assert sim.step_s <= one.step_s
    assert Schedule.from_json(s.to_json()).actions == s.actions
    assert p.topology == DAG

"""The cost model every planner shares: a stage's time per micro-batch and memory per device, and a whole plan's
predicted step time `(M + P − 1)·τ` (M micro-batches, P stages on the longest path, τ the slowest stage).

`evaluate` prices any stage partition, so brute force and the dynamic programs agree on one definition. It must
not search: the planners do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx

from tapml.graphpipe.graph import LayerGraph

DAG, CHAIN = "dag", "chain"


@dataclass(frozen=True)
class Hardware:
    """What the planners assume about the devices. `state_factor`: bytes of training state per parameter byte
    (weights, gradients and two Adam moments: 4)."""

    memory: float = math.inf  # bytes per device
    bandwidth: float = 10e9  # bytes/s between two devices
    latency: float = 20e-6  # seconds per message
    state_factor: float = 4.0


def stage_time(compute: float, comm_bytes: float, comm_msgs: int, param_bytes: float, replicas: int,
               n_micro: int, hw: Hardware) -> float:
    """Seconds a stage needs per micro-batch: forward + backward + its sends and receives (activations forward,
    gradients back), spread over `replicas` that take micro-batches round-robin, plus their gradient all-reduce
    amortized over the step."""
    t = (compute + 2 * (comm_bytes / hw.bandwidth + comm_msgs * hw.latency)) / replicas
    if replicas > 1:
        t += (2 * (replicas - 1) / replicas * param_bytes / hw.bandwidth + 2 * (replicas - 1) * hw.latency) / n_micro
    return t


def stage_memory(param_bytes: float, act_bytes: float, inflight: int, replicas: int, hw: Hardware) -> float:
    """Peak bytes on one device of a stage: its training state plus the activations of the micro-batches it
    holds between forward and backward (round-robin replicas share them)."""
    return param_bytes * hw.state_factor + math.ceil(inflight / replicas) * act_bytes


@dataclass
class Estimate:
    step_s: float
    tau: float
    depth: int
    inflight: list[int]
    memory: list[float]
    feasible: bool
    edges: list[tuple[int, int]] = field(default_factory=list)  # stage DAG


def stage_graph(lg: LayerGraph, stages: Sequence[Sequence[int]]) -> nx.DiGraph:
    owner = {v: s for s, layers in enumerate(stages) for v in layers}
    g = nx.DiGraph()
    g.add_nodes_from(range(len(stages)))
    g.add_edges_from({(owner[u], owner[v]) for u, v in lg.edges if owner[u] != owner[v]})
    return g


def depth_to_sink(g: nx.DiGraph) -> dict[int, int]:
    """Stages on the longest path from each stage to a sink, itself included."""
    h: dict[int, int] = {}
    for s in reversed(list(nx.topological_sort(g))):
        h[s] = 1 + max((h[t] for t in g.successors(s)), default=0)
    return h


def evaluate(lg: LayerGraph, stages: Sequence[Sequence[int]], replicas: Sequence[int], micro_batch: int,
             batch: int, hw: Hardware, topology: str = DAG) -> Estimate:
    """The predicted step of a plan. DAG: each stage sends each output straight to its consumers. CHAIN: stages
    in the given order, each talks only to its neighbours, so values that skip stages are relayed (received,
    held, sent on) by every stage between."""
    m = batch // micro_batch
    b = micro_batch
    owner = {v: s for s, layers in enumerate(stages) for v in layers}
    if topology == DAG:
        g = stage_graph(lg, stages)
        if not nx.is_directed_acyclic_graph(g):
            return Estimate(math.inf, math.inf, 0, [], [], False)
        h = depth_to_sink(g)
        depth = max(h.values())
        edges = sorted(g.edges)
    else:
        if any(owner[u] > owner[v] for u, v in lg.edges):
            return Estimate(math.inf, math.inf, 0, [], [], False)
        h = {s: len(stages) - s for s in range(len(stages))}
        depth = len(stages)
        edges = [(s, s + 1) for s in range(len(stages) - 1)]
    taus, mems, inflight = [], [], []
    for s, layers in enumerate(stages):
        compute = sum(lg.fwd(i, b) + lg.bwd(i, b) for i in layers)
        act = sum(lg.act(i, b) for i in layers)
        params = sum(lg.layers[i].params for i in layers)
        if topology == DAG:
            cross = [(u, v) for u, v in lg.edges if (owner[u] == s) != (owner[v] == s)]
        else:  # everything live at its two boundaries passes through it; what skips it is held too
            cross = [(u, v) for u, v in lg.edges if owner[u] < s <= owner[v]]  # received
            cross += [(u, v) for u, v in lg.edges if owner[u] <= s < owner[v]]  # sent
            act += sum(lg.edge_bytes(u, v, b) for u, v in lg.edges if owner[u] < s < owner[v])
        comm = sum(lg.edge_bytes(u, v, b) for u, v in cross)
        taus.append(stage_time(compute, comm, len(cross), params, replicas[s], m, hw))
        w = min(m, h[s])
        inflight.append(w)
        mems.append(stage_memory(params, act, w, replicas[s], hw))
    tau = max(taus)
    feasible = all(x <= hw.memory for x in mems) and sum(replicas) >= 1 and all(r <= m for r in replicas)
    return Estimate((m + depth - 1) * tau if feasible else math.inf, tau, depth, inflight, mems, feasible, edges)

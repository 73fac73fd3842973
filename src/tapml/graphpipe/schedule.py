"""Micro-batch schedules as per-rank action lists: 1F1B generalized to a DAG of stages (each stage warms up with
as many forwards as there are stages on its longest path to the sink) and GPipe (all forwards, then all
backwards); and the exact order of receives, compute and sends each action implies.

The runtime executes `program(rank)` op for op, the simulator checks and times the same ops. Nothing here runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tapml.errors import TapmlError
from tapml.graphpipe.cost import CHAIN, depth_to_sink, stage_graph
from tapml.graphpipe.graph import LayerGraph

F, B = "F", "B"
ONE_F_ONE_B, GPIPE = "1f1b", "gpipe"
FWD, BWD = "fwd", "bwd"  # the two channels: activations flow on one, gradients on the other


@dataclass(frozen=True)
class Action:
    kind: str  # F or B
    stage: int
    mb: int

    def __str__(self) -> str:
        return f"{self.kind}{self.stage}.{self.mb}"


@dataclass(frozen=True)
class Op:
    """One step of a rank's program: `recv`/`send` of the tensors on stage edge `edge` for micro-batch `mb` on
    `channel`, with `peer` the rank at the other end; or `compute` of `action`."""

    what: str  # recv, compute, send
    action: Action
    channel: str = ""
    edge: tuple[int, int] = (-1, -1)
    peer: int = -1

    def key(self) -> tuple[str, tuple[int, int], int]:
        """What a send and its receive share."""
        return (self.channel, self.edge, self.action.mb)


@dataclass
class Schedule:
    kind: str
    n_micro: int
    ranks: list[list[int]]  # replicas of each stage
    edges: list[tuple[int, int]]  # the stage graph, sorted
    edge_bytes: dict[tuple[int, int], float] = field(default_factory=dict)  # per micro-batch
    warmup: list[int] = field(default_factory=list)
    actions: dict[int, list[Action]] = field(default_factory=dict)

    @property
    def n_stages(self) -> int:
        return len(self.ranks)

    @property
    def world(self) -> int:
        return sum(len(r) for r in self.ranks)

    def rank(self, stage: int, mb: int) -> int:
        """Replicas take micro-batches round-robin."""
        rs = self.ranks[stage]
        return rs[mb % len(rs)]

    def stage_of(self, rank: int) -> int | None:
        return next((s for s, rs in enumerate(self.ranks) if rank in rs), None)

    def in_edges(self, s: int) -> list[tuple[int, int]]:
        return [e for e in self.edges if e[1] == s]

    def out_edges(self, s: int) -> list[tuple[int, int]]:
        return [e for e in self.edges if e[0] == s]

    def program(self, rank: int) -> list[Op]:
        """The rank's ops in the order it issues them. A forward receives each input edge (in edge order),
        computes, sends each output edge; a backward receives each output edge's gradient, computes, sends the
        input gradients. Sends never wait on the host; receives do."""
        ops: list[Op] = []
        for a in self.actions.get(rank, []):
            ins, outs = self.in_edges(a.stage), self.out_edges(a.stage)
            if a.kind == F:
                ops += [Op("recv", a, FWD, e, self.rank(e[0], a.mb)) for e in ins]
                ops.append(Op("compute", a))
                ops += [Op("send", a, FWD, e, self.rank(e[1], a.mb)) for e in outs]
            else:
                ops += [Op("recv", a, BWD, e, self.rank(e[1], a.mb)) for e in outs]
                ops.append(Op("compute", a))
                ops += [Op("send", a, BWD, e, self.rank(e[0], a.mb)) for e in ins]
        return ops

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_micro": self.n_micro, "ranks": self.ranks,
                "edges": [list(e) for e in self.edges], "warmup": self.warmup,
                "edge_bytes": [[s, t, w] for (s, t), w in sorted(self.edge_bytes.items())],
                "actions": {str(r): [[a.kind, a.stage, a.mb] for a in acts] for r, acts in self.actions.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Schedule:
        return cls(d["kind"], d["n_micro"], d["ranks"], [tuple(e) for e in d["edges"]],
                   {(s, t): w for s, t, w in d["edge_bytes"]}, d["warmup"],
                   {int(r): [Action(*a) for a in acts] for r, acts in d["actions"].items()})


def stage_order(kind: str, n_micro: int, warmup: int) -> list[Action]:
    """One stage's actions (stage index 0 here). 1F1B: `warmup` forwards, then a backward and a forward in
    turn, then the remaining backwards; at most `warmup` micro-batches are in flight. GPipe: every forward,
    then every backward."""
    m = n_micro
    if kind == GPIPE:
        return [Action(F, 0, i) for i in range(m)] + [Action(B, 0, i) for i in range(m)]
    w = max(1, min(m, warmup))
    seq = [Action(F, 0, i) for i in range(w)]
    for i in range(m - w):
        seq += [Action(B, 0, i), Action(F, 0, w + i)]
    return seq + [Action(B, 0, i) for i in range(m - w, m)]


def build(plan: Any, lg: LayerGraph, kind: str = ONE_F_ONE_B) -> Schedule:
    """The schedule of a Plan: stage edges (a chain plan talks only to its neighbours, carrying everything live
    at each boundary), warm-up per stage from its longest path to the sink, per-rank action lists."""
    if kind not in (ONE_F_ONE_B, GPIPE):
        raise TapmlError(f"unknown schedule {kind!r}; choose {ONE_F_ONE_B} or {GPIPE}")
    b, m = plan.micro_batch, plan.n_micro
    owner = {v: s for s, layers in enumerate(plan.stages) for v in layers}
    ebytes: dict[tuple[int, int], float] = {}
    if plan.topology == CHAIN:
        edges = [(s, s + 1) for s in range(len(plan.stages) - 1)]
        for (u, v) in lg.edges:
            for s in range(owner[u], owner[v]):
                ebytes[s, s + 1] = ebytes.get((s, s + 1), 0.0) + lg.edge_bytes(u, v, b)
        h = {s: len(plan.stages) - s for s in range(len(plan.stages))}
    else:
        g = stage_graph(lg, plan.stages)
        edges = sorted(g.edges)
        for (u, v) in lg.edges:
            if owner[u] != owner[v]:
                ebytes[owner[u], owner[v]] = ebytes.get((owner[u], owner[v]), 0.0) + lg.edge_bytes(u, v, b)
        h = depth_to_sink(g)
    sched = Schedule(kind, m, plan.ranks(), edges, ebytes, [min(m, h[s]) for s in range(len(plan.stages))])
    for s, rs in enumerate(sched.ranks):
        seq = [Action(a.kind, s, a.mb) for a in stage_order(kind, m, sched.warmup[s])]
        for j, r in enumerate(rs):
            sched.actions[r] = [a for a in seq if a.mb % len(rs) == j]
    return sched

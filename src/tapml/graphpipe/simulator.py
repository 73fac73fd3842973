"""An event simulator of a Schedule: refuses a schedule whose ranks could wait on each other forever, then
predicts the step time, the bubble fraction and the peak memory of every device, with a per-action timeline.

Deadlock model (NCCL's, the strictest the runtime meets): each rank issues its program in order; a receive
blocks the rank; the transfers between two ranks on one channel complete in the order they were issued
(unbatched P2P runs on a communicator and stream per pair of ranks, one per channel here), and a send completes
only together with its receive. It must not run tensors.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from tapml.errors import TapmlError
from tapml.graphpipe.cost import CHAIN, Hardware
from tapml.graphpipe.graph import LayerGraph
from tapml.graphpipe.schedule import Action, B, F, Op, Schedule


class ScheduleError(TapmlError):
    """A schedule that does not run every forward and backward exactly once, in order, on the right rank."""


class Deadlock(TapmlError):
    """A schedule whose ranks can end up waiting on each other in a cycle."""


def validate(s: Schedule) -> None:
    seen: dict[tuple[str, int, int], int] = {}
    for r, acts in s.actions.items():
        done_f: set[tuple[int, int]] = set()
        for a in acts:
            if not 0 <= a.stage < s.n_stages or not 0 <= a.mb < s.n_micro:
                raise ScheduleError(f"rank {r}: {a} names no stage or micro-batch of this schedule")
            if s.rank(a.stage, a.mb) != r:
                raise ScheduleError(f"rank {r}: {a} belongs on rank {s.rank(a.stage, a.mb)}")
            if (a.kind, a.stage, a.mb) in seen:
                raise ScheduleError(f"rank {r}: {a} appears twice")
            seen[a.kind, a.stage, a.mb] = r
            if a.kind == F:
                done_f.add((a.stage, a.mb))
            elif (a.stage, a.mb) not in done_f:
                raise ScheduleError(f"rank {r}: {a} comes before its forward")
    for st in range(s.n_stages):
        for mb in range(s.n_micro):
            for k in (F, B):
                if (k, st, mb) not in seen:
                    raise ScheduleError(f"no rank runs {Action(k, st, mb)}")


def check_deadlock(s: Schedule) -> None:
    """Raise Deadlock naming a cycle of waits when the ranks' programs cannot all finish."""
    validate(s)
    ranks = sorted(s.actions)
    progs = {r: s.program(r) for r in ranks}
    pc = dict.fromkeys(ranks, 0)
    queues: dict[tuple[int, int, str], deque[Op]] = {}  # (rank, peer, channel)
    blocked: dict[int, Op | None] = dict.fromkeys(ranks, None)
    progress = True
    while progress:
        progress = False
        for r in ranks:
            while blocked[r] is None and pc[r] < len(progs[r]):
                op = progs[r][pc[r]]
                pc[r] += 1
                progress = True
                if op.what != "compute":
                    queues.setdefault((r, op.peer, op.channel), deque()).append(op)
                if op.what == "recv":
                    blocked[r] = op
        for (r, _p, ch), q in list(queues.items()):
            if not q or q[0].what != "send":
                continue
            op = q[0]
            peer = queues.get((op.peer, r, ch))
            if peer and peer[0].what == "recv" and peer[0].key() == op.key() and peer[0].peer == r:
                q.popleft()
                got = peer.popleft()
                if blocked[op.peer] is got:
                    blocked[op.peer] = None
                progress = True
    if all(pc[r] == len(progs[r]) for r in ranks) and not any(queues.values()):
        return
    raise Deadlock(_explain(s, queues, blocked, pc, progs))


def _what(op: Op) -> str:
    kind = "activation" if op.channel == "fwd" else "gradient"
    return f"{op.what} of the {kind} of stage edge {op.edge[0]}→{op.edge[1]}, micro-batch {op.action.mb}"


def _explain(s: Schedule, queues, blocked, pc, progs) -> str:
    g = nx.DiGraph()
    for (r, _p, _ch), q in queues.items():
        if q:
            g.add_edge(r, q[0].peer, why=f"rank {r} waits at its {_what(q[0])} (rank {q[0].peer})")
    for r, op in blocked.items():
        if op is not None and not g.has_node(r):
            g.add_edge(r, op.peer, why=f"rank {r} waits at its {_what(op)} (rank {op.peer})")
    try:
        cyc = nx.find_cycle(g)
        return "the schedule deadlocks: " + "; ".join(g.edges[u, v]["why"] for u, v in cyc)
    except nx.NetworkXNoCycle:
        stuck = [d["why"] for _, _, d in g.edges(data=True)]
        return "the schedule cannot finish: " + ("; ".join(stuck) or "messages no one receives")


# ----------------------------------------------------------------------------------------------- timing


@dataclass
class StageCosts:
    """Per stage, per micro-batch: forward and backward seconds, activation bytes held between them; parameter
    bytes."""

    fwd: list[float]
    bwd: list[float]
    act: list[float]
    params: list[float]

    @classmethod
    def of(cls, plan: Any, lg: LayerGraph) -> StageCosts:
        b = plan.micro_batch
        owner = {v: s for s, layers in enumerate(plan.stages) for v in layers}
        act = [sum(lg.act(i, b) for i in layers) for layers in plan.stages]
        if plan.topology == CHAIN:  # what skips a stage is held by it too
            for (u, v) in lg.edges:
                for s in range(owner[u] + 1, owner[v]):
                    act[s] += lg.edge_bytes(u, v, b)
        return cls([sum(lg.fwd(i, b) for i in layers) for layers in plan.stages],
                   [sum(lg.bwd(i, b) for i in layers) for layers in plan.stages], act,
                   [float(sum(lg.layers[i].params for i in layers)) for layers in plan.stages])


@dataclass
class Event:
    rank: int
    action: Action
    start: float
    end: float


@dataclass
class Simulation:
    step_s: float
    bubble: float  # idle share of the devices' time over the step
    peak_memory: dict[int, float]  # bytes per rank
    events: list[Event] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"step_s": self.step_s, "bubble": self.bubble,
                "peak_memory": {str(k): v for k, v in self.peak_memory.items()},
                "events": [[e.rank, e.action.kind, e.action.stage, e.action.mb, e.start, e.end] for e in self.events]}


def transfer(nbytes: float, hw: Hardware) -> float:
    return nbytes / hw.bandwidth + hw.latency


def simulate(s: Schedule, costs: StageCosts, hw: Hardware | None = None,
             durations: dict[tuple[str, int, int], float] | None = None, check: bool = True) -> Simulation:
    """Time the schedule: a rank runs its actions in order, each as soon as it is free and its inputs have
    arrived (a transfer takes bytes/bandwidth + latency, overlapping compute); replicated stages end with a
    gradient all-reduce. `durations` (measured, by (kind, stage, mb)) replace the costs where given.
    `check=False` skips the deadlock check (for schedules `build` made, which tests cover)."""
    hw = hw or Hardware()
    if check:
        check_deadlock(s)
    ranks = sorted(s.actions)
    ready: dict[tuple[str, tuple[int, int], int], float] = {}  # (channel, edge, mb) -> arrival time
    free = dict.fromkeys(ranks, 0.0)
    pos = dict.fromkeys(ranks, 0)
    events: list[Event] = []
    total = sum(len(a) for a in s.actions.values())
    while len(events) < total:
        moved = False
        for r in ranks:
            while pos[r] < len(s.actions[r]):
                a = s.actions[r][pos[r]]
                needs = ([("fwd", e, a.mb) for e in s.in_edges(a.stage)] if a.kind == F
                         else [("bwd", e, a.mb) for e in s.out_edges(a.stage)])
                if any(k not in ready for k in needs):
                    break
                start = max([free[r], *(ready[k] for k in needs)])
                dur = (durations or {}).get((a.kind, a.stage, a.mb))
                if dur is None:
                    dur = costs.fwd[a.stage] if a.kind == F else costs.bwd[a.stage]
                end = start + dur
                events.append(Event(r, a, start, end))
                free[r] = end
                pos[r] += 1
                moved = True
                out = ([("fwd", e, a.mb) for e in s.out_edges(a.stage)] if a.kind == F
                       else [("bwd", e, a.mb) for e in s.in_edges(a.stage)])
                for k in out:
                    ready[k] = end + transfer(s.edge_bytes.get(k[1], 0.0), hw)
        if not moved:
            raise AssertionError("a deadlock-free schedule stopped moving")
    step = 0.0
    for st, rs in enumerate(s.ranks):
        d = len(rs)
        ar = 0.0 if d == 1 else 2 * (d - 1) / d * costs.params[st] / hw.bandwidth + 2 * (d - 1) * hw.latency
        step = max(step, max(free[r] for r in rs) + ar)
    busy = sum(e.end - e.start for e in events)
    peak = {}
    for r in ranks:
        held, top = 0.0, 0.0
        for e in sorted((e for e in events if e.rank == r), key=lambda e: e.start):
            held += costs.act[e.action.stage] if e.action.kind == F else -costs.act[e.action.stage]
            top = max(top, held)
        st = s.stage_of(r)
        peak[r] = costs.params[st] * hw.state_factor + top
    bubble = 1 - busy / (len(ranks) * step) if step > 0 else 0.0
    return Simulation(step, bubble, peak, sorted(events, key=lambda e: (e.start, e.rank)))


def serial_time(s: Schedule, costs: StageCosts) -> float:
    """Every action of the schedule one after another on one device (the time-sliced run)."""
    return sum(costs.fwd[a.stage] if a.kind == F else costs.bwd[a.stage] for acts in s.actions.values() for a in acts)


def finite(x: float) -> bool:
    return not math.isinf(x) and not math.isnan(x)

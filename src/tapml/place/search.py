"""The placement search: Collage's exact op-level dynamic program over covered-node bitsets (each step covers the
first uncovered op with a candidate that is disjoint and ready; cost = measured time + a per-kernel launch cost),
then its graph-level evolutionary refinement (DEAP's operators and settings; one bit per partition: keep it, or hand it to the
graph-level backend, runs of handed partitions merged; every individual measured whole) under a time budget.

It must not compile or measure by itself: costs and the evaluation of an individual are passed in.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LAUNCH = 1e-5  # seconds charged per kernel (partition), as Collage's 0.01 ms


@dataclass(frozen=True)
class Option:
    """One candidate as the DP sees it: a node set (bits over op indices), its cost, an opaque payload."""

    bits: int
    cost: float
    payload: object = None


def _lowest(bits: int) -> int:
    return (bits & -bits).bit_length() - 1


def _iter_bits(bits: int):
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


def execution_order(n: int, preds: Sequence[int], options: Sequence[Option]) -> tuple[list[int], set[int]]:
    """A topological order of the ops in which every candidate's outside producers come before all of its ops,
    so that the DP's "ready" rule loses no executable placement. Candidates whose constraint would close a
    cycle keep the order they get. Returns (order, the node sets of those conflicting candidates)."""
    succ = [set() for _ in range(n)]
    for i in range(n):
        for j in _iter_bits(preds[i]):
            succ[j].add(i)

    def reach_from(starts: int) -> int:
        seen, stack = 0, list(_iter_bits(starts))
        while stack:
            i = stack.pop()
            for j in succ[i]:
                if not (seen >> j) & 1:
                    seen |= 1 << j
                    stack.append(j)
        return seen | starts

    conflicts: set[int] = set()
    for opt in sorted({o.bits for o in options}, key=lambda b: -b.bit_count()):
        ext = 0
        for i in _iter_bits(opt):
            ext |= preds[i]
        ext &= ~opt
        if not ext:
            continue
        if reach_from(opt) & ext:
            conflicts.add(opt)
            continue
        for u in _iter_bits(ext):
            succ[u].update(_iter_bits(opt))
    indeg = [0] * n
    for i in range(n):
        for j in succ[i]:
            indeg[j] += 1
    ready = [i for i in range(n) if indeg[i] == 0]
    order: list[int] = []
    import heapq

    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(ready, j)
    return order, conflicts


def best_cover(n: int, preds: Sequence[int], options: Sequence[Option], launch: float = LAUNCH,
               max_states: int = 300_000) -> tuple[float, list[Option]]:
    """The cheapest exact cover of ops 0..n-1 by disjoint options that can run one after another.

    State: the bitset of covered ops (always closed under predecessors). A move covers it with an option that
    overlaps nothing covered and whose outside producers are all covered. When an execution order exists in which
    every option's outside producers precede all of its ops (`execution_order` finds one), the first uncovered op
    in that order must be covered next, which loses no cover and keeps the moves few (Collage's rule); otherwise
    every ready option is a move from any frontier op, still exact, with more states: past `max_states` of those
    the conflicting options are dropped and the ordered DP runs on the rest (exact over them; single ops never
    conflict, so a cover still exists). Returns (cost, options in execution order); inf when no cover exists."""
    if n == 0:
        return 0.0, []
    order, conflicts = execution_order(n, preds, options)
    if conflicts:
        got = _solve(n, preds, options, launch, order, True, max_states)
        if got is not None:
            return got
        options = [o for o in options if o.bits not in conflicts]
    got = _solve(n, preds, options, launch, order, False, None)
    assert got is not None
    return got


def _solve(n: int, preds: Sequence[int], options: Sequence[Option], launch: float, order: list[int],
           general: bool, max_states: int | None) -> tuple[float, list[Option]] | None:
    """The DP of `best_cover` in one mode; None when `max_states` is exceeded."""
    pos = {op: k for k, op in enumerate(order)}

    def remap(bits: int) -> int:
        return sum(1 << pos[i] for i in _iter_bits(bits))

    rpreds = [0] * n
    for i in range(n):
        rpreds[pos[i]] = remap(preds[i])
    by_op: dict[int, list[tuple[int, int, float, Option]]] = {}
    for o in options:
        b = remap(o.bits)
        ext = 0
        for i in _iter_bits(b):
            ext |= rpreds[i]
        ext &= ~b
        move = (b, ext, o.cost + launch, o)
        for i in (_iter_bits(b) if general else (_lowest(b),)):
            by_op.setdefault(i, []).append(move)
    full = (1 << n) - 1

    def moves(state: int) -> list[tuple[int, int, float, Option]]:
        free = ~state & full
        if not general:
            firsts: Sequence[int] = (_lowest(free),)
        else:  # every uncovered op whose producers are all covered
            firsts = [i for i in _iter_bits(free) if not rpreds[i] & free]
        seen: set[int] = set()  # an option reached from two frontier ops is one move
        out = []
        for v in firsts:
            for m in by_op.get(v, ()):
                if id(m) not in seen and not (m[0] & state) and not (m[1] & free):
                    seen.add(id(m))
                    out.append(m)
        return out

    best: dict[int, tuple[float, tuple[int, int, float, Option] | None]] = {full: (0.0, None)}
    # iterative post-order DFS over states (a recursion would be as deep as the graph)
    stack: list[tuple[int, int, list]] = [(0, 0, moves(0))]
    inf = float("inf")
    while stack:
        state, k, ms = stack[-1]
        if k < len(ms):
            stack[-1] = (state, k + 1, ms)
            nxt = state | ms[k][0]
            if nxt not in best:
                if max_states is not None and len(best) > max_states:
                    return None
                best[nxt] = (inf, None)  # placeholder: states only grow, so no cycle can reach it unfinished
                stack.append((nxt, 0, moves(nxt)))
            continue
        stack.pop()
        choice: tuple[float, tuple[int, int, float, Option] | None] = (inf, None)
        for m in ms:
            c = m[2] + best[state | m[0]][0]
            if c < choice[0]:
                choice = (c, m)
        best[state] = choice
    cost = best[0][0]
    if cost == inf:
        return inf, []
    plan, state = [], 0
    while state != full:
        m = best[state][1]
        assert m is not None
        plan.append(m[3])
        state |= m[0]
    return cost, plan


# --- graph-level evolutionary refinement ------------------------------------------------------------------------

@dataclass
class Evolution:
    best: tuple[int, ...]
    fitness: float
    evaluated: int
    generations: int
    seeds: dict[str, float]
    seconds: float


def refine(n_genes: int, evaluate: Callable[[tuple[int, ...]], float], budget_s: float, seed: int = 0,
           population: int = 50, cxpb: float = 0.5, mutpb: float = 0.2, indpb: float = 0.05,
           tournament: int = 5, max_generations: int = 1000, cache_size: int = 1000) -> Evolution:
    """Collage's genetic algorithm over `n_genes` bits, on DEAP's operators (cxTwoPoint with `cxpb`, mutFlipBit
    with `mutpb` and `indpb`, selTournament of `tournament`; population 50 seeded with all-0 and all-1, DEAP's
    eaSimple loop); every individual's fitness is `evaluate(bits)` (seconds, lower is better; inf for an invalid
    one), memoized (LRU of `cache_size`). Stops at `budget_s` seconds after the seeds are evaluated. Returns the
    best individual evaluated, so never worse than its seeds. DEAP draws from the `random` module: its state is
    seeded here and the caller's restored afterwards, and no `creator` class is registered globally."""
    from collections import OrderedDict

    from deap import base, tools

    class Fit(base.Fitness):
        weights = (-1.0,)  # minimize seconds

    class Individual(list):
        def __init__(self, genes):
            super().__init__(genes)
            self.fitness = Fit()

    start = time.perf_counter()
    memo: OrderedDict[tuple[int, ...], float] = OrderedDict()
    best: list = [None, float("inf")]
    evaluated = [0]

    def fit(bits: tuple[int, ...]) -> float:
        if bits in memo:
            memo.move_to_end(bits)
            return memo[bits]
        f = float(evaluate(bits))
        evaluated[0] += 1
        memo[bits] = f
        if len(memo) > cache_size:
            memo.popitem(last=False)
        if f < best[1] or best[0] is None:
            best[0], best[1] = bits, f
        return f

    def assess(pop: list) -> list:
        for ind in pop:
            over = time.perf_counter() - start >= budget_s
            ind.fitness.values = (memo.get(tuple(ind), float("inf")) if over else fit(tuple(ind)),)
        return pop

    zeros, ones = (0,) * n_genes, (1,) * n_genes
    seeds = {"all-0": fit(zeros), "all-1": fit(ones)}
    generations = 0
    caller_state = random.getstate()
    random.seed(seed)
    try:
        if n_genes >= 2:
            pop = [Individual(zeros), Individual(ones)] + [
                Individual(random.randint(0, 1) for _ in range(n_genes)) for _ in range(max(0, population - 2))]
            pop = assess(pop)
            while generations < max_generations and time.perf_counter() - start < budget_s:
                generations += 1
                offspring = [Individual(ind) for ind in tools.selTournament(pop, len(pop), tournament)]
                for a, b in zip(offspring[::2], offspring[1::2]):
                    if random.random() < cxpb:
                        tools.cxTwoPoint(a, b)
                for ind in offspring:
                    if random.random() < mutpb:
                        tools.mutFlipBit(ind, indpb)
                pop = assess(offspring)
    finally:
        random.setstate(caller_state)
    return Evolution(tuple(int(g) for g in best[0]), best[1], evaluated[0], generations, seeds,
                     time.perf_counter() - start)


def merge_runs(kinds: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of consecutive partitions whose gene is 1 (consecutive in execution order, so
    their union is convex and the order stays valid)."""
    runs, k = [], 0
    while k < len(kinds):
        if kinds[k]:
            e = k
            while e < len(kinds) and kinds[e]:
                e += 1
            runs.append((k, e))
            k = e
        else:
            k += 1
    return runs

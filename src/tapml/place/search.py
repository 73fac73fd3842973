"""The placement search: Collage's exact op-level dynamic program over covered-node bitsets (each step covers the
first uncovered op with a candidate that is disjoint and ready; cost = measured time + a per-kernel launch cost),
then its graph-level evolutionary refinement with DEAP (one bit per partition: keep it, or hand it to the
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


def execution_order(n: int, preds: Sequence[int], options: Sequence[Option]) -> tuple[list[int], int]:
    """A topological order of the ops in which every candidate's outside producers come before all of its ops,
    so that the DP's "ready" rule loses no executable placement. Candidates whose constraint would close a
    cycle keep the order they get (counted and returned). Returns (order, conflicts)."""
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

    conflicts = 0
    for opt in sorted(set(o.bits for o in options), key=lambda b: -b.bit_count()):
        ext = 0
        for i in _iter_bits(opt):
            ext |= preds[i]
        ext &= ~opt
        if not ext:
            continue
        if reach_from(opt) & ext:
            conflicts += 1
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


def best_cover(n: int, preds: Sequence[int], options: Sequence[Option], launch: float = LAUNCH
               ) -> tuple[float, list[Option]]:
    """The cheapest exact cover of ops 0..n-1 by disjoint options, executable in the chosen order.

    State: the bitset of covered ops (in execution order). From a state, the first uncovered op must be covered
    next, by an option that contains it, overlaps nothing covered and whose outside producers are all covered.
    Returns (cost, options in execution order); cost is inf when no cover exists."""
    if n == 0:
        return 0.0, []
    order, _ = execution_order(n, preds, options)
    pos = {op: k for k, op in enumerate(order)}

    def remap(bits: int) -> int:
        return sum(1 << pos[i] for i in _iter_bits(bits))

    rpreds = [0] * n
    for i in range(n):
        rpreds[pos[i]] = remap(preds[i])
    by_first: dict[int, list[tuple[int, int, float, Option]]] = {}
    for o in options:
        b = remap(o.bits)
        ext = 0
        for i in _iter_bits(b):
            ext |= rpreds[i]
        ext &= ~b
        by_first.setdefault(_lowest(b), []).append((b, ext, o.cost + launch, o))
    full = (1 << n) - 1
    best: dict[int, tuple[float, tuple[int, int, float, Option] | None]] = {full: (0.0, None)}
    # iterative post-order DFS over states (a recursion would be as deep as the graph)
    stack: list[tuple[int, int]] = [(0, 0)]
    inf = float("inf")
    while stack:
        state, k = stack[-1]
        if state in best:
            stack.pop()
            continue
        v = _lowest(~state & full)
        moves = [m for m in by_first.get(v, ()) if not (m[0] & state) and (m[1] & ~state) == 0]
        if k < len(moves):
            stack[-1] = (state, k + 1)
            nxt = state | moves[k][0]
            if nxt not in best:
                stack.append((nxt, 0))
            continue
        stack.pop()
        choice: tuple[float, tuple[int, int, float, Option] | None] = (inf, None)
        for m in moves:
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
    """Collage's genetic algorithm over `n_genes` bits with DEAP (two-point crossover, bit-flip mutation,
    tournament selection), seeded with all-0 and all-1; every individual's fitness is `evaluate(bits)` (seconds,
    lower is better; inf for an invalid one), memoized (LRU of `cache_size`). Stops at `budget_s` seconds after the
    seeds are evaluated. Returns the best individual evaluated, so never worse than its seeds."""
    from collections import OrderedDict

    try:
        from deap import base, creator, tools
    except ImportError:
        from tapml.errors import TapmlError

        raise TapmlError("the evolutionary search needs DEAP: pip install deap (or pass budget 0 to skip it)"
                         ) from None
    start = time.perf_counter()
    rng = random.Random(seed)
    memo: OrderedDict[tuple[int, ...], float] = OrderedDict()
    best: list = [None, float("inf")]

    def fit(bits: tuple[int, ...]) -> float:
        if bits in memo:
            memo.move_to_end(bits)
            return memo[bits]
        f = float(evaluate(bits))
        memo[bits] = f
        if len(memo) > cache_size:
            memo.popitem(last=False)
        if f < best[1]:
            best[0], best[1] = bits, f
        return f

    zeros, ones = (0,) * n_genes, (1,) * n_genes
    seeds = {"all-0": fit(zeros), "all-1": fit(ones)}
    evaluated = 2
    if not hasattr(creator, "TapmlPlaceFitness"):
        creator.create("TapmlPlaceFitness", base.Fitness, weights=(-1.0,))
        creator.create("TapmlPlaceIndividual", list, fitness=creator.TapmlPlaceFitness)
    Ind = creator.TapmlPlaceIndividual
    pop = [Ind(zeros), Ind(ones)] + [Ind(rng.randint(0, 1) for _ in range(n_genes))
                                     for _ in range(max(0, population - 2))]
    generations = 0
    if n_genes >= 2:
        saved = random.getstate()
        random.seed(seed)  # DEAP's operators draw from the random module
        try:
            for ind in pop:
                ind.fitness.values = (fit(tuple(ind)),)
            evaluated = len({tuple(i) for i in pop})
            while generations < max_generations and time.perf_counter() - start < budget_s:
                generations += 1
                offspring = [Ind(i) for i in tools.selTournament(pop, len(pop), tournsize=tournament)]
                for a, b in zip(offspring[::2], offspring[1::2]):
                    if random.random() < cxpb:
                        tools.cxTwoPoint(a, b)
                for ind in offspring:
                    if random.random() < mutpb:
                        tools.mutFlipBit(ind, indpb=indpb)
                for ind in offspring:
                    if time.perf_counter() - start >= budget_s:
                        ind.fitness.values = (memo.get(tuple(ind), float("inf")),)
                        continue
                    new = tuple(ind) not in memo
                    ind.fitness.values = (fit(tuple(ind)),)
                    evaluated += new
                pop = offspring
        finally:
            random.setstate(saved)
    return Evolution(tuple(best[0]), best[1], evaluated, generations, seeds, time.perf_counter() - start)


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

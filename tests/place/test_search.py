"""The placement search: the DP is exact (equal to brute force over every cover on random small DAGs with a mock
cost) and the evolutionary step never returns worse than its seeds."""

import itertools
import random

from tapml.place.search import Option, best_cover, merge_runs, refine


def _random_dag(rng: random.Random, n: int) -> list[int]:
    preds = [0] * n
    for i in range(1, n):
        for j in range(i):
            if rng.random() < 0.35:
                preds[i] |= 1 << j
    return preds


def _convex(preds: list[int], bits: int, n: int) -> bool:
    succs = [[i for i in range(n) if (preds[i] >> j) & 1] for j in range(n)]
    reach = set()
    stack = [s for j in range(n) if (bits >> j) & 1 for s in succs[j] if not (bits >> s) & 1]
    while stack:
        i = stack.pop()
        if i in reach:
            continue
        reach.add(i)
        stack.extend(succs[i])
    return not any((bits >> i) & 1 for i in reach)


def _options(rng: random.Random, preds: list[int], n: int) -> list[Option]:
    opts = [Option(1 << i, rng.uniform(1, 10), ("single", i)) for i in range(n)]  # always coverable
    for _ in range(2 * n):
        k = rng.randint(2, min(4, n))
        bits = sum(1 << i for i in rng.sample(range(n), k))
        if _convex(preds, bits, n):
            opts.append(Option(bits, rng.uniform(1, 10 * k) * rng.choice((0.3, 1.0)), ("group", bits)))
    return opts


def _executable(preds: list[int], chosen: list[Option], n: int) -> bool:
    """The quotient graph of the chosen partitions is acyclic (they can run one after another)."""
    owner = {i: k for k, o in enumerate(chosen) for i in range(n) if (o.bits >> i) & 1}
    deps = [{owner[j] for i in range(n) if (o.bits >> i) & 1 for j in range(n) if (preds[i] >> j) & 1} - {k}
            for k, o in enumerate(chosen)]
    done: set[int] = set()
    while len(done) < len(chosen):
        ready = [k for k in range(len(chosen)) if k not in done and deps[k] <= done]
        if not ready:
            return False
        done.update(ready)
    return True


def _brute(n: int, preds: list[int], opts: list[Option], launch: float) -> float:
    best = float("inf")
    full = (1 << n) - 1
    for r in range(1, n + 1):
        for combo in itertools.combinations(opts, r):
            bits = 0
            ok = True
            for o in combo:
                if bits & o.bits:
                    ok = False
                    break
                bits |= o.bits
            if ok and bits == full and _executable(preds, list(combo), n):
                best = min(best, sum(o.cost + launch for o in combo))
    return best


def test_dp_equals_brute_force_on_random_graphs():
    rng = random.Random(13)
    for trial in range(120):
        n = rng.randint(2, 7)
        preds = _random_dag(rng, n)
        opts = _options(rng, preds, n)
        launch = rng.choice((0.0, 0.5))
        cost, plan = best_cover(n, preds, opts, launch)
        want = _brute(n, preds, opts, launch)
        assert abs(cost - want) < 1e-9, f"trial {trial}: DP {cost} != brute force {want}"
        covered = 0
        for o in plan:
            assert not covered & o.bits
            covered |= o.bits
        assert covered == (1 << n) - 1
        assert _executable(preds, plan, n)
        assert abs(sum(o.cost + launch for o in plan) - cost) < 1e-9


def test_dp_reports_no_cover():
    cost, plan = best_cover(2, [0, 1], [Option(1, 1.0)], 0.0)
    assert cost == float("inf") and plan == []


def test_evolution_never_worse_than_its_seeds():
    for seed in range(5):
        rng = random.Random(seed)
        n = rng.randint(2, 12)
        weights = [rng.uniform(-1, 1) for _ in range(n)]
        def fitness(bits, w=weights):
            return 5 + sum(b * x for b, x in zip(bits, w)) + 0.3 * (sum(bits) % 3)
        evo = refine(n, fitness, budget_s=0.3, seed=seed)
        assert evo.fitness <= min(evo.seeds.values())
        assert fitness(evo.best) == evo.fitness
        assert evo.evaluated > 2 and evo.generations >= 1
        # the optimum here is "take every negative weight": a real search gets at least close to it
        optimum = min(fitness(tuple(b)) for b in itertools.product((0, 1), repeat=min(n, 12)))
        assert evo.fitness <= optimum + 0.6


def test_evolution_with_invalid_individuals_keeps_a_seed():
    evo = refine(4, lambda bits: float("inf") if any(bits) else 1.0, budget_s=0.1)
    assert evo.best == (0, 0, 0, 0) and evo.fitness == 1.0


def test_merge_runs():
    assert merge_runs([1, 1, 0, 1, 0, 0, 1]) == [(0, 2), (3, 4), (6, 7)]
    assert merge_runs([0, 0]) == []


def test_dp_past_its_state_limit_still_covers_the_graph():
    rng = random.Random(7)
    for _ in range(30):
        n = rng.randint(4, 7)
        preds = _random_dag(rng, n)
        opts = _options(rng, preds, n)
        exact, _ = best_cover(n, preds, opts, 0.1)
        bounded, plan = best_cover(n, preds, opts, 0.1, max_states=1)
        assert exact <= bounded < float("inf")
        assert _executable(preds, plan, n) and sum(o.bits for o in plan) == (1 << n) - 1

"""Series-parallel decomposition of a DAG of layers into a tree (leaf, series, parallel); a region that is not
series-parallel becomes one coarsened leaf.

Series: the nodes split into consecutive groups where every node of a group is an ancestor of every node of the
next. Parallel: the weakly connected components. Pure graph structure: no costs, no devices.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx

LEAF, SERIES, PARALLEL = "leaf", "series", "parallel"


@dataclass
class SPTree:
    """A node of the decomposition. `nodes` are the graph nodes it covers; a leaf covering several nodes is a
    non-series-parallel region coarsened into one unit."""

    kind: str
    nodes: tuple[int, ...]
    children: list[SPTree] = field(default_factory=list)

    @property
    def coarsened(self) -> bool:
        return self.kind == LEAF and len(self.nodes) > 1

    def walk(self) -> Iterable[SPTree]:
        yield self
        for c in self.children:
            yield from c.walk()

    def __str__(self) -> str:
        if self.kind == LEAF:
            return "{" + ",".join(map(str, self.nodes)) + "}" if self.coarsened else str(self.nodes[0])
        sep = " → " if self.kind == SERIES else " | "
        return "(" + sep.join(str(c) for c in self.children) + ")"


def decompose(g: nx.DiGraph) -> SPTree:
    """The series-parallel tree of a DAG; children of a series node in dependency order, of a parallel node in
    the order of their first node."""
    if not nx.is_directed_acyclic_graph(g):
        raise ValueError("series-parallel decomposition needs a DAG")
    order = list(nx.lexicographical_topological_sort(g, key=lambda v: (str(type(v)), v)))
    pos = {v: i for i, v in enumerate(order)}
    anc = [0] * len(order)  # bitsets over topological positions
    for v in order:
        a = 0
        for p in g.predecessors(v):
            a |= anc[pos[p]] | (1 << pos[p])
        anc[pos[v]] = a
    adj = [[pos[w] for w in g.successors(v)] + [pos[w] for w in g.predecessors(v)] for v in order]
    tree = _split(list(range(len(order))), anc, adj)
    return _relabel(tree, order)


def _split(s: list[int], anc: list[int], adj: list[list[int]]) -> SPTree:
    if len(s) == 1:
        return SPTree(LEAF, (s[0],))
    comps = _components(s, adj)
    if len(comps) > 1:
        return SPTree(PARALLEL, tuple(s), [_split(c, anc, adj) for c in comps])
    cuts = _series_cuts(s, anc)
    if cuts:
        bounds = [0, *cuts, len(s)]
        return SPTree(SERIES, tuple(s), [_split(s[a:b], anc, adj) for a, b in itertools.pairwise(bounds)])
    return SPTree(LEAF, tuple(s))


def _components(s: list[int], adj: list[list[int]]) -> list[list[int]]:
    inside = set(s)
    seen: set[int] = set()
    comps = []
    for v in s:
        if v in seen:
            continue
        comp, stack = [], [v]
        seen.add(v)
        while stack:
            x = stack.pop()
            comp.append(x)
            for w in adj[x]:
                if w in inside and w not in seen:
                    seen.add(w)
                    stack.append(w)
        comps.append(sorted(comp))
    return comps


def _series_cuts(s: list[int], anc: list[int]) -> list[int]:
    """Positions k (1 ≤ k < |s|) where every node of s[:k] is an ancestor of every node of s[k:]. s is sorted by
    topological position, so for each node b, f(b) = how many leading nodes of s are all its ancestors; k is a
    cut when every node from k on has f ≥ k."""
    mask = 0
    for v in s:
        mask |= 1 << v
    f = []
    for j, b in enumerate(s):
        missing = mask & ~anc[b] & ((1 << b) - 1)
        if not missing:
            f.append(j)
        else:
            low = (missing & -missing).bit_length() - 1
            f.append((mask & ((1 << low) - 1)).bit_count())
    cuts, suffix_min = [], len(s)
    for k in range(len(s) - 1, 0, -1):
        suffix_min = min(suffix_min, f[k])
        if suffix_min >= k:
            cuts.append(k)
    return cuts[::-1]


def _relabel(t: SPTree, order: list) -> SPTree:
    return SPTree(t.kind, tuple(order[i] for i in t.nodes), [_relabel(c, order) for c in t.children])


def is_series_parallel(g: nx.DiGraph) -> bool:
    """No region had to be coarsened."""
    return not any(t.coarsened for t in decompose(g).walk())

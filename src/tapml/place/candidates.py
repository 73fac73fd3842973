"""Candidates: every subgraph some backend's rules propose (overlaps allowed), kept only when convex (no path leaves
and re-enters it), each whole graph per backend always included, and grouped by a structural digest so identical
subgraphs (the layers of a BERT) are compiled and measured once.

It must not compile or time anything; it only enumerates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tapml.place.graph import ModelGraph, Subgraph
from tapml.place.rules import Rule, rules_for


@dataclass(frozen=True)
class Candidate:
    """A convex set of ops on one backend. `digest` names its structure (shared by identical subgraphs)."""

    backend: str
    ops: frozenset[int]
    digest: str
    rule: str

    @property
    def bits(self) -> int:
        return sum(1 << i for i in self.ops)


class Candidates:
    """All candidates of a graph and the subgraphs they cut out (one per distinct op set)."""

    def __init__(self, graph: ModelGraph):
        self.graph = graph
        self.items: list[Candidate] = []
        self._subs: dict[frozenset[int], Subgraph] = {}
        self._seen: set[tuple[str, frozenset[int]]] = set()
        self.nonconvex = 0

    def subgraph(self, ops: frozenset[int]) -> Subgraph:
        sub = self._subs.get(ops)
        if sub is None:
            sub = self._subs[ops] = self.graph.subgraph(ops)
        return sub

    def add(self, backend: str, ops: frozenset[int], rule: str) -> Candidate | None:
        if not ops or (backend, ops) in self._seen:
            return None
        self._seen.add((backend, ops))
        if not self.graph.convex(sum(1 << i for i in ops)):
            self.nonconvex += 1
            return None
        cand = Candidate(backend, ops, self.subgraph(ops).digest, rule)
        self.items.append(cand)
        return cand

    def distinct(self) -> dict[tuple[str, str], list[Candidate]]:
        """(backend, digest) -> its instances: what gets compiled and timed once."""
        out: dict[tuple[str, str], list[Candidate]] = {}
        for c in self.items:
            out.setdefault((c.backend, c.digest), []).append(c)
        return out

    def __len__(self) -> int:
        return len(self.items)


def enumerate_candidates(graph: ModelGraph, backends: Sequence[str],
                         rules: dict[str, list[Rule]] | None = None) -> Candidates:
    """Every backend's candidates on `graph`; `rules` overrides the registry per backend name."""
    found = Candidates(graph)
    whole = frozenset(range(len(graph)))
    for backend in backends:
        for rule in (rules or {}).get(backend) or rules_for(backend):
            label = type(rule).__name__
            for ops in rule.candidates(graph):
                if rule.admits(graph, ops):
                    found.add(backend, ops, label)
        found.add(backend, whole, "whole")  # the all-one-backend placement is always in the space
    return found

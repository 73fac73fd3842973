"""Placement rules: what a backend says it can run, as torch.fx patterns (`Pattern`, SubgraphMatcher), op-kind rules
(`Chain`: an anchor op plus its pointwise epilogue, at most K ops) and supported regions (`Region`: OperatorSupport +
CapabilityBasedPartitioner), each with an optional predicate over shapes/dtypes; and the registry that finds them.

Rules only propose node sets; they must not compile, time or judge anything (measure.py does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from tapml.errors import TapmlError
from tapml.place.graph import ModelGraph

Predicate = Callable[[list[fx.Node]], bool]
"""Called with the candidate's op nodes (`node.meta["val"]` holds each output's shape and dtype); False drops it."""

POINTWISE = "pointwise"
REDUCTION = "reduction"
ANY = "any"

# The heavy ops a library kernel or a compiler is worth calling for on its own (a matmul, a convolution, a norm).
ANCHORS = ("aten.convolution", "aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._softmax",
           "aten.native_layer_norm", "aten._native_batch_norm_legit_no_training", "aten.avg_pool2d",
           "aten.max_pool2d_with_indices", "aten.mean", "aten.sum", "aten._adaptive_avg_pool2d",
           "aten.convolution_backward", "aten.amax", "aten.var_mean", "aten.avg_pool3d", "aten.max_pool3d_with_indices",
           "aten.embedding")


def _matches(node: fx.Node, selector: str) -> bool:
    """`selector`: an op kind (`aten.relu`), an overload (`aten.relu.default`), a tag name, or `any`."""
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if selector == ANY:
        return True
    if selector in (POINTWISE, REDUCTION):
        return getattr(torch.Tag, selector) in t.tags
    return selector in (str(t.overloadpacket), str(t), t.name())


class Rule:
    """One way a backend says what it runs. `candidates(graph)` yields sets of op indices."""

    predicate: Predicate | None = None

    def candidates(self, graph: ModelGraph) -> Iterator[frozenset[int]]:
        raise NotImplementedError

    def admits(self, graph: ModelGraph, ops: frozenset[int]) -> bool:
        return self.predicate is None or self.predicate([graph.ops[i] for i in sorted(ops)])


@dataclass
class Chain(Rule):
    """An anchor op (kinds or tags in `anchors`) followed by up to `max_ops - 1` epilogue ops (`epilogue`), each
    consuming the previous one's output: conv + bias + relu, a matmul + add, a pointwise chain."""

    anchors: Sequence[str] = (ANY,)
    epilogue: Sequence[str] = (POINTWISE,)
    max_ops: int = 1
    min_ops: int = 1
    predicate: Predicate | None = None

    def candidates(self, graph: ModelGraph) -> Iterator[frozenset[int]]:
        for i, node in enumerate(graph.ops):
            if not any(_matches(node, s) for s in self.anchors):
                continue
            yield from self._grow(graph, (i,))

    def _grow(self, graph: ModelGraph, chain: tuple[int, ...]) -> Iterator[frozenset[int]]:
        if len(chain) >= self.min_ops:
            yield frozenset(chain)
        if len(chain) >= self.max_ops:
            return
        last = graph.ops[chain[-1]]
        seen: set[int] = set()
        for v in graph.values(chain[-1]) if last.users else []:
            for u in v.users:
                j = graph.owner(u) if u.op == "call_function" else None
                if j is None or j in chain or j in seen or not any(_matches(u, s) for s in self.epilogue):
                    continue
                seen.add(j)
                yield from self._grow(graph, (*chain, j))


@dataclass
class Pattern(Rule):
    """A subgraph written as a function over tensors (traced to core ATen with `example` inputs) or given as an fx
    Graph, matched with torch.fx's SubgraphMatcher; literals (strides, padding) are ignored unless `exact`."""

    pattern: Callable[..., Any] | fx.Graph
    example: Sequence[torch.Tensor] = ()
    exact: bool = False
    predicate: Predicate | None = None
    _graph: fx.Graph | None = field(default=None, repr=False)

    def graph(self) -> fx.Graph:
        if self._graph is None:
            if isinstance(self.pattern, fx.Graph):
                self._graph = self.pattern
            else:
                from torch._decomp import core_aten_decompositions
                from torch.fx.experimental.proxy_tensor import make_fx

                self._graph = make_fx(self.pattern, decomposition_table=core_aten_decompositions())(
                    *self.example).graph
        return self._graph

    def candidates(self, graph: ModelGraph) -> Iterator[frozenset[int]]:
        from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

        matcher = SubgraphMatcher(self.graph(), match_output=False, match_placeholder=False,
                                  remove_overlapping_matches=False, ignore_literals=not self.exact)
        for m in matcher.match(graph.gm.graph):
            ops = {graph.owner(n) for p, n in m.nodes_map.items()
                   if p.op == "call_function" and n.op == "call_function"}
            ops.discard(None)
            if ops:
                yield frozenset(ops)  # type: ignore[arg-type]


@dataclass
class Region(Rule):
    """The largest regions of supported ops (torch's CapabilityBasedPartitioner over an OperatorSupport, or a
    callable node -> bool): a graph-level backend's whole-model or whole-island candidates."""

    supported: Callable[[fx.Node], bool] | Any = None  # None: every op
    predicate: Predicate | None = None

    def candidates(self, graph: ModelGraph) -> Iterator[frozenset[int]]:
        from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
        from torch.fx.passes.operator_support import OperatorSupportBase, create_op_support

        check = self.supported
        if check is None:
            support: OperatorSupportBase = create_op_support(lambda _mods, n: n.op == "call_function")
        elif isinstance(check, OperatorSupportBase):
            support = check
        else:
            support = create_op_support(lambda _mods, n: n.op == "call_function" and
                                        (n.target.__name__ == "getitem" or bool(check(n))))
        parts = CapabilityBasedPartitioner(graph.gm, support, allows_single_node_partition=True).propose_partitions()
        for p in parts:
            ops = {graph.owner(n) for n in p.nodes}
            ops.discard(None)
            if ops:
                yield frozenset(ops)  # type: ignore[arg-type]


# --- the registry ----------------------------------------------------------------------------------------------

def _eager() -> list[Rule]:
    # Eager PyTorch runs every op: one candidate per op (so every graph is coverable) and the whole graph.
    return [Chain(anchors=(ANY,), max_ops=1), Region()]


def _compiler(k: int = 3) -> list[Rule]:
    # A compiler is worth a call for a heavy op with its epilogue, a fused pointwise chain, or a whole region.
    return [Chain(anchors=ANCHORS, epilogue=(POINTWISE,), max_ops=k),
            Chain(anchors=(POINTWISE,), epilogue=(POINTWISE,), max_ops=k, min_ops=2),
            Region()]


BUILTIN: dict[str, Callable[[], list[Rule]]] = {
    "torch": _eager, "torch-cuda": _eager,
    "inductor": _compiler, "inductor-max-autotune": _compiler,
    "tvm": _compiler, "tvm-cuda": _compiler,
    "onnxruntime": _compiler,
    "iree": _compiler, "iree-cuda": _compiler, "iree-vulkan": _compiler,
}
_RUNTIME: dict[str, list[Rule]] = {}


def register(name: str, rules: Iterable[Rule]) -> None:
    """Declare at run time what backend `name` can run (replaces its built-in or entry-point rules)."""
    rules = list(rules)
    if not rules or not all(isinstance(r, Rule) for r in rules):
        raise TapmlError(f"register({name!r}, rules): give a non-empty list of tapml.place.rules.Rule objects")
    _RUNTIME[name] = rules


def unregister(name: str) -> None:
    _RUNTIME.pop(name, None)


def rules_for(name: str) -> list[Rule]:
    """A backend's rules: registered at run time, else built in, else its Backend class's `placement_rules`
    (a list or a zero-argument callable returning one) found through the `tapml.backends` entry points."""
    if name in _RUNTIME:
        return list(_RUNTIME[name])
    if name in BUILTIN:
        return BUILTIN[name]()
    from tapml.backends import backend_class

    cls = backend_class(name)
    declared = getattr(cls, "placement_rules", None)
    if declared is None:
        raise TapmlError(f"backend {name} declares no placement rules: give its class a `placement_rules` "
                         "attribute or call tapml.place.register(name, rules)")
    return list(declared() if callable(declared) else declared)

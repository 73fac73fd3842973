"""A set of nodes of an exported graph cut out as a runnable module: its inputs (values other parts or the model's
inputs produce), its outputs (values other parts or the model's output consume), parameters shared by reference.

Used for every layer when profiling and for every stage when training; it must not decide which nodes go
together (the graph and the planner do) or move anything between devices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx


@dataclass
class StageModule:
    """`module(*inputs) -> tuple(outputs)`; both lists name values (fx node names) of the whole graph, in graph
    order, so both ends of an edge agree on the order without talking."""

    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """The stage's parameters by their names in the original model."""
        return dict(self.module.named_parameters())


def build_stage(gm: fx.GraphModule, nodes: Iterable[str], keep: Iterable[str] = ()) -> StageModule:
    """The nodes named in `nodes` (call_function nodes of `gm`) as one module. Its outputs are the values used
    outside the set, plus those in `keep` that it produces."""
    members = set(nodes)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    keep = set(keep)
    inputs: list[fx.Node] = []
    seen_in: set[str] = set()
    outputs: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n.name not in members:
            continue
        for a in n.all_input_nodes:
            if a.name not in members and a.op != "get_attr" and a.name not in seen_in:
                seen_in.add(a.name)
                inputs.append(a)
        if n.name in keep or any(u.name not in members for u in n.users):
            outputs.append(n)
    inputs.sort(key=lambda a: order[a.name])

    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        p = g.placeholder(a.name)
        p.meta = dict(a.meta)
        env[a] = p
    for n in gm.graph.nodes:
        if n.name not in members:
            continue
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = g.get_attr(a.target)
                env[a].meta = dict(a.meta)
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    module = fx.GraphModule(gm, g, class_name="Stage")
    return StageModule(module, [a.name for a in inputs], [o.name for o in outputs])

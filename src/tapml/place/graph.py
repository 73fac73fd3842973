"""The model as a placement sees it: `torch.export` decomposed to core ATen, weight-only work folded into constants,
the compute ops in topological order with bitset reachability, and any node set cut out as a runnable subgraph.

It must not know backends, costs or placements; it only answers questions about the graph's shape.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from tapml.errors import TapmlError, first_line


@dataclass
class Subgraph:
    """Nodes cut out of the model: `module(*inputs) -> tuple(outputs)`, inputs and outputs named by the model's
    value nodes (weights are inputs too, so identical layers share one compiled artifact)."""

    ops: frozenset[int]
    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    digest: str  # structural: the code and the input shapes/dtypes, not the weights' values

    def example(self, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [values[n] for n in self.inputs]


@dataclass
class ModelGraph:
    """A constant-folded ATen graph and its compute ops (`ops[i]` is an fx node; `getitem`s belong to their op)."""

    gm: fx.GraphModule
    ops: list[fx.Node]
    user_inputs: list[str]
    preds: list[int] = field(default_factory=list)  # bitsets of op indices
    succs: list[int] = field(default_factory=list)
    desc: list[int] = field(default_factory=list)  # everything reachable from op i (excluding i)
    _index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {n.name: i for i, n in enumerate(self.ops)}
        n = len(self.ops)
        self.preds, self.succs = [0] * n, [0] * n
        for i, node in enumerate(self.ops):
            for v in node.all_input_nodes:
                j = self.owner(v)
                if j is not None:
                    self.preds[i] |= 1 << j
                    self.succs[j] |= 1 << i
        self.desc = [0] * n
        for i in reversed(range(n)):
            d, s = 0, self.succs[i]
            while s:
                low = s & -s
                j = low.bit_length() - 1
                d |= low | self.desc[j]
                s ^= low
            self.desc[i] = d

    def __len__(self) -> int:
        return len(self.ops)

    def owner(self, value: fx.Node) -> int | None:
        """The op index producing `value` (a getitem belongs to its tuple-producing op); None for inputs/weights."""
        if value.op == "call_function" and value.target is operator.getitem:
            value = value.args[0]
        return self._index.get(value.name)

    def index(self, name: str) -> int:
        return self._index[name]

    def kind(self, i: int) -> str:
        t = self.ops[i].target
        return str(t.overloadpacket) if isinstance(t, torch._ops.OpOverload) else str(t)

    def convex(self, bits: int) -> bool:
        """No path leaves the set and re-enters it."""
        outside_reach = 0
        s = bits
        while s:
            low = s & -s
            i = low.bit_length() - 1
            outside_reach |= self.succs[i] & ~bits
            s ^= low
        # everything reachable from the set's direct outside successors must stay outside
        s, reach = outside_reach, 0
        while s:
            low = s & -s
            j = low.bit_length() - 1
            reach |= self.desc[j]
            s ^= low
        return not (reach & bits)

    def values(self, i: int) -> list[fx.Node]:
        """The value nodes op i produces: itself, or its getitems when it returns a tuple."""
        node = self.ops[i]
        items = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
        return items if items else [node]

    def subgraph(self, ops: frozenset[int] | set[int]) -> Subgraph:
        """The ops as one module; its outputs are the values used by other ops or by the model's output."""
        ops = frozenset(ops)
        members: set[fx.Node] = set()
        for i in ops:
            members.add(self.ops[i])
            members.update(v for v in self.values(i) if v is not self.ops[i])
        order = {n: k for k, n in enumerate(self.gm.graph.nodes)}
        inputs: list[fx.Node] = []
        outputs: list[fx.Node] = []
        for n in sorted(members, key=order.__getitem__):
            for a in n.all_input_nodes:
                if a not in members and a not in inputs:
                    inputs.append(a)
            if (n.op == "call_function" and (n.target is operator.getitem or not _is_tuple_op(n))
                    and any(u not in members for u in n.users)):
                outputs.append(n)
        inputs.sort(key=order.__getitem__)
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for k, a in enumerate(inputs):
            p = g.placeholder(f"in{k}")
            p.meta = dict(a.meta)
            env[a] = p
        for k, n in enumerate(sorted(members, key=order.__getitem__)):
            c = g.node_copy(n, lambda a: env[a])
            c.name = f"n{k}"
            env[n] = c
        g.output(tuple(env[o] for o in outputs))
        module = fx.GraphModule(torch.nn.Module(), g)
        metas = [_meta_text(a) for a in inputs]
        text = module.code + "|" + ";".join(metas)
        return Subgraph(ops, module, [a.name for a in inputs], [o.name for o in outputs],
                        hashlib.blake2b(text.encode(), digest_size=12).hexdigest())

    def values_of_run(self, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every value of the graph on these inputs (eager, the module's own dtypes): the reference activations."""
        env: dict[str, Any] = {}

        class _Keep(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                env[n.name] = out
                return out

        with torch.no_grad():
            _Keep(self.gm).run(*inputs)
        return env


def _is_tuple_op(n: fx.Node) -> bool:
    return isinstance(n.meta.get("val"), (tuple, list))


def _meta_text(n: fx.Node) -> str:
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        return f"{v.dtype}{list(v.shape)}{list(v.stride())}"
    return repr(v)


def export_model(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> ModelGraph:
    """`model(*inputs)` as a ModelGraph: torch.export, core ATen decompositions, weight-only ops folded."""
    try:
        with torch.no_grad():
            program = torch.export.export(model, tuple(inputs), strict=False).run_decompositions()
    except Exception as e:
        raise TapmlError(f"torch.export cannot capture the model: {first_line(e)}; give a model whose forward "
                         "takes tensors and traces without data-dependent control flow") from None
    gm = program.module()
    for n in list(gm.graph.nodes):  # export's input guards and dtype/shape assertions are not compute
        if not n.users and (n.op == "call_module" or (n.op == "call_function" and _is_assertion(n))):
            gm.graph.erase_node(n)
    _fold_constants(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return from_graph_module(gm)


def _is_assertion(n: fx.Node) -> bool:
    """aten._assert_tensor_metadata and kin: checks export leaves in the graph (a backend need not run them)."""
    return getattr(n.target, "__name__", "").startswith(("_assert", "sym_constrain_range"))


def from_graph_module(gm: fx.GraphModule) -> ModelGraph:
    """A ModelGraph over an ATen GraphModule whose values carry `meta["val"]`."""
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    users = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return ModelGraph(gm, ops, users)


def _fold_constants(gm: fx.GraphModule) -> None:
    """Ops that read only weights (transposes of weight matrices, masks built from constants) computed once now:
    they would otherwise be ready at any moment and multiply the search's states for nothing."""
    const: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            const[n] = _attr(gm, n.target)
        elif n.op == "call_function" and all(a in const for a in n.all_input_nodes):
            target = n.target
            if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
                continue
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: const[a])
            with torch.no_grad():
                const[n] = target(*args, **kwargs)
    k = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n not in const or not isinstance(const[n], torch.Tensor):
            continue
        if all(u in const for u in n.users):
            continue  # only its folded users need it
        name = f"_folded{k}"
        k += 1
        gm.register_buffer(name, const[n].detach().contiguous())
        with gm.graph.inserting_before(n):
            attr = gm.graph.get_attr(name)
        attr.meta = dict(n.meta)
        n.replace_all_uses_with(attr)
    gm.graph.eliminate_dead_code()


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

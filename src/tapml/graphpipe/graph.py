"""A model as a DAG of layers: torch.export's graph grouped by module path (`Program`), each layer measured on the
user's device for forward and backward time, activation and parameter bytes (`LayerGraph`), cached on disk.

It must not plan or run pipelines: the planner reads a LayerGraph, the runtime builds stages from a Program.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import fx

from tapml.errors import TapmlError
from tapml.graphpipe.stages import StageModule, build_stage

CACHE_VERSION = 3  # bump when grouping or measuring changes


def layer_key(path: str, depth: int | None = None) -> str:
    """The layer a module path belongs to: cut after `depth` names when given; else after the first list index
    (`text.blocks.3.qkv` → `text.blocks.3`), or after two names when there is none (`text.embed.tok` →
    `text.embed`)."""
    parts = path.split(".") if path else []
    if depth is not None:
        return ".".join(parts[:depth])
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


class _Sets:
    """Union-find over names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@dataclass
class ProgramLayer:
    name: str
    nodes: list[str]  # call_function nodes, in graph order
    params: list[str]  # names of the parameters and buffers it reads


def _path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _nbytes(val: Any) -> int:
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(_nbytes(v) for v in val)
    return 0


class Program:
    """A model exported once at a fixed batch, with its call nodes grouped into layers that form a DAG.

    Grouping: nodes of the same layer key (`layer_key`) go together; a getitem goes with the node it reads;
    glue (ops of the root module, or of a module that has layers inside it) joins its only producer, else its
    only consumer, else becomes a layer of its own; layers that read the same parameter merge; layers on a
    cycle (a module called twice around another) merge."""

    def __init__(self, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], depth: int | None = None):
        try:
            ep = torch.export.export(model, tuple(inputs))
        except Exception as e:
            raise TapmlError(f"torch.export could not trace the model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); GraphPipe needs an exportable forward") from None
        gm = ep.module()
        for n in list(gm.graph.nodes):
            if n.op == "call_module" and n.target == "_guards_fn":
                gm.graph.erase_node(n)
        gm.graph.lint()
        self.gm = gm
        self.example = tuple(inputs)
        self.batch = int(inputs[0].shape[0])
        nodes = list(gm.graph.nodes)
        self.order = {n.name: i for i, n in enumerate(nodes)}
        self.inputs = [n.name for n in nodes if n.op == "placeholder"]
        out = next(n for n in nodes if n.op == "output")
        flat = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
        if len(flat) != 1 or not isinstance(flat[0], fx.Node) or flat[0].op != "call_function":
            raise TapmlError("GraphPipe trains models whose forward returns one tensor computed from the inputs; "
                             "return the logits (the loss is applied by the model's loss function)")
        self.output = flat[0].name
        self.layers, self.layer_of = self._group(nodes, depth)
        self.code_hash = hashlib.sha256(gm.code.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------------------------------- grouping

    def _group(self, nodes: list[fx.Node], depth: int | None) -> tuple[list[ProgramLayer], dict[str, int]]:
        calls = [n for n in nodes if n.op == "call_function"]
        keys = {n.name: layer_key(_path(n), depth) for n in calls}
        named = set(keys.values()) - {""}
        glue = {name for name, k in keys.items()
                if not k or any(o.startswith(k + ".") for o in named)}
        sets = _Sets()
        first: dict[str, str] = {}
        for n in calls:
            sets.find(n.name)
            if n.name not in glue:
                sets.union(first.setdefault(keys[n.name], n.name), n.name)
        for n in calls:  # a getitem belongs with the op whose tuple it reads
            if n.target.__name__ == "getitem" and isinstance(n.args[0], fx.Node) and n.args[0].op == "call_function":
                sets.union(n.args[0].name, n.name)
                glue.discard(n.name)
        # Glue, in graph order: with one producing group it joins it (a chain of glue follows its head).
        pending = []
        for n in calls:
            if n.name in glue:
                prods = {sets.find(a.name) for a in n.all_input_nodes if a.op == "call_function"}
                if len(prods) == 1:
                    sets.union(next(iter(prods)), n.name)
                else:
                    pending.append(n)
        # The rest (joins, ops on the inputs alone), from the back: with one consuming group it joins it, else
        # it stays a layer of its own (joining a producer would make one branch depend on another).
        for n in reversed(pending):
            cons = {sets.find(u.name) for u in n.users if u.op == "call_function"} - {sets.find(n.name)}
            if len(cons) == 1:
                sets.union(next(iter(cons)), n.name)
        # A parameter read in two layers (tied weights) keeps them together: gradients must meet in one place.
        for n in nodes:
            if n.op == "get_attr":
                users = [u.name for u in n.users if u.op == "call_function"]
                for u in users[1:]:
                    sets.union(users[0], u)
        # Layers on a cycle merge (quotient of a DAG by module is not always acyclic).
        while True:
            q = nx.DiGraph()
            q.add_nodes_from({sets.find(n.name) for n in calls})
            for n in calls:
                for a in n.all_input_nodes:
                    if a.op == "call_function" and sets.find(a.name) != sets.find(n.name):
                        q.add_edge(sets.find(a.name), sets.find(n.name))
            cyc = [c for c in nx.strongly_connected_components(q) if len(c) > 1]
            if not cyc:
                break
            for c in cyc:
                c = sorted(c)
                for b in c[1:]:
                    sets.union(c[0], b)
        members: dict[str, list[str]] = {}
        for n in calls:
            members.setdefault(sets.find(n.name), []).append(n.name)
        order = list(nx.lexicographical_topological_sort(q, key=lambda r: self.order[members[r][0]]))
        layers, layer_of = [], {}
        byname = {n.name: n for n in nodes}
        for i, r in enumerate(order):
            ks = []
            for m in members[r]:
                k = keys[m] if m not in glue else f"{keys[m] or 'model'}~{byname[m].target.__name__.split('.')[0]}"
                if k not in ks:
                    ks.append(k)
            non_glue = [k for k in ks if "~" not in k]
            name = "+".join(non_glue) if non_glue else ks[0]
            params = sorted({a.target for m in members[r] for a in byname[m].all_input_nodes if a.op == "get_attr"})
            layers.append(ProgramLayer(name, members[r], params))
            for m in members[r]:
                layer_of[m] = i
        seen: dict[str, int] = {}
        for lay in layers:  # names are how plans find layers again in another export: make them unique
            c = seen.get(lay.name, 0)
            seen[lay.name] = c + 1
            if c:
                lay.name = f"{lay.name}#{c}"
        return layers, layer_of

    # ------------------------------------------------------------------------------------------- queries

    def node(self, name: str) -> fx.Node:
        return next(n for n in self.gm.graph.nodes if n.name == name)

    def value_bytes(self, name: str) -> int:
        return _nbytes(self.node(name).meta.get("val"))

    def edges(self) -> dict[tuple[int, int], list[str]]:
        """(producer layer, consumer layer) -> the values it carries, in graph order."""
        out: dict[tuple[int, int], list[str]] = {}
        for n in self.gm.graph.nodes:
            if n.op != "call_function":
                continue
            u = self.layer_of[n.name]
            for c in sorted({self.layer_of[x.name] for x in n.users if x.op == "call_function"} - {u}):
                out.setdefault((u, c), []).append(n.name)
        return out

    def model_inputs(self, layer: int) -> list[str]:
        """The model inputs (placeholders) a layer reads."""
        return sorted({a.name for m in self.layers[layer].nodes for a in self.node(m).all_input_nodes
                       if a.op == "placeholder"}, key=self.order.__getitem__)

    def stage(self, layers: Iterable[int]) -> StageModule:
        """The given layers as one module (see stages.build_stage); the model output is always an output."""
        nodes = [m for i in layers for m in self.layers[i].nodes]
        return build_stage(self.gm, nodes, keep=[self.output])


# ----------------------------------------------------------------------------------------------- costs


@dataclass
class LayerCost:
    """One layer's measured costs. Times and activation bytes are linear in the micro-batch b: `a + c·b`,
    fitted from two measured sizes."""

    name: str
    fwd: tuple[float, float]  # seconds
    bwd: tuple[float, float]  # seconds
    act: tuple[float, float]  # bytes held from its forward to its backward (inputs, saved tensors, outputs)
    params: int  # parameter bytes
    inputs: list[str] = field(default_factory=list)  # model inputs it reads


def _at(ac: tuple[float, float], b: float) -> float:
    return ac[0] + ac[1] * b


def fit(b1: int, y1: float, b2: int, y2: float) -> tuple[float, float]:
    """`(a, c)` with a, c ≥ 0 through (b1, y1) and (b2, y2); noise that makes y fall with b gives a constant."""
    if b2 == b1 or y2 <= y1:
        return (max(y1, y2), 0.0) if b2 == b1 else ((y1 + y2) / 2, 0.0)
    c = (y2 - y1) / (b2 - b1)
    a = y1 - c * b1
    return (a, c) if a >= 0 else (0.0, y2 / b2)


@dataclass
class LayerGraph:
    """The profiled DAG of layers the planners read; serializable, and constructible by hand for tests."""

    model: str
    device: str
    layers: list[LayerCost]
    edges: dict[tuple[int, int], float]  # bytes per sample from layer u to layer v
    output: int  # the layer that produces the model's output

    def __post_init__(self) -> None:
        self.graph = nx.DiGraph()
        self.graph.add_nodes_from(range(len(self.layers)))
        self.graph.add_edges_from(self.edges)
        if not nx.is_directed_acyclic_graph(self.graph):
            raise TapmlError("the layer graph has a cycle")

    def __len__(self) -> int:
        return len(self.layers)

    def fwd(self, i: int, b: float) -> float:
        return _at(self.layers[i].fwd, b)

    def bwd(self, i: int, b: float) -> float:
        return _at(self.layers[i].bwd, b)

    def act(self, i: int, b: float) -> float:
        return _at(self.layers[i].act, b)

    def edge_bytes(self, u: int, v: int, b: float) -> float:
        return self.edges.get((u, v), 0.0) * b

    def coarsen_order(self, k: int) -> tuple[LayerGraph, list[list[int]]]:
        """The topological order cut into at most k consecutive blocks of balanced work (each block convex), as a
        LayerGraph of blocks; itself when it has at most k layers."""
        n = len(self)
        if n <= k:
            return self, [[i] for i in range(n)]
        work = np.cumsum([x.fwd[0] + x.bwd[0] + (x.fwd[1] + x.bwd[1]) * 8 + 1e-12 for x in self.layers])
        cuts = sorted({int(np.searchsorted(work, work[-1] * i / k)) + 1 for i in range(1, k)} - {0, n})
        groups = [list(range(a, b)) for a, b in itertools.pairwise([0, *cuts, n])]
        of = {v: g for g, vs in enumerate(groups) for v in vs}
        layers = []
        for vs in groups:
            xs = [self.layers[v] for v in vs]
            layers.append(LayerCost("+".join(x.name for x in xs),
                                    (sum(x.fwd[0] for x in xs), sum(x.fwd[1] for x in xs)),
                                    (sum(x.bwd[0] for x in xs), sum(x.bwd[1] for x in xs)),
                                    (sum(x.act[0] for x in xs), sum(x.act[1] for x in xs)), sum(x.params for x in xs)))
        edges: dict[tuple[int, int], float] = {}
        for (u, v), w in self.edges.items():
            if of[u] != of[v]:
                edges[of[u], of[v]] = edges.get((of[u], of[v]), 0.0) + w
        return LayerGraph(self.model, self.device, layers, edges, of[self.output]), groups

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "output": self.output,
                "layers": [asdict(x) for x in self.layers],
                "edges": [[u, v, w] for (u, v), w in sorted(self.edges.items())]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerGraph:
        layers = [LayerCost(x["name"], tuple(x["fwd"]), tuple(x["bwd"]), tuple(x["act"]), x["params"],
                            list(x.get("inputs", []))) for x in d["layers"]]
        return cls(d["model"], d["device"], layers, {(u, v): w for u, v, w in d["edges"]}, d["output"])

    @classmethod
    def synthetic(cls, g: nx.DiGraph, fwd: dict[int, float], bwd: dict[int, float] | None = None,
                  act: dict[int, float] | None = None, params: dict[int, int] | None = None,
                  edge_bytes: float = 0.0, name: str = "synthetic") -> LayerGraph:
        """A graph with given per-sample costs (nodes must be 0..n-1 in a topological order)."""
        n = g.number_of_nodes()
        if sorted(g.nodes) != list(range(n)) or any(u >= v for u, v in g.edges):
            raise ValueError("synthetic graphs need nodes 0..n-1 numbered in a topological order")
        bwd = bwd or {i: 2 * fwd[i] for i in range(n)}
        act = act or {i: 0.0 for i in range(n)}
        params = params or {i: 0 for i in range(n)}
        layers = [LayerCost(f"L{i}", (0.0, fwd[i]), (0.0, bwd[i]), (0.0, act[i]), params[i]) for i in range(n)]
        sinks = [v for v in range(n) if g.out_degree(v) == 0]
        return cls(name, "synthetic", layers, {e: edge_bytes for e in g.edges}, sinks[-1])


# ----------------------------------------------------------------------------------------------- profiling


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(stage: StageModule, args: list[torch.Tensor], device: torch.device, reps: int,
             param_ptrs: set[int]) -> tuple[float, float, int]:
    """Median forward and backward seconds of one layer on its real inputs, and the bytes it holds between
    them (distinct storages among its inputs, its saved tensors and its outputs; parameters excluded)."""
    fwd, bwd, held = [], [], 0
    for r in range(reps + 1):
        xs = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in param_ptrs:
                storages[s.data_ptr()] = s.nbytes()
            return t

        _sync(device)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = stage.module(*xs)
        _sync(device)
        t1 = time.perf_counter()
        diff = [o for o in outs if o.requires_grad]
        if diff:
            torch.autograd.backward(diff, [torch.ones_like(o) for o in diff])
        _sync(device)
        t2 = time.perf_counter()
        if r:  # the first run warms caches and allocators
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        for t in [*xs, *outs]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in param_ptrs:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        held = max(held, sum(storages.values()))
    # The minimum: on a shared machine preemption only ever adds time.
    return min(fwd), min(bwd), held


def _profile_program(p: Program, device: torch.device, reps: int) -> list[tuple[float, float, int]]:
    params = {t.untyped_storage().data_ptr() for t in [*p.gm.parameters(), *p.gm.buffers()]}
    stages = [p.stage([i]) for i in range(len(p.layers))]
    last = {v: i for i, st in enumerate(stages) for v in st.inputs}  # layers are in topological order
    env = dict(zip(p.inputs, p.example))
    rows = []
    for i, st in enumerate(stages):
        args = [env[v] for v in st.inputs]
        rows.append(_measure(st, args, device, reps, params))
        with torch.no_grad():
            env.update(zip(st.outputs, st.module(*args)))
        for v in st.inputs:  # only values a later layer reads stay alive (GPU sizes hold one layer's worth)
            if last[v] == i:
                del env[v]
    return rows


def profile(programs: tuple[Program, Program], name: str, device: torch.device, reps: int = 5) -> LayerGraph:
    """Each layer of the model measured at the two programs' batch sizes (same model, exported twice)."""
    (p1, p2) = programs
    if [lay.name for lay in p1.layers] != [lay.name for lay in p2.layers]:
        raise TapmlError("the model's layers differ between batch sizes; GraphPipe needs a batch-independent graph")
    runs = []
    threads = torch.get_num_threads()
    if device.type == "cpu":  # as the ranks run (one thread each), and immune to a busy neighbour's cores
        torch.set_num_threads(1)
    try:
        for p in (p1, p2):
            runs.append(_profile_program(p, device, reps))
    finally:
        torch.set_num_threads(threads)
    b1, b2 = p1.batch, p2.batch
    layers = []
    for i, lay in enumerate(p2.layers):
        (f1, w1, a1), (f2, w2, a2) = runs[0][i], runs[1][i]
        pbytes = sum(_nbytes(p2.gm.get_parameter(t)) if _is_param(p2.gm, t) else 0 for t in lay.params)
        layers.append(LayerCost(lay.name, fit(b1, f1, b2, f2), fit(b1, w1, b2, w2), fit(b1, a1, b2, a2), pbytes,
                                p2.model_inputs(i)))
    edges = {e: sum(p2.value_bytes(v) for v in vals) / b2 for e, vals in p2.edges().items()}
    return LayerGraph(name, str(device), layers, edges, p2.layer_of[p2.output])


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def cache_root() -> Path:
    env = os.environ.get("TAPML_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "tapml") / "graphpipe"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    import platform

    return f"cpu:{platform.machine()}:{platform.processor() or '?'}:1thread"  # profiles run on one thread


def layer_graph(name: str, model: torch.nn.Module, make_inputs: Callable[[int], tuple[torch.Tensor, ...]],
                sizes: tuple[int, int], device: str | torch.device = "cpu", depth: int | None = None,
                reps: int = 5, cache: bool = True) -> tuple[LayerGraph, Program]:
    """The profiled layer graph of `model` on `device` (from the disk cache when the same model, shapes, torch
    and device were measured before) and the Program exported at the larger size."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TapmlError("--device cuda was asked for but this torch sees no CUDA device; use --device cpu")
    b1, b2 = sorted(sizes)
    model = model.to(dev)
    progs = []
    for b in (b1, b2):
        ins = tuple(t.to(dev) for t in make_inputs(b))
        progs.append(Program(model, ins, depth))
    p1, p2 = progs
    shapes = [[list(t.shape), str(t.dtype)] for p in progs for t in p.example]
    key = hashlib.sha256(json.dumps([CACHE_VERSION, name, p1.code_hash, p2.code_hash, shapes, depth,
                                     torch.__version__, device_name(dev)]).encode()).hexdigest()[:24]
    path = cache_root() / f"{key}.json"
    if cache and path.is_file():
        try:
            return LayerGraph.from_json(json.loads(path.read_text())), p2
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is measured again
    lg = profile((p1, p2), name, dev, reps)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(lg.to_json()))
            tmp.replace(path)
        except OSError as e:
            raise TapmlError(f"cannot write the profile cache {path} ({e.strerror}); set TAPML_CACHE_DIR to a "
                             "writable directory") from None
    return lg, p2

"""The placed model: a torch.fx module whose call_module nodes are the partitions, each a subgraph compiled by its
backend; tensors pass between partitions as torch tensors on the device (DLPack hand-offs inside the engines, host
copies only for backends that cannot share the device's memory, counted in `host_crossings`). Saved as a JSON
placement beside the backends' artifact caches, loaded by re-exporting the same model.

It must not search or measure; it runs a given placement.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from tapml.errors import TapmlError
from tapml.place.graph import ModelGraph, Subgraph

FORMAT = 1


@dataclass
class Partition:
    """One kernel of the placement: ops (indices into the graph's ops) run by `backend`."""

    backend: str
    ops: frozenset[int]
    seconds: float | None = None  # measured alone (None: not measured, e.g. a merged region)
    digest: str = ""


class _Part(torch.nn.Module):
    """A compiled subgraph as a module (fx call_module target)."""

    def __init__(self, fn: Callable[..., list[torch.Tensor]], backend: str):
        super().__init__()
        self.fn, self.backend = fn, backend

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fn(*xs))


def graph_digest(graph: ModelGraph) -> str:
    metas = [str(getattr(n.meta.get("val"), "shape", "")) for n in graph.gm.graph.nodes if n.op == "placeholder"]
    return hashlib.blake2b((graph.gm.code + "|".join(metas)).encode(), digest_size=12).hexdigest()


class PlacedModel:
    """`placed(*inputs)` runs the model with every partition on its backend; `module` is the fx GraphModule."""

    def __init__(self, graph: ModelGraph, partitions: Sequence[Partition],
                 compile: Callable[[str, Subgraph], Callable[..., list[torch.Tensor]]], device: str | torch.device,
                 host_crossing: Callable[[str], bool] = lambda _b: False):
        self.graph, self.partitions, self.device = graph, list(partitions), torch.device(device)
        covered = sorted(i for p in self.partitions for i in p.ops)
        if covered != list(range(len(graph))):
            raise TapmlError("a placement must cover every op of the model exactly once")
        root = torch.nn.Module()
        g = fx.Graph()
        g.set_codegen(graph.gm.graph._codegen)  # the model's own call signature and output structure
        env: dict[str, fx.Node] = {}
        for n in graph.gm.graph.nodes:
            if n.op == "placeholder":
                env[n.name] = g.placeholder(n.name)
        weights: dict[str, str] = {}
        self.host_crossings = 0
        for k, part in enumerate(self.partitions):
            sub = graph.subgraph(part.ops)
            part.digest = part.digest or sub.digest
            name = f"p{k}_{part.backend.replace('-', '_')}"
            root.add_module(name, _Part(compile(part.backend, sub), part.backend))
            args = []
            for v in sub.inputs:
                if v not in env:  # a weight: kept on the placed module, read with get_attr
                    src = graph.gm.graph.find_nodes(op="get_attr") if hasattr(graph.gm.graph, "find_nodes") else []
                    node = next((a for a in src if a.name == v), None) or next(
                        a for a in graph.gm.graph.nodes if a.name == v)
                    attr = weights.setdefault(v, f"w_{len(weights)}")
                    if not hasattr(root, attr):
                        root.register_buffer(attr, _fetch(graph.gm, node.target), persistent=False)
                    env[v] = g.get_attr(attr)
                args.append(env[v])
            if host_crossing(part.backend):
                self.host_crossings += len(sub.inputs) + len(sub.outputs)
            call = g.call_module(name, tuple(args))
            for j, v in enumerate(sub.outputs):
                env[v] = g.call_function(_item, (call, j))
        out = next(n for n in graph.gm.graph.nodes if n.op == "output")
        g.output(torch.fx.node.map_arg(out.args[0], lambda a: env[a.name] if a.name in env else _missing(a)))
        self.module = fx.GraphModule(root, g)

    def __call__(self, *inputs: Any) -> Any:
        with torch.no_grad():
            return self.module(*inputs)

    def plan(self) -> dict[str, Any]:
        """The placement as JSON-able data: backends by partition, ops by the exported graph's node names."""
        return {"format": FORMAT, "device": str(self.device), "graph": graph_digest(self.graph),
                "partitions": [{"backend": p.backend, "ops": [self.graph.ops[i].name for i in sorted(p.ops)],
                                "digest": p.digest, "seconds": p.seconds} for p in self.partitions]}

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the placement JSON; the compiled artifacts stay in the backends' caches (TAPML_CACHE_DIR)."""
        path = Path(path)
        data = self.plan()
        if extra:
            data["report"] = extra
        path.write_text(json.dumps(data, indent=1))
        return path


def read_plan(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TapmlError(f"cannot read placement {path}: {e}; give a file written by PlacedModel.save") from None
    if data.get("format") != FORMAT or "partitions" not in data:
        raise TapmlError(f"{path} is not a TapML placement (format {FORMAT}); write one with PlacedModel.save")
    return data


def partitions_of(graph: ModelGraph, data: dict[str, Any]) -> list[Partition]:
    """The saved partitions on a freshly exported graph; a one-line TapmlError when the model changed."""
    if data.get("graph") != graph_digest(graph):
        raise TapmlError("this placement was found for a different model or input shapes; place the model again")
    try:
        return [Partition(p["backend"], frozenset(graph.index(n) for n in p["ops"]), p.get("seconds"),
                          p.get("digest", "")) for p in data["partitions"]]
    except KeyError as e:
        raise TapmlError(f"the placement names op {e} that the model does not have; place the model again") from None


def _item(t: tuple, j: int) -> Any:
    return t[j]


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _missing(a: fx.Node) -> Any:
    raise TapmlError(f"the model's output {a.name} is produced by no partition")

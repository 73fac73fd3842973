"""`inductor`: TorchInductor as a target. Ops are traced to one ATen graph (make_fx; many one-op graphs at once
in `prepare`), compiled by `torch._inductor.standalone_compile` (C++ kernels on the CPU) under the configuration
the backend was opened with, and saved as an artifact on disk. The compiled code takes the strides it was
compiled for; they are part of the key.

A graph whose generated code calls ATen itself (an inductor fallback kernel or an extern library kernel such
as `extern_kernels.mm`) is reported unsupported: that op would run in PyTorch, not in code inductor generated.
In a batch, each such call is traced to the one op it serves by the provenance inductor writes above it (the
source nodes it computes), else through the wrapper's data flow; a batch where neither can tell is split.
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import re
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind

from tapml.backends.compilers import (
    ENVIRONMENT,
    Capture,
    CompilerBackend,
    OneOp,
    Runner,
    Uncapturable,
    Unlowerable,
    first_line,
    one_op,
    quiet,
)
from tapml.backends.compilers.graphs import trace_many
from tapml.errors import TapmlError
from tapml.ops import OpCall

# Lines of inductor's generated wrapper that run a kernel it did not generate.
_ATEN_CALL = re.compile(r"^\s*(?:\w+\s*=\s*)?(torch\.ops\.aten\.[\w.]+|aten\.[\w.]+|extern_kernels\.\w+)\(",
                        re.MULTILINE)


# Beneath the user's settings when many one-op graphs compile as one: layout optimization picks channels-last for
# a whole graph holding convolutions, so in a batch a convolution member would lay out its neighbours' tensors,
# which alone have no convolution to follow; off, each member is laid out as it is alone (and the convolutions,
# refused anyway as ATen kernels, need no generated layout copies: ~25% of zoo ResNet's batch compile).
BATCH = {"layout_optimization": False}


class InductorBackend(CompilerBackend):
    name = "inductor"
    description = "TorchInductor (standalone_compile, generated C++ kernels on the CPU; ATen fallbacks refused)"
    takes_layouts = True
    batch_size = 128  # one-op graphs per compile: inductor's C++ kernels are grouped into few compiler runs

    def __init__(self, cache_dir: str | None = None, config: dict[str, Any] | None = None):
        """config: inductor settings to compile under, e.g. {"cpp.simdlen": 0} (torch._inductor.config keys)."""
        super().__init__(cache_dir)
        import torch._inductor.config as ic

        if not isinstance(config, (dict, type(None))):
            raise TapmlError(f"inductor's config option must be an object of torch._inductor.config settings, "
                             f"e.g. {{\"cpp.simdlen\": 0}} (got {type(config).__name__})")
        known = set(ic.get_config_copy())
        unknown = sorted(k for k in (config or {}) if k not in known)
        if unknown:
            raise TapmlError(f"unknown torch._inductor.config setting(s) {', '.join(unknown)}; see "
                             "torch/_inductor/config.py for the names")
        self.overrides = dict(config or {})

    def _versions(self) -> dict[str, str]:
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            cxx = get_cpp_compiler()
        except Exception as e:
            raise TapmlError(f"inductor finds no working C++ compiler here ({first_line(e)}); install g++ or "
                             "set CXX") from None
        return {"torch": version("torch"), "cxx": cxx}

    def _config(self) -> Any:
        import torch._inductor.config as ic

        # get_hash covers every setting that changes the generated code (cached by torch until one changes).
        return [ic.get_hash().hex(), sorted((k, repr(v)) for k, v in self.overrides.items())]

    def _capture(self, call: OpCall) -> OneOp:
        return one_op(call, layouts=True)

    # compiling ----------------------------------------------------------------------------------------------
    def _compile(self, cap: Capture | OneOp, out: Path) -> dict:
        if isinstance(cap, OneOp):
            m = self._compile_many([cap], out)["members"][0]
            if m.get("refused"):
                raise Uncapturable(m["refused"])
            if not m["ok"]:
                raise Unlowerable(m["reason"])
            return {"out_spec": m["out_spec"], "out_dtypes": m["out_dtypes"]}
        return self._compile_program(cap, out)

    def _standalone(self, graph: torch.fx.GraphModule, inputs: list[torch.Tensor], out: Path,
                    batch: bool = False) -> str:
        """Compile `graph` into `out/artifact`; returns the generated Python wrapper's source. `batch`: the graph
        holds many one-op graphs, compiled under BATCH beneath the user's settings."""
        import torch._inductor.config as ic
        from torch._inductor import standalone_compile

        codes: list[str] = []
        try:
            with quiet(), ic.patch({**(BATCH if batch else {}), **self.overrides}), _generated_code(codes):
                art = standalone_compile(graph, inputs, dynamic_shapes="from_example_inputs")
                # binary: loading goes through inductor's own cache dir, where the kernels just built are (the
                # unpacked form makes its directory the cache dir and rebuilds them, headers and all)
                art.save(path=str(out / "artifact.bin"), format="binary")
        except ENVIRONMENT:
            raise
        except Exception as e:
            if _environmental(e):
                raise TapmlError(f"inductor cannot compile here: {first_line(e)}; check its C++ compiler "
                                 "(g++, CXX) and Python headers") from None
            raise Unlowerable(f"inductor cannot compile it: {first_line(e)}") from None
        if not codes:
            raise RuntimeError("inductor compiled the graph but its generated code could not be read")
        return "\n".join(codes)

    def _compile_many(self, ops: list[OneOp], out: Path) -> dict:
        traced = trace_many(ops)
        source = self._standalone(traced.graph, traced.inputs, out, batch=len(ops) > 1)
        member_of_input = [i for i, m in enumerate(traced.members) for _ in range(m["inputs"])]
        member_of_output = [i for i, m in enumerate(traced.members) for _ in range(m["outputs"])]
        calls = aten_calls_by_origin(source, node_members(traced.graph, member_of_input, member_of_output))
        if calls is None:
            calls = aten_calls_by_member(source, member_of_input, member_of_output, len(ops))
        if calls is None:
            raise Unlowerable(f"inductor's code for these {len(ops)} ops calls ATen where it cannot be traced to "
                              "one op")
        members = []
        for i, m in enumerate(traced.members):
            m = dict(m, ok=not m.get("refused") and not calls.get(i))
            if calls.get(i):
                m["reason"] = (f"inductor generates no kernel for it: its code calls {', '.join(sorted(calls[i]))} "
                               "(an ATen kernel)")
            members.append(m)
        return {"members": members}

    def _compile_program(self, cap: Capture, out: Path) -> dict:
        """A whole exported model: the weights stay graph inputs, saved beside the artifact, so the compiled
        code and its cache entry hold no tensor constants."""
        from torch.fx.experimental.proxy_tensor import make_fx

        program = cap.program
        graph = program.graph_module
        specs = program.graph_signature.input_specs
        users = iter(cap.inputs)
        example = [next(users) if s.kind == InputKind.USER_INPUT else
                   program.state_dict[s.target] if s.target in program.state_dict else program.constants[s.target]
                   for s in specs]
        weights = {f"w{i}": t.detach().clone() for i, (s, t) in enumerate(zip(specs, example))
                   if s.kind != InputKind.USER_INPUT}
        try:
            with quiet():
                gm = make_fx(lambda *xs: tuple(pytree.tree_leaves(graph(*xs))))(*example)
        except ENVIRONMENT:
            raise
        except Exception as e:
            raise Unlowerable(f"inductor cannot compile it: {first_line(e)}") from None
        source = self._standalone(gm, example, out)
        if weights:
            from safetensors.torch import save_file

            save_file(weights, str(out / "weights.safetensors"))
        return {"aten_calls": sorted(set(_ATEN_CALL.findall(source))), "arity": len(specs)}

    def _load(self, path: Path, meta: dict) -> Runner:
        from torch._inductor import CompiledArtifact

        with quiet():
            art = CompiledArtifact.load(path=str(path / "artifact.bin"), format="binary")

        weights: dict[str, torch.Tensor] = {}
        if (path / "weights.safetensors").exists():
            from safetensors.torch import load_file

            weights = load_file(str(path / "weights.safetensors"))

        def run(handles: list[Any]) -> list[Any]:
            if weights:
                users = iter(handles)
                handles = [weights[f"w{i}"] if f"w{i}" in weights else next(users) for i in range(meta["arity"])]
            out = art(*handles)
            return list(out) if isinstance(out, (tuple, list)) else [out]

        return run


@contextlib.contextmanager
def _generated_code(codes: list[str]) -> Iterator[None]:
    """Collect the wrapper code inductor generates in the block (its `save_output_code` hook, the one
    `torch._inductor.utils.run_and_get_code` uses), or, when its own cache served the graph, the wrapper
    module it loaded."""
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.graph import GraphLowering

    before = {id(m) for m in PyCodeCache.modules}
    old = GraphLowering.save_output_code

    def save(code: str) -> None:
        codes.append(code)
        if old is not None:
            old(code)

    GraphLowering.save_output_code = save
    try:
        yield
    finally:
        GraphLowering.save_output_code = old
    if not codes:
        for m in PyCodeCache.modules:
            path = getattr(m, "__file__", None)
            if id(m) not in before and path and hasattr(m, "call"):
                codes.append(Path(path).read_text())


def _environmental(e: BaseException) -> bool:
    """A failure of the machine, not a verdict on the graph: no C++ compiler, a missing header or binary."""
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    if isinstance(e, InvalidCxxCompiler):
        return True
    text = str(e)
    return isinstance(e, CppCompileError) and any(s in text for s in ("No such file or directory", "not found",
                                                                      "cannot find", "Permission denied"))


# --- which op an ATen call in the wrapper serves -------------------------------------------------------------

def node_members(graph: torch.fx.GraphModule, member_of_input: list[int],
                 member_of_output: list[int]) -> dict[str, set[int]]:
    """The members (one-op graphs of a batch) each node of the traced batch graph belongs to: those whose inputs
    it reads, or, for a node that reads no input (a factory op such as `empty`), those whose outputs it feeds.
    The members share nothing, so every node has exactly one."""
    nodes = list(graph.graph.nodes)
    owner: dict[str, set[int]] = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for n, m in zip(placeholders, member_of_input):
        owner[n.name] = {m}
    for n in nodes:
        if n.op == "call_function":
            owner[n.name] = set().union(*(owner.get(a.name, set()) for a in n.all_input_nodes))
    out = next((n for n in nodes if n.op == "output"), None)
    if out is not None:
        flat = [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, torch.fx.Node)]
        for a, m in zip(flat, member_of_output):
            if not owner.get(a.name):
                owner[a.name] = {m}
    for n in reversed(nodes):  # factory nodes: the members their users belong to
        if n.op == "call_function" and not owner.get(n.name):
            owner[n.name] = set().union(*(owner.get(u.name, set()) for u in n.users))
    return owner


_SOURCE_NODES = re.compile(r"#\s*(?:Topologically Sorted|Unsorted) Source Nodes: \[([^\]]*)\]")


def aten_calls_by_origin(source: str, owner: dict[str, set[int]]) -> dict[int, set[str]] | None:
    """The ATen calls of inductor's wrapper by member, read from the provenance inductor writes above each one
    (`# Topologically Sorted Source Nodes: [convolution_1], ...`: the names of the nodes of the graph it was given
    that the call computes). None when a call has no such line or its nodes are not of exactly one member (the
    caller falls back to the wrapper's data flow)."""
    out: dict[int, set[str]] = {}
    names: list[str] | None = None
    for line in source.splitlines():
        found = _SOURCE_NODES.search(line)
        if found:
            names = [x.strip() for x in found.group(1).split(",") if x.strip()]
            continue
        call = _ATEN_CALL.match(line)
        if call is None:
            if line.strip() and not line.lstrip().startswith("#"):
                names = None  # the provenance line belongs to the statement right below it only
            continue
        if not names:
            return None
        ms = set().union(*(owner.get(n, set()) for n in names))
        if len(ms) != 1:
            return None
        out.setdefault(ms.pop(), set()).add(call.group(1))
        names = None
    return out


def aten_calls_by_member(source: str, member_of_input: list[int], member_of_output: list[int],
                         members: int) -> dict[int, set[str]] | None:
    """The ATen calls of inductor's wrapper source, by the member (one-op graph) each serves: None when one
    cannot be traced to exactly one member (the caller compiles smaller batches).

    The wrapper's `call(args)` unpacks the graph inputs in order and returns the outputs in order; the names
    an ATen call reads or writes are joined to those through the statements that move buffers around
    (allocations, aliases, reinterpretations), never through a generated kernel's launch, which may serve
    several members at once."""
    found = set(_ATEN_CALL.findall(source))
    if members == 1:
        return {0: found} if found else {}
    if not found:
        return {}
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    kernels = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
               if isinstance(t, ast.Name) and "async_compile" in ast.unparse(node.value)}
    call = next((f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "call"
                 and "args" in [a.arg for a in f.args.args]), None)
    if call is None:
        return None
    # The wrapper's values: names it binds (inputs unpacked, buffers allocated); globals (torch, helpers) are not.
    local = {n.id for n in ast.walk(call) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    parent: dict[str, str] = {}

    def root(n: str) -> str:
        while parent.get(n, n) != n:
            n = parent[n]
        return n

    def join(names: list[str]) -> None:
        for a, b in itertools.pairwise(names):
            parent[root(a)] = root(b)

    seeds: dict[str, set[int]] = {}
    aten: list[tuple[set[str], set[str]]] = []  # (names, ATen calls) per statement that calls ATen
    seen_calls: set[str] = set()
    for stmt in _statements(call.body):
        names = sorted({n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)} & local)
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Name) and stmt.value.id == "args":
            targets = stmt.targets[0].elts if isinstance(stmt.targets[0], ast.Tuple) else stmt.targets
            if len(targets) != len(member_of_input):
                return None
            for t, m in zip(targets, member_of_input):
                seeds.setdefault(t.id, set()).add(m)
            continue
        if isinstance(stmt, ast.Return) and stmt.value is not None:
            elts = stmt.value.elts if isinstance(stmt.value, ast.Tuple) else [stmt.value]
            if len(elts) != len(member_of_output):
                return None
            for e, m in zip(elts, member_of_output):
                for n in ast.walk(e):
                    if isinstance(n, ast.Name):
                        seeds.setdefault(n.id, set()).add(m)
            continue
        if isinstance(stmt, ast.Delete) or any(isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                                               and c.func.id in kernels for c in ast.walk(stmt)):
            continue
        join(names)
        calls = set(_ATEN_CALL.findall(ast.unparse(stmt)))
        if calls:
            aten.append((set(names), calls))
            seen_calls |= calls
    if seen_calls != found:  # an ATen call outside `call` (or one the unparsed text hides): cannot place it
        return None
    owners: dict[str, set[int]] = {}
    for name, ms in seeds.items():
        owners.setdefault(root(name), set()).update(ms)
    out: dict[int, set[str]] = {}
    for names, calls in aten:
        ms = set().union(*(owners.get(root(n), set()) for n in names))
        if len(ms) != 1:
            return None
        out.setdefault(ms.pop(), set()).update(calls)
    return out


def _statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """The simple statements of a function body, nested blocks (with, if, for) flattened in order."""
    out: list[ast.stmt] = []
    for s in body:
        inner = [b for field in ("body", "orelse", "finalbody") for b in getattr(s, field, []) or []]
        if inner and not isinstance(s, (ast.FunctionDef, ast.ClassDef)):
            out.extend(_statements(inner))
        else:
            out.append(s)
    return out

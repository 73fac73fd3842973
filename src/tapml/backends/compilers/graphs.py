"""What an ATen call becomes before a compiler sees it: a one-op graph (`OneOp`), many of them traced as one
module (`trace_many`), and the clean place every compile and compiled run happens in (`outside_interception`).

It knows no compiler and no cache; it must not decide whether a graph is supported (the compiler does).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from tapml.errors import TapmlError, first_line
from tapml.ops import OpCall, Unserializable, decode_value, encode_args, encode_value, mutated_args

# Failures of the tool's own environment, not the compiler's verdict on a graph: never cached as unsupported.
ENVIRONMENT = (ImportError, OSError, MemoryError, TapmlError)


class Unlowerable(Exception):
    """The stack cannot compile this graph; the message is the one-line reason reported as `unsupported`."""


class Uncapturable(Unlowerable):
    """tapml cannot make a graph of the call (an argument, export, tracing): reported as `unsupported` like a
    compiler's refusal, but never cached, since no compiler said it."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' and compilers' chatter (prints, warnings, INFO logs) around one compile."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript", "torch.onnx", "torch._inductor")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# --- outside the interception ----------------------------------------------------------------------------

@functools.cache
def _fresh_thread_keys() -> tuple[Any, Any]:
    """The dispatcher's thread-local include/exclude key sets of a thread nobody intercepts."""
    box: dict[str, Any] = {}

    def read() -> None:
        box["keys"] = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())

    t = threading.Thread(target=read, name="tapml-dispatch-keys")
    t.start()
    t.join()
    return box["keys"]


def intercepted() -> bool:
    """True inside a dispatch mode (MixedRun, the Recorder) or its handler, where autograd, functionalization
    and the Python key are excluded: torch.export and the compilers do not work there as they do outside."""
    keys = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())
    return torch._C._len_torch_dispatch_stack() > 0 or keys != _fresh_thread_keys()


@contextlib.contextmanager
def outside_interception() -> Iterator[None]:
    """Compile, load and run compiled code as a fresh thread would: dispatch modes popped, the dispatcher's
    thread-local keys reset (a mode's handler runs with most of them excluded), gradients off."""
    include, exclude = _fresh_thread_keys()
    with _disable_current_modes(), torch._C._ForceDispatchKeyGuard(include, exclude), torch.no_grad():
        yield


# --- one-op graphs -----------------------------------------------------------------------------------------

def layout_of(t: torch.Tensor) -> list[int | None]:
    """The strides a compiled graph depends on: None where the size is 0 or 1 (no index ever moves there)."""
    return [s if n > 1 else None for n, s in zip(t.shape, t.stride())]


def call_key_material(call: OpCall, layouts: bool = False) -> tuple[str, Any, list]:
    """(op, non-tensor argument spec, input shapes/dtypes[/strides]): what a compiled one-op graph depends on.
    `layouts`: for a stack whose compiled code takes strided inputs (Inductor), the strides too."""
    spec, tensors = encode_args(call.args, call.kwargs)
    if layouts:
        return call.op, spec, [[list(t.shape), str(t.dtype), layout_of(t)] for t in tensors]
    return call.op, spec, [[list(t.shape), str(t.dtype)] for t in tensors]


class _OneOpModule(torch.nn.Module):
    """Calls one OpOverload; tensor arguments come in as inputs, everything else is baked in."""

    def __init__(self, func: torch._ops.OpOverload, spec: Any, mutated: set[int], box: dict):
        super().__init__()
        self.func, self.spec, self.mutated = func, spec, mutated
        self.box = box  # export restores module attributes it sees assigned: results go into this dict

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # An argument the op writes to is cloned first, so the graph is functional and returns the result.
        ts = [t.clone() if i in self.mutated else t for i, t in enumerate(tensors)]
        args = tuple(decode_value(a, ts) for a in self.spec["args"])
        kwargs = {k: decode_value(v, ts) for k, v in self.spec["kwargs"].items()}
        out = self.func(*args, **kwargs)
        leaves: list[torch.Tensor] = []
        try:
            self.box["out_spec"] = encode_value(out, leaves)
        except Unserializable as e:  # a symbolic scalar: no graph can return it
            self.box["error"] = str(e)
            return ()
        return tuple(leaves)


@dataclass
class OneOp:
    """A call ready to become a one-op graph: the module that makes it and its example inputs (the call's own
    tensors, detached; contiguous copies unless the stack takes layouts)."""

    op: str
    module: _OneOpModule
    inputs: list[torch.Tensor]
    box: dict = field(default_factory=dict)

    @property
    def out_spec(self) -> Any:
        return self.box.get("out_spec")


def one_op(call: OpCall, layouts: bool = False) -> OneOp:
    """The one-op graph of `call`; Unlowerable when an argument cannot be baked in."""
    func = call.func()
    try:
        spec, tensors = encode_args(call.args, call.kwargs)
    except Unserializable as e:
        raise Uncapturable(f"argument cannot be baked into a graph: {e}") from None
    mutated: set[int] = set()
    written = set(mutated_args(func))
    if written:
        vals = [call.kwargs.get(a.name) if a.kwarg_only or i >= len(call.args) else call.args[i]
                for i, a in enumerate(func._schema.arguments) if a.name in written]
        ids = {id(v) for v in pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)}
        mutated = {i for i, t in enumerate(tensors) if id(t) in ids}
    box: dict[str, Any] = {}
    inputs = [t.detach() if layouts else t.detach().contiguous() for t in tensors]
    return OneOp(call.op, _OneOpModule(func, spec, mutated, box), inputs, box)


def output_dtypes(outs: Any) -> list[str]:
    return [str(o.dtype).removeprefix("torch.") for o in outs]


@dataclass
class Traced:
    """Many one-op graphs traced as one ATen graph: inputs and outputs laid end to end, member by member."""

    graph: torch.fx.GraphModule
    inputs: list[torch.Tensor]
    # per member: first_input, inputs, first_output, outputs, out_spec, out_dtypes; `refused` when it returns no
    # tensor a graph can return
    members: list[dict]


def trace_many(ops: list[OneOp]) -> Traced:
    """One ATen graph (make_fx, real tensors) computing every op on its own inputs; the members share nothing,
    so a compiler lowers each as it would alone. Uncapturable when the trace fails (a caller with many splits)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = [t for op in ops for t in op.inputs]
    members: list[dict] = []
    start = 0
    for op in ops:
        members.append({"first_input": start, "inputs": len(op.inputs)})
        start += len(op.inputs)

    def forward(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs: list[torch.Tensor] = []
        for op, m in zip(ops, members):
            got = op.module(*flat[m["first_input"]: m["first_input"] + m["inputs"]])
            m.update(first_output=len(outs), outputs=len(got), out_dtypes=output_dtypes(got))
            outs.extend(got)
        return tuple(outs)

    try:
        with quiet():
            graph = make_fx(forward)(*inputs)
    except ENVIRONMENT:
        raise
    except Exception as e:
        what = ops[0].op if len(ops) == 1 else f"{len(ops)} ops"
        raise Uncapturable(f"cannot trace {what} into a graph: {first_line(e)}") from None
    for op, m in zip(ops, members):
        if "error" in op.box:
            m["refused"] = f"{op.op} returns a {op.box['error']}; a compiled graph returns tensors only"
        elif not m["outputs"]:
            m["refused"] = (f"{op.op} returns no tensor (a Python scalar or nothing); a compiled graph returns "
                            "tensors only")
        m["out_spec"] = op.out_spec
    return Traced(graph, inputs, members)

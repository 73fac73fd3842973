"""Workload: a model and the job to run on it (a zoo name or `file.py:make_model`, resolved here), and the
`Location` that says where a run is (module path, phase) for every mode that watches one (the Recorder, MixedRun),
and the one place that decides a run's precision (`set_precision`: --dtype, --weights).

It builds and describes runs; it must not record, route or judge ops.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.errors import TapmlError

# --dtype: what the model's floating parameters, buffers and inputs are cast to (the reference runs in it).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# --weights: `float`, the model's own weights in its dtype; `q4_0`, its linear layers as GGUF Q4_0 blocks
# (tapml.zoo.quant) dequantized to the activations' dtype at every forward.
WEIGHTS = ("float", "q4_0")


@dataclass
class Workload:
    """A model and the job to run on it (what the zoo's ModelSpec.prepare and user files produce), and the
    precision it runs in (`set_precision`)."""

    model: torch.nn.Module
    run: Callable[[], Any]
    generates: bool
    description: str
    dtype: str = "float32"  # the floating dtype of its parameters and floating inputs
    weights: str = "float"  # one of WEIGHTS

    @property
    def precision(self) -> dict[str, str]:
        """What a carve's run records of it: the settings that are not the default (float32, float weights)."""
        out = {}
        if self.dtype != "float32":
            out["dtype"] = self.dtype
        if self.weights != "float":
            out["weights"] = self.weights
        return out


def check_precision(dtype: str | None = None, weights: str = "float") -> None:
    """A bad --dtype or --weights is a TapmlError naming the choices."""
    if dtype is not None and dtype not in DTYPES:
        raise TapmlError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if weights not in WEIGHTS:
        raise TapmlError(f"unknown --weights {weights!r}; choose float (the model's own) or q4_0 (GGUF Q4_0 "
                         "4-bit blocks)")


def set_precision(model: torch.nn.Module, dtype: str | None = None, weights: str = "float") -> str:
    """Put `model` in a precision, in place, and return its dtype's name. With weights `q4_0` its linear layers
    become Q4_0 blocks (quantized from the weights it has, before any cast); then, when `dtype` is given, every
    floating parameter and buffer is cast to it (the packed blocks are uint8 and stay). The one place a
    Workload's precision is decided: the zoo's ModelSpec.prepare and user files both come here, then make their
    floating inputs in the model's dtype (`floating_dtype`)."""
    check_precision(dtype, weights)
    if weights == "q4_0":
        from tapml.zoo.quant import quantize_q4_0

        if not quantize_q4_0(model):
            raise TapmlError("--weights q4_0: the model has no linear layer whose in_features is a multiple of 32 "
                             "to quantize; leave --weights out")
    if dtype is not None:
        model.to(DTYPES[dtype])
    return str(floating_dtype(model)).removeprefix("torch.")


def floating_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's floating parameters and buffers (the first one's; float32 when it has none)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def describe_precision(dtype: str, weights: str = "float") -> str:
    """How a run's precision reads in a workload's description and `tapml show`."""
    return f"Q4_0 weights, {dtype} activations" if weights == "q4_0" else dtype


def load_workload(model: str, prompt: str | None = None, max_new_tokens: int = 8, dtype: str | None = None,
                  weights: str = "float") -> tuple[str, Any]:
    """Resolve MODEL: a zoo name (`llama`, `zoo:llama`) or `path/to/file.py:make_model`, in `dtype` (None: as
    built: float32 for the zoo, a user file's own) with `weights` (`set_precision`).

    Returns (canonical name, workload). `make_model()` must return `(model, inputs)`; the run is
    `model(*inputs)` under torch.no_grad().
    """
    check_precision(dtype, weights)
    if ".py:" in model or model.endswith(".py"):
        return model, load_user_model(model, dtype, weights)
    from tapml import zoo

    spec = zoo.get(model)
    try:
        return spec.name, spec.prepare(prompt=prompt, max_new_tokens=max_new_tokens, dtype=dtype, weights=weights)
    except TapmlError:
        raise
    except Exception as e:
        raise TapmlError(f"zoo model {spec.name} failed to build: {type(e).__name__}: {e}") from None


def load_user_model(ref: str, dtype: str | None = None, weights: str = "float") -> Workload:
    path_s, _, fn_name = ref.rpartition(":") if ".py:" in ref else (ref, ":", "")
    path = Path(path_s)
    if not fn_name:
        raise TapmlError(f"{ref}: name the factory function, e.g. {ref}:make_model")
    if not path.is_file():
        raise TapmlError(f"{path}: no such model file; expected path/to/file.py:make_model")
    mod_name = f"tapml_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise TapmlError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise TapmlError(f"{path}: importing it raised {type(e).__name__}: {e}") from None
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise TapmlError(f"{path} has no function {fn_name}(); it must return (model, inputs)")
    try:
        made = factory()
    except Exception as e:
        raise TapmlError(f"{ref}() raised {type(e).__name__}: {e}") from None
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise TapmlError(f"{ref}() must return (model: torch.nn.Module, inputs: tuple); got {type(made).__name__}")
    model, inputs = made
    inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    model.eval()
    name = set_precision(model, dtype, weights)
    if dtype is not None:
        to = DTYPES[dtype]
        inputs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(to) if t.is_floating_point() else t, inputs)
    what = f"{fn_name}() from {path.name}: model(*inputs)"
    if dtype is not None or weights != "float":
        what += f"; {describe_precision(name, weights)}"
    return Workload(model, lambda: model(*inputs), False, what, name, weights)


@dataclass(slots=True)
class Location:
    """Where a run is now: the path of the innermost module running (`model.layers.1.mlp`) and the phase
    (`forward`; for generating workloads `prefill`, then `decode:0`, `decode:1`, ...). One object, written by
    the forward hooks `track` installs and read by whichever dispatch mode watches the run."""

    module: str = "<none>"
    phase: str = "forward"
    step: int = 0  # forward passes of the top module so far


def phase_of(workload: Workload, step: int) -> str:
    if not workload.generates:
        return "forward"
    return "prefill" if step == 0 else f"decode:{step - 1}"


def track(stack: ExitStack, workload: Workload, on_step: Callable[[], None] | None = None) -> Location:
    """Install forward hooks on every submodule (removed when `stack` closes) and return the Location they keep
    up to date; `on_step` runs after each forward pass of the top module (a progress bar)."""
    where = Location(phase=phase_of(workload, 0))
    names = {id(m): n for n, m in workload.model.named_modules()}
    outer: list[str] = []
    top = workload.model

    def pre(mod, _args):
        outer.append(where.module)
        where.module = names.get(id(mod), "") or type(mod).__name__

    def post(mod, _args, _out):
        where.module = outer.pop() if outer else "<none>"
        if mod is top:
            where.step += 1
            where.phase = phase_of(workload, where.step)
            if on_step is not None:
                on_step()

    for m in workload.model.modules():
        stack.callback(m.register_forward_pre_hook(pre).remove)
        stack.callback(m.register_forward_hook(post).remove)
    return where

"""Workload: a model and the job to run on it (a zoo name or `file.py:make_model`, resolved here), and the
`Location` that says where a run is (module path, phase) for every mode that watches one (the Recorder, MixedRun).

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

from tapml.errors import TapmlError


@dataclass
class Workload:
    """A model and the job to run on it (what the zoo's ModelSpec.prepare and user files produce)."""

    model: torch.nn.Module
    run: Callable[[], Any]
    generates: bool
    description: str


def load_workload(model: str, prompt: str | None = None, max_new_tokens: int = 8) -> tuple[str, Any]:
    """Resolve MODEL: a zoo name (`llama`, `zoo:llama`) or `path/to/file.py:make_model`.

    Returns (canonical name, workload). `make_model()` must return `(model, inputs)`; the run is
    `model(*inputs)` under torch.no_grad().
    """
    if ".py:" in model or model.endswith(".py"):
        return model, load_user_model(model)
    from tapml import zoo

    spec = zoo.get(model)
    try:
        return spec.name, spec.prepare(prompt=prompt, max_new_tokens=max_new_tokens)
    except TapmlError:
        raise
    except Exception as e:
        raise TapmlError(f"zoo model {spec.name} failed to build: {type(e).__name__}: {e}") from None


def load_user_model(ref: str) -> Workload:
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
    return Workload(model, lambda: model(*inputs), False, f"{fn_name}() from {path.name}: model(*inputs)")


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

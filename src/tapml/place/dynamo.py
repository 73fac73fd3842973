"""`torch.compile(model, backend="tapml")`: a dynamo backend (inference) that places each captured graph with
`tapml.place.place` on the backends in `options={"backends": [...], "device": ..., "budget": ...}` (or the
TAPML_PLACE_BACKENDS / TAPML_PLACE_BUDGET environment variables) and runs the placed model.

It must not hold any search logic; registered through the `torch_dynamo_backends` entry point (or `register()`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch


def tapml_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                  **kwargs: Any) -> Callable[..., Any]:
    """Dynamo calls this with each captured graph; returns the placed model's forward (no_grad inference)."""
    from tapml.place.api import place

    opts = {**(options or {}), **kwargs}
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if len(tensors) != len(example_inputs):  # symbolic sizes: leave the graph to eager PyTorch
        return gm.forward
    device = opts.get("device") or (str(tensors[0].device) if tensors else "cpu")
    env = os.environ.get("TAPML_PLACE_BACKENDS")
    backends = opts.get("backends") or (env.split(",") if env else None)
    budget = float(opts.get("budget", os.environ.get("TAPML_PLACE_BUDGET", "10")))
    placement = place(gm, tensors, backends=backends, device=device, budget=budget,
                      repeats=int(opts.get("repeats", 20)), cost_cache=opts.get("cost_cache", True))
    placed = placement.placed
    tapml_backend.last = placement  # type: ignore[attr-defined]  # the latest placement, for a report

    def run(*args: Any) -> Any:
        out = placed(*args)
        return out if isinstance(out, (tuple, list)) else (out,)

    return run


def register() -> None:
    """Register "tapml" with dynamo in this process (what the entry point does when the package is installed)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "tapml" not in _BACKENDS:
        register_backend(tapml_backend, name="tapml")

"""`ModelSpec`: one zoo entry — how to build the model (fixed seed) and the Workload that drives it. It must not
hold a model's code or inputs itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

from tapml.errors import TapmlError
from tapml.workload import check_precision, describe_precision, set_precision

KINDS = ("llm", "encoder", "vision", "seq2seq", "speech", "contrastive", "vlm")


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry. `make(device)` builds the module (on "meta" only to count parameters)."""

    name: str
    architecture: str  # the transformers class that runs it
    kind: str  # one of KINDS
    summary: str
    make: Callable[[], torch.nn.Module] = field(repr=False)
    # (spec, model, prompt, max_new_tokens) -> Workload; it makes any floating input in the model's dtype
    workload: Callable[..., Any] = field(repr=False)
    count: Callable[[], int] | None = field(default=None, repr=False)

    def build(self) -> torch.nn.Module:
        """The model with its fixed-seed (or real) weights, in eval mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = self.make()
        return model.eval()

    def parameters(self) -> int:
        return _count(self)

    def prepare(self, prompt: str | None = None, max_new_tokens: int = 8, dtype: str | None = None,
                weights: str = "float"):
        """The Workload that `tapml carve` runs: the built model and its realistic inputs, in `dtype` (None: as
        built, float32) with `weights` (`float`, or `q4_0`: GGUF Q4_0 linear layers; `workload.set_precision`)."""
        if max_new_tokens < 1:
            raise TapmlError(f"--max-new-tokens must be ≥ 1 (got {max_new_tokens})")
        if prompt is not None and not prompt.strip():
            raise TapmlError("--prompt is empty; give some text or leave it out for the shipped prompts")
        if prompt is not None and self.kind == "vision":
            raise TapmlError(f"{self.name} is a vision model: it takes photos, not --prompt")
        check_precision(dtype, weights)
        model = self.build()
        name = set_precision(model, dtype, weights)
        work = self.workload(self, model, prompt, max_new_tokens)
        work.dtype, work.weights = name, weights
        if (name, weights) != ("float32", "float"):
            work.description += f"; {describe_precision(name, weights)}"
        return work


@cache
def _count(spec: ModelSpec) -> int:
    if spec.count is not None:
        return spec.count()
    with torch.device("meta"):
        model = spec.make()
    return sum(p.numel() for p in model.parameters())

"""Whole-graph checks: compile a model's whole exported forward with a compiler backend and judge its output
(logits) against PyTorch by the verdict rules of compare.py, with the model run in float64 as the oracle.

It must not fall back to PyTorch for any part of the compiled run; the backend raises when it cannot compile.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.backends import get_backend
from tapml.compare import Verdict, compare_tensor
from tapml.frontends import forward_program


@dataclass
class ModelCheck:
    model: str
    backend: str
    description: str
    verdict: Verdict
    compile_seconds: float
    compiles: int  # compiles this check did (0: the artifact came from the on-disk cache)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "backend": self.backend, "description": self.description,
                "verdict": self.verdict.as_dict(), "compile_seconds": round(self.compile_seconds, 3),
                "compiles": self.compiles}


def _widen(x: Any) -> Any:
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def check_model(model: str, backend: str, prompt: str | None = None, **options: Any) -> ModelCheck:
    """Compile MODEL's whole forward with BACKEND (options go to the backend) and judge its output."""
    prog = forward_program(model, prompt)
    be = get_backend(backend, **options)
    try:
        program = prog.export()
        inputs = prog.inputs()
        with torch.no_grad():
            ref = prog.module(*prog.args, **prog.kwargs)
            wide = copy.deepcopy(prog.module).double()
            oracle = wide(*pytree.tree_map(_widen, prog.args), **pytree.tree_map(_widen, prog.kwargs))
        start = time.perf_counter()
        run = be.compile_program(program, inputs)
        seconds = time.perf_counter() - start
        out = run(*inputs)[0]
        if prog.valid is not None:
            out, ref, oracle = out[prog.valid], ref[prog.valid], oracle[prog.valid]
        verdict = compare_tensor(out, ref, oracle)
        return ModelCheck(prog.name, be.name, prog.description, verdict, seconds, be.compiles)
    finally:
        be.close()

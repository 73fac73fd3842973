"""`inductor`: TorchInductor as a target. An op (or a whole model) is traced to an ATen graph (make_fx), compiled
by `torch._inductor.standalone_compile` (C++ kernels on the CPU) and saved as an artifact on disk.

A graph whose generated code calls ATen itself (an inductor fallback kernel or an extern library kernel such
as `extern_kernels.mm`) is reported unsupported: that op would run in PyTorch, not in code inductor generated.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind

from tapml.backends.compilers import Capture, CompilerBackend, Runner, Unlowerable, first_line, quiet

# Lines of inductor's generated wrapper that run a kernel it did not generate.
_ATEN_CALL = re.compile(r"^\s*(?:\w+\s*=\s*)?(torch\.ops\.aten\.[\w.]+|aten\.[\w.]+|extern_kernels\.\w+)\(", re.MULTILINE)


class InductorBackend(CompilerBackend):
    name = "inductor"
    description = "TorchInductor (standalone_compile, generated C++ kernels on the CPU; ATen fallbacks refused)"

    def _versions(self) -> dict[str, str]:
        return {"torch": version("torch")}

    def _compile(self, cap: Capture, out: Path) -> dict:
        from torch._inductor import standalone_compile
        from torch.fx.experimental.proxy_tensor import make_fx

        program = cap.program
        graph = program.graph_module
        # The graph's placeholders: lifted weights/buffers/constants, then the user inputs. The weights stay graph
        # inputs (saved beside the artifact), so the compiled code and its cache entry hold no tensor constants.
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
                art = standalone_compile(gm, example, dynamic_shapes="from_example_inputs")
                art.save(path=str(out / "artifact"), format="unpacked")
        except Exception as e:
            raise Unlowerable(f"inductor cannot compile it: {first_line(e)}") from None
        if weights:
            from safetensors.torch import save_file

            save_file(weights, str(out / "weights.safetensors"))
        source = "\n".join(p.read_text() for p in (out / "artifact").rglob("*.py"))
        calls = sorted(set(_ATEN_CALL.findall(source)))
        if calls and not cap.whole:
            raise Unlowerable(f"inductor generates no kernel for it: its code calls {', '.join(calls)} "
                              "(an ATen kernel)")
        return {"aten_calls": calls, "arity": len(specs)}

    def _load(self, path: Path, meta: dict) -> Runner:
        from torch._inductor import CompiledArtifact

        with quiet():
            art = CompiledArtifact.load(path=str(path / "artifact"), format="unpacked")

        weights: dict[str, torch.Tensor] = {}
        if (path / "weights.safetensors").exists():
            from safetensors.torch import load_file

            weights = load_file(str(path / "weights.safetensors"))

        def run(handles: list[Any]) -> list[Any]:
            users = iter(handles)
            args = [weights[f"w{i}"] if f"w{i}" in weights else next(users) for i in range(meta.get("arity", 0))]
            out = art(*(args or handles))
            return list(out) if isinstance(out, (tuple, list)) else [out]

        return run

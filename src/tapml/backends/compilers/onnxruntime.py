"""`onnxruntime`: an op (or a whole model) exported by torch's ONNX exporter (dynamo, no TorchScript
fallback) and run by ONNX Runtime's CPU execution provider. It must not run anything through PyTorch.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from tapml.backends.compilers import (
    ENVIRONMENT,
    Capture,
    CompilerBackend,
    Runner,
    Unlowerable,
    first_line,
    numpy_of,
    quiet,
)
from tapml.backends.compilers import torch_of as _torch_of

# SessionOptions set on every session: part of the cache key (a verdict of "cannot load" depends on them).
_SESSION_DEFAULTS = {"graph_optimization_level": "ORT_ENABLE_ALL"}


class OnnxRuntimeBackend(CompilerBackend):
    name = "onnxruntime"
    description = "torch.onnx (dynamo exporter) + ONNX Runtime, CPU execution provider"

    def __init__(self, cache_dir: str | None = None, provider: str = "CPUExecutionProvider",
                 session_options: dict[str, Any] | None = None):
        """session_options: onnxruntime.SessionOptions attributes, e.g. {"graph_optimization_level":
        "ORT_DISABLE_ALL", "intra_op_num_threads": 1} (enums by name)."""
        super().__init__(cache_dir)
        self.provider = provider
        self.session_config = {**_SESSION_DEFAULTS, **(session_options or {})}
        self._options()  # a bad name or value fails here, before anything compiles

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            return f"{e.name} is not installed: pip install 'tapml[onnxruntime]'"
        return None

    def _versions(self) -> dict[str, str]:
        return {p: version(p) for p in ("torch", "onnx", "onnxscript", "onnxruntime")}

    def _target(self) -> str:
        return self.provider

    def _config(self) -> Any:
        return {"session": sorted((k, repr(v)) for k, v in self.session_config.items())}

    def _options(self) -> Any:
        import onnxruntime as ort

        from tapml.errors import TapmlError

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        enums = {"graph_optimization_level": ort.GraphOptimizationLevel, "execution_mode": ort.ExecutionMode}
        for k, v in self.session_config.items():
            try:
                setattr(opts, k, getattr(enums[k], v) if k in enums and isinstance(v, str) else v)
            except (AttributeError, TypeError) as e:
                raise TapmlError(f"bad ONNX Runtime session option {k}={v!r}: {first_line(e)}") from None
        return opts

    def _compile(self, cap: Capture, out: Path) -> dict:
        try:
            with quiet():
                # One-op graphs skip the optimizer, so constant folding cannot compute an op ahead of the runtime.
                onx = _export(cap.program, optimize=cap.whole)
        except ENVIRONMENT:
            raise
        except Exception as e:
            raise Unlowerable(_export_reason(e)) from None
        if onx is None:
            raise Unlowerable("the ONNX exporter produced no model")
        path = out / "model.onnx"
        onx.save(str(path))
        self._session(path)  # a model ONNX Runtime cannot load is unsupported, found here rather than at run
        return {"inputs": [s.arg.name for s in cap.program.graph_signature.input_specs
                           if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]}

    def _session(self, path: Path) -> Any:
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(path), self._options(), providers=[self.provider])
        except ENVIRONMENT:
            raise
        except Exception as e:
            raise Unlowerable(_runtime_reason(e)) from None

    def _load(self, path: Path, meta: dict) -> Runner:
        sess = self._session(path / "model.onnx")
        present = {i.name for i in sess.get_inputs()}
        names = meta["inputs"]

        def run(handles: list[Any]) -> list[Any]:
            feed = {n: h for n, h in zip(names, handles) if n in present}
            return sess.run(None, feed)

        return run

    def to_native(self, t: torch.Tensor) -> Any:
        return numpy_of(t)

    def from_native(self, x: Any) -> torch.Tensor:
        return _torch_of(x)

    def is_handle(self, x: Any) -> bool:
        import numpy as np

        return isinstance(x, np.ndarray)


@cache
def _exporter() -> tuple[Any, Any] | None:
    """torch's ONNX registry and decomposition table, built once per process (the public `torch.onnx.export`
    rebuilds both on every call: ~1 s, most of a one-op export). None when torch's internals moved."""
    try:
        from torch.onnx._internal.exporter import _constants, _decomp, _registration

        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision x4
        registry = _registration.ONNXRegistry().from_torchlib(opset_version=_constants.TORCHLIB_OPSET)
        table = _decomp.create_onnx_friendly_decomposition_table(
            set(_decomp.get_onnx_implemented_overloads(registry)))
        return registry, table
    except Exception:
        return None


def _export(program: torch.export.ExportedProgram, optimize: bool) -> Any:
    """The dynamo ONNX exporter's own steps (decompose, type promotion, translate) with cached tables."""
    pre = _exporter()
    if pre is None:
        return torch.onnx.export(program, dynamo=True, optimize=optimize, verbose=False, report=False)
    from torch.onnx._internal.exporter import _core, _fx_passes

    registry, table = pre
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        if not _translatable(program, registry):
            program = program.run_decompositions(table)
        gm = program.graph_module
        _fx_passes.insert_type_promotion_nodes(gm)
        program._graph_module = _fx_passes.remove_assertion_nodes(gm)
    onx = _core._exported_program_to_onnx_program(program, registry=registry)
    if optimize:
        onx.optimize()
    return onx


def _translatable(program: torch.export.ExportedProgram, registry: Any) -> bool:
    """True when every op has an ONNX translation and none mutates: decomposing (~0.5 s) would change nothing."""
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        if not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable or not registry.is_registered(t):
            return False
    return True


def _export_reason(e: BaseException) -> str:
    chain, c = [], e
    while c is not None and len(chain) < 5:
        chain.append(str(c))
        c = c.__cause__
    text = "\n".join(chain)
    m = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", text)
    if m:
        return f"the ONNX exporter has no lowering for {m.group(1)}.{m.group(2)}"
    m = re.search(r"(?:No decompositions registered|no (?:ONNX )?(?:function|translation|decomposition)s? "
                  r"(?:found|registered|available)?\s*for)[^\n]*?((?:aten|prims)[:.]{1,2}[\w.]+)", text, re.IGNORECASE)
    if m:
        return f"the ONNX exporter has no lowering for {m.group(1).replace('::', '.')}"
    m = re.search(r"Unsupported FX nodes: \{'call_function': \[([^\]]*)\]", text)
    if m:
        return f"the ONNX exporter has no lowering for {m.group(1).replace(chr(39), '')}"
    return f"the ONNX exporter failed: {first_line(e)}"


def _runtime_reason(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"Could not find an implementation for (\w+\(\d+\)) node with name", text)
    if m:
        return f"ONNX Runtime has no CPU kernel for {m.group(1)} with these types"
    return f"ONNX Runtime cannot load the exported model: {first_line(text.split(' : ')[-1])}"

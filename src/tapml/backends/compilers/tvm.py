"""`tvm`: Apache TVM (Relax) as a target. An ATen op (or a whole model) is imported with the Relax frontend
`from_exported_program`, built for the target (`llvm` options, `cuda`) and run in the Relax VM; a TIR kernel
case carved by `tapml carve --frontend tvm` is rebuilt from its TVMScript for the target and called directly.
It must not run anything through PyTorch.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from tapml.backends.compilers import (
    ENVIRONMENT,
    KERNEL_NAMESPACE,
    Capture,
    Compiled,
    CompilerBackend,
    Runner,
    Unlowerable,
    digest,
    first_line,
    is_core,
    numpy_of,
    quiet,
    torch_of,
)
from tapml.errors import TapmlError
from tapml.ops import OpCall


class TVMBackend(CompilerBackend):
    name = "tvm"
    description = "Apache TVM Relax (from_exported_program → tvm.compile → Relax VM); target llvm or cuda"

    def __init__(self, target: str = "llvm", cache_dir: str | None = None):
        super().__init__(cache_dir)
        import tvm

        try:
            self.target = tvm.target.Target(parse_target(target))
        except Exception as e:
            raise TapmlError(f"bad TVM target {target!r}: {first_line(e)[:200]} (e.g. 'llvm', "
                             "'llvm -mcpu=skylake -opt-level=2', 'cuda', or TVM's JSON form)") from None
        self.target_text = target
        kind = self.target.kind.name
        self.device = tvm.cpu() if kind == "llvm" else tvm.device(kind, 0)
        if not self.device.exist:
            raise TapmlError(f"TVM target {target!r} needs a {kind} device, and this machine has none")

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import tvm  # noqa: F401
            from tvm.relax.frontend.torch import from_exported_program  # noqa: F401
        except ImportError as e:
            return f"{e.name} is not installed: pip install 'tapml[tvm]'"
        return None

    def _versions(self) -> dict[str, str]:
        return {p: version(p) for p in ("torch", "apache-tvm")}

    def _target(self) -> str:
        return str(self.target)

    def _config(self) -> Any:
        """The pass configuration a build runs under (PassContext: opt level, config, required/disabled)."""
        import tvm

        ctx = tvm.transform.PassContext.current()
        return {"opt_level": int(ctx.opt_level), "config": {str(k): str(v) for k, v in ctx.config.items()},
                "required": sorted(str(p) for p in ctx.required_pass),
                "disabled": sorted(str(p) for p in ctx.disabled_pass)}

    # residency ------------------------------------------------------------------------------------------------
    def to_native(self, t: torch.Tensor) -> Any:
        import tvm

        return tvm.runtime.tensor(numpy_of(t), self.device)

    def from_native(self, x: Any) -> torch.Tensor:
        return torch_of(x.numpy())

    def is_handle(self, x: Any) -> bool:
        import tvm

        return isinstance(x, tvm.runtime.Tensor)

    def handle_meta(self, h: Any) -> tuple[list[int], torch.dtype]:
        return [int(d) for d in h.shape], getattr(torch, str(h.dtype))

    # one-op graphs and whole models ---------------------------------------------------------------------------
    def _compile(self, cap: Capture, out: Path) -> dict:
        import tvm
        from tvm.relax.frontend.torch import from_exported_program

        try:
            with quiet():
                mod = from_exported_program(cap.program, run_ep_decomposition=not is_core(cap.program))
        except ENVIRONMENT:
            raise
        except Exception as e:
            raise Unlowerable(_frontend_reason(e)) from None
        try:
            with quiet():
                ex = tvm.compile(mod, target=self.target)
                ex.export_library(str(out / "lib.so"))
        except ENVIRONMENT:
            raise
        except Exception as e:
            raise Unlowerable(f"TVM cannot build it for {self.target_text}: {first_line(e)}") from None
        return {}

    def _load(self, path: Path, meta: dict) -> Runner:
        import tvm
        from tvm import relax

        vm = relax.VirtualMachine(tvm.runtime.load_module(str(path / "lib.so")), self.device)
        main = vm["main"]

        def run(handles: list[Any]) -> list[Any]:
            return _flatten(main(*handles))

        return run

    # TIR kernel cases -----------------------------------------------------------------------------------------
    def supports(self, call: OpCall) -> str | None:
        if not call.op.startswith(KERNEL_NAMESPACE + "."):
            return super().supports(call)
        compiled = self._kernel(call)
        return None if compiled.ok else compiled.reason

    def execute(self, call: OpCall) -> Any:
        if not call.op.startswith(KERNEL_NAMESPACE + "."):
            return super().execute(call)
        compiled = self._kernel(call)
        if not compiled.ok:
            raise TapmlError(f"tvm cannot run kernel {call.op}: {compiled.reason}")
        handles = [self.upload(t) for t in call.args]
        compiled.runner(handles)
        return tuple(self.download(handles[i]) for i in call.kwargs["writes"])

    def _kernel(self, call: OpCall) -> Compiled:
        source = kernel_source(call)
        name = call.op.split(".")[1]
        key = digest("kernel", self._target(), version("apache-tvm"), name, source)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self._obtain_kernel(key, name, source)
        return hit

    def _obtain_kernel(self, key: str, name: str, source: str) -> Compiled:
        found = self.cache.get(key)
        if found is None:
            def build(tmp: Path) -> dict:
                self.compiles += 1
                type(self).compiles += 1
                try:
                    build_kernel(source, name, self.target, tmp / "kernel.so")
                    return {"ok": True, "kernel": name}
                except Unlowerable as e:
                    return {"ok": False, "reason": str(e)}

            meta, path = self.cache.put(key, build)
        else:
            meta, path = found
            self.disk_hits += 1
            type(self).disk_hits += 1
        if not meta.get("ok"):
            return Compiled(False, meta.get("reason", "build failed"), meta=meta)
        import tvm

        func = tvm.runtime.load_module(str(path / "kernel.so"))[name]
        return Compiled(True, runner=lambda handles: func(*handles), meta=meta)


def parse_target(text: str) -> Any:
    """`llvm -mcpu=skylake -opt-level=2` (the classic CLI form) or JSON as TVM 0.27 wants it: a dict."""
    import json

    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    kind, *opts = text.split()
    out: dict[str, Any] = {"kind": kind}
    for o in opts:
        key, _, val = o.lstrip("-").partition("=")
        if not val:
            out[key] = True
            continue
        out[key] = int(val) if re.fullmatch(r"-?\d+", val) else val.split(",") if key in ("mattr", "keys") else val
    return out


def kernel_source(call: OpCall) -> str:
    src = call.kwargs.get("source")
    if not isinstance(src, torch.Tensor) or src.dtype != torch.uint8:
        raise TapmlError(f"{call.op} is not a TIR kernel case (no TVMScript source); carve it with --frontend tvm")
    return bytes(src.numpy().tobytes()).decode("utf-8")


def build_kernel(source: str, name: str, target: Any, out: Path) -> None:
    """Parse a PrimFunc's TVMScript, schedule it for a GPU target (dlight defaults) and export it to `out`."""
    import tvm

    try:
        with quiet():
            func = tvm.script.from_source(source)
    except Exception as e:
        raise Unlowerable(f"the recorded TVMScript does not parse in this TVM: {first_line(e)}") from None
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    try:
        with quiet():
            if target.kind.name != "llvm":
                from tvm.s_tir import dlight as dl

                with target:
                    mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                                  dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
            lib = tvm.compile(mod, target=target)
            lib.export_library(str(out))
    except Exception as e:
        raise Unlowerable(f"TVM cannot build kernel {name} for {target}: {first_line(e)}") from None


def _flatten(x: Any) -> list[Any]:
    import tvm

    if isinstance(x, tvm.runtime.Tensor):
        return [x]
    out: list[Any] = []
    for v in x:
        out.extend(_flatten(v))
    return out


def _frontend_reason(e: BaseException) -> str:
    m = re.search(r"Unsupported function types? \[([^\]]*)\]", str(e))
    if m:
        ops = ", ".join("aten." + o.strip(" '\"") for o in m.group(1).split(","))
        return f"the TVM Relax frontend has no converter for {ops}"
    return f"the TVM Relax frontend cannot import it: {first_line(e)}"

"""The `webgpu` backend: ATen ops as WGSL kernels through wgpu (Vulkan: lavapipe on a CPU, or a GPU).

Tensors live on the device as `WGTensor` handles; every op the backend claims is computed by a kernel, and
an op or dtype it cannot run is turned down by `supports` with a reason. It must not fall back to torch.
Layout: `runtime` (device, caches, batching), `kernels/` (one module per kernel family: WGSL beside its
launcher), `transfer` (upload/download), `ops` (the op table) with `pointwise` and `structured` (the
handlers).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tapml.backends import Backend
from tapml.errors import TapmlError, first_line
from tapml.ops import OpCall

_RUNTIMES: dict[str, Any] = {}


def get_runtime(int64: str = "auto") -> Any:
    """The process-wide runtime for an int64 mode (one wgpu device each; creating one takes about a second
    on lavapipe)."""
    rt = _RUNTIMES.get(int64)
    if rt is None:
        os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
        from tapml.backends.webgpu import kernels
        from tapml.backends.webgpu.runtime import Runtime

        rt = Runtime(int64=int64)
        rt.finalize = kernels.finalize
        _RUNTIMES[int64] = rt
    return rt


class WebGPUBackend(Backend):
    name = "webgpu"
    description = "WGSL kernels through wgpu (Vulkan: lavapipe or a GPU)"
    # A call that draws from torch's generator is carved as `random` and reported unsupported here: the
    # kernels cannot reproduce torch's CPU stream. Attention with dropout_p == 0 draws nothing and is not random.
    replays_torch_rng = False

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import wgpu  # noqa: F401
        except ImportError:
            return "the wgpu package is not installed (pip install 'tapml[webgpu]')"
        try:
            get_runtime()
        except TapmlError as e:  # a bad setting (TAPML_WEBGPU_NO_F16=maybe): say that, not "no adapter"
            return str(e)
        except Exception as e:  # no adapter, no Vulkan loader, ...
            return f"no WebGPU adapter: {first_line(e)}"
        return None

    def __init__(self, int64: str = "auto") -> None:
        """int64: "auto" (exact WGSL i64 where the adapter has shader-int64, else narrow), "native" or
        "narrow" (int32 on the device, range-checked on upload: what a browser's WebGPU can do)."""
        # (importing the handler modules registers the op table)
        from tapml.backends.webgpu import bits, ops, pointwise, selection, structured, transfer  # noqa: F401

        self.rt = get_runtime(int64)
        self._ops, self._transfer = ops, transfer

    @property
    def device(self) -> str:
        info = self.rt.info
        return f"{info.get('device', '?')} ({info.get('backend_type', '?')})"

    def int64_bits(self) -> int:
        return 64 if self.rt.int64_native else 32

    def supports(self, call: OpCall) -> str | None:
        return self._ops.check_call(call, self.rt.f16, self.rt.max_binding, self.rt.int64_native)

    def upload(self, t: torch.Tensor, name: str = "tensor") -> Any:
        return self._transfer.upload(self.rt, t, name)

    def download(self, h: Any) -> torch.Tensor:
        return self._transfer.download(self.rt, h)

    def is_handle(self, x: Any) -> bool:
        from tapml.backends.webgpu.runtime import WGTensor

        return isinstance(x, WGTensor)

    def run(self, call: OpCall) -> Any:
        h = self._ops.handler(call.op)
        if h is None:
            raise TapmlError(f"webgpu: no kernel for {call.op}")
        return h.fn(self.rt, *call.args, **call.kwargs)

    def execute(self, call: OpCall) -> Any:
        """Upload (naming each tensor by its schema argument, for clear range errors), run, download; every
        buffer of the call carries a guard band checked at the end (`Runtime.guarded`), so an out-of-bounds
        write is an error of the case rather than invisible."""
        names = [a.name for a in call.func()._schema.arguments]

        def up(x: Any, name: str) -> Any:
            if isinstance(x, torch.Tensor):
                return self.upload(x, name)
            if isinstance(x, (list, tuple)):
                return type(x)(up(v, f"{name}[{i}]") for i, v in enumerate(x))
            return x

        with self.rt.guarded():  # a kernel writing past a tensor's end fails the case (OutOfBounds)
            args = tuple(up(a, names[i] if i < len(names) else f"arg{i}") for i, a in enumerate(call.args))
            kwargs = {k: up(v, k) for k, v in call.kwargs.items()}
            out = self.run(OpCall(call.op, args, kwargs, None, call.provenance, call.rng_state))
            return _tree_download(self, out)

    def sync(self) -> None:
        self.rt.sync()

    def close(self) -> None:
        self.rt.flush()


def _tree_download(be: WebGPUBackend, out: Any) -> Any:
    if be.is_handle(out):
        return be.download(out)
    if isinstance(out, (list, tuple)):
        return type(out)(_tree_download(be, v) for v in out)
    return out

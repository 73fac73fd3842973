"""How each backend compiles a subgraph for a device and how tensors cross into and out of it: eager torch, the
project's compiler backends through `CompilerBackend.compile_program`, and the CUDA variants the compilers' CPU
backends lack (Inductor default and max-autotune, TVM `cuda`, IREE `cuda`).

Tensors cross by DLPack (no copy) where both sides live in the same memory; `host_crossing` says where they cannot.
It must not choose, time or judge anything.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import fx

from tapml.errors import TapmlError, first_line

Compiled = Callable[..., list[torch.Tensor]]


class Unplaceable(Exception):
    """This backend cannot run this subgraph; the message is the reason kept for the report."""


def _versions(*packages: str) -> dict[str, str]:
    out = {}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "-"
    return out


class Engine:
    """A backend as the placement uses it. `compile(module, example, constants)` returns f(*tensors) -> list of
    tensors on the engine's device; `constants` are the positions of inputs that never change (weights)."""

    name = "?"
    host_crossing = False  # inputs and outputs are copied through host memory
    packages: tuple[str, ...] = ("torch",)

    def __init__(self, device: str):
        self.device = torch.device(device)

    def versions(self) -> dict[str, str]:
        return _versions(*self.packages)

    def compile(self, module: fx.GraphModule, example: list[torch.Tensor], constants: set[int]) -> Compiled:
        raise NotImplementedError


class Eager(Engine):
    """The subgraph run op by op by PyTorch on the device (`torch` on the CPU, `torch-cuda` on a GPU)."""

    def __init__(self, device: str):
        super().__init__(device)
        self.name = "torch" if self.device.type == "cpu" else f"torch-{self.device.type}"

    def compile(self, module: fx.GraphModule, example: list[torch.Tensor], constants: set[int]) -> Compiled:
        def run(*xs: torch.Tensor) -> list[torch.Tensor]:
            with torch.no_grad():
                return list(module(*xs))

        return run


class InductorInProcess(Engine):
    """TorchInductor through torch.compile (on CUDA: Triton kernels), `mode` None or "max-autotune"."""

    def __init__(self, device: str, mode: str | None = None):
        super().__init__(device)
        self.mode = mode
        self.name = "inductor" if mode is None else f"inductor-{mode}"
        # hundreds of candidate subgraphs are compiled in one process: dynamo's recompile limits (8 per code
        # object) would silently fall back to eager for the later ones
        cfg = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 100_000))

    def compile(self, module: fx.GraphModule, example: list[torch.Tensor], constants: set[int]) -> Compiled:
        try:
            fn = torch.compile(module, mode=self.mode, fullgraph=True, dynamic=False)
            with torch.no_grad():
                fn(*example)
        except Exception as e:
            raise Unplaceable(f"inductor cannot compile it: {first_line(e)}") from None

        def run(*xs: torch.Tensor) -> list[torch.Tensor]:
            with torch.no_grad():
                return list(fn(*xs))

        return run


class ViaCompilerBackend(Engine):
    """One of the project's compiler backends (`tapml.backends.compilers`), compiled whole with `compile_program`
    (artifacts cached on disk by the backend); its upload/download replaced by DLPack hand-offs where the
    backend's memory is the device's, and weights uploaded once."""

    def __init__(self, device: str, backend: str, name: str | None = None, cache_dir: str | None = None,
                 **options: Any):
        super().__init__(device)
        self.name = name or backend
        self.backend_name = backend
        self.backend = self._open(backend, cache_dir, options)
        self.home = self._home()
        self.host_crossing = self.home is None or self.home != self.device
        self._pinned: dict[int, tuple[torch.Tensor, Any]] = {}
        self._upload, self._download = self.backend.upload, self.backend.download
        self.backend.upload = self._pinned_upload  # compile_program's run() calls these per tensor
        self.backend.download = self._dl_download if self.home is not None else self._download
        if self.home is not None:
            self._upload_one = self._dl_upload
        else:
            self._upload_one = self._upload

    @staticmethod
    def _open(backend: str, cache_dir: str | None, options: dict) -> Any:
        if backend == "iree-cuda":
            from tapml.backends.compilers.iree import IreeCudaBackend

            return IreeCudaBackend(cache_dir=cache_dir)
        from tapml.backends import get_backend

        return get_backend(backend, **({"cache_dir": cache_dir} if cache_dir else {}), **options)

    def _home(self) -> torch.device | None:
        """The torch device whose memory the backend's tensors live in, when DLPack can hand them over."""
        if self.backend_name in ("tvm",):
            kind = self.backend.target.kind.name
            return torch.device("cpu") if kind == "llvm" else torch.device("cuda", 0) if kind == "cuda" else None
        if self.backend_name == "inductor":
            return torch.device("cpu")
        if self.backend_name == "onnxruntime":
            return torch.device("cpu")  # numpy views of CPU tensors: no copy
        return None

    def versions(self) -> dict[str, str]:
        return self.backend._versions() if hasattr(self.backend, "_versions") else {}

    # hand-offs ---------------------------------------------------------------------------------------------
    def _dl_upload(self, t: torch.Tensor) -> Any:
        t = t.detach()
        if self.home is not None and t.device != self.home:
            t = t.to(self.home)
        t = t.contiguous()
        if self.backend_name == "tvm":
            import tvm

            if t.data_ptr() % 64:
                t = t.clone()  # TVM wants 64-byte aligned data
            try:
                return tvm.runtime.from_dlpack(t)
            except Exception:
                return self._upload(t)
        return self._upload(t)

    def _dl_download(self, h: Any) -> torch.Tensor:
        if self.backend_name == "tvm":
            out = torch.from_dlpack(h)
        else:
            out = self._download(h)
        return out if out.device == self.device else out.to(self.device)

    def _pinned_upload(self, t: torch.Tensor) -> Any:
        hit = self._pinned.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        if t.device != (self.home or torch.device("cpu")):
            t = t.to(self.home or "cpu")
        return self._upload_one(t)

    def pin(self, t: torch.Tensor) -> None:
        """Upload a weight once; later calls with the same tensor object reuse the handle."""
        if id(t) not in self._pinned:
            self._pinned[id(t)] = (t, self._upload_one(t if self.home is None or t.device == self.home
                                                       else t.to(self.home)))

    def compile(self, module: fx.GraphModule, example: list[torch.Tensor], constants: set[int]) -> Compiled:
        cpu_side = self.home or torch.device("cpu")
        ex = [x.to(cpu_side) if x.device != cpu_side else x for x in example]
        try:
            with torch.no_grad():
                program = torch.export.export(module, tuple(ex), strict=False)
        except Exception as e:
            raise Unplaceable(f"torch.export cannot capture the subgraph: {first_line(e)}") from None
        try:
            run = self.backend.compile_program(program, ex)
        except TapmlError as e:
            raise Unplaceable(str(e)) from None
        except Exception as e:  # a compiler's own crash on this subgraph: the candidate is out, the search goes on
            raise Unplaceable(f"{self.name} failed: {first_line(e)}") from None
        for i in constants:
            self.pin(example[i])
        device = self.device

        def call(*xs: torch.Tensor) -> list[torch.Tensor]:
            outs = run(*xs)
            return [o if o.device == device else o.to(device) for o in outs]

        return call


def engine(name: str, device: str, cache_dir: str | None = None) -> Engine:
    """The engine for backend `name` on `device` ("cpu", "cuda"); a one-line TapmlError when it cannot run here."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if name in ("torch", "torch-cuda"):
        if (name == "torch-cuda") != cuda:
            raise TapmlError(f"backend {name} runs on {'cuda' if name == 'torch-cuda' else 'cpu'}, not on "
                             f"--device {device}; use {'torch-cuda' if cuda else 'torch'}")
        return Eager(device)
    if name == "inductor-max-autotune" or (name == "inductor" and cuda):
        return InductorInProcess(device, None if name == "inductor" else "max-autotune")
    if name in ("tvm", "tvm-cuda"):
        return ViaCompilerBackend(device, "tvm", name, cache_dir, target="cuda" if cuda else "llvm")
    if name == "iree" and cuda:
        return ViaCompilerBackend(device, "iree-cuda", "iree", cache_dir)
    return ViaCompilerBackend(device, name, name, cache_dir)

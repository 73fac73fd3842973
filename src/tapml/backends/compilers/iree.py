"""`iree` (driver local-task, llvm-cpu code) and `iree-vulkan` (SPIR-V through Vulkan: lavapipe on a machine
without a GPU, the vendor driver on one): an op (or a whole model) imported with IREE's FX importer (torch
dialect), compiled by `iree-compile` to a VM flatbuffer and run by the IREE runtime. Nothing runs in PyTorch.
"""

from __future__ import annotations

import re
from functools import cached_property
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
    is_core,
    numpy_of,
    quiet,
    torch_of,
)


class IreeBackend(CompilerBackend):
    name = "iree"
    description = "IREE: FX importer → iree-compile (llvm-cpu) → runtime driver local-task"
    hal_target = "llvm-cpu"
    driver = "local-task"
    # generic x86-64 code: the artifact runs on any machine sharing the cache (and iree-compile stays quiet)
    compile_flags: tuple[str, ...] = ("--iree-llvmcpu-target-cpu=generic",)

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import iree.compiler  # noqa: F401
            import iree.runtime as rt
        except ImportError as e:
            return f"{e.name} is not installed: pip install 'tapml[iree]'"
        if cls.driver.split("://")[0] not in rt.query_available_drivers():
            return f"this IREE runtime has no {cls.driver} driver"
        return None

    def _versions(self) -> dict[str, str]:
        return {p: version(p) for p in ("torch", "iree-base-compiler", "iree-base-runtime")}

    def _target(self) -> str:
        return f"{self.hal_target}/{self.driver}"

    def _config(self) -> Any:
        return {"iree-compile": [f"--iree-hal-target-backends={self.hal_target}", "--iree-input-type=torch",
                                 *self.compile_flags]}

    @cached_property
    def config(self) -> Any:
        import iree.runtime as rt

        try:
            return rt.Config(self.driver)
        except Exception as e:
            from tapml.errors import TapmlError

            raise TapmlError(f"IREE driver {self.driver} cannot start here: {first_line(e)}") from None

    def _compile(self, cap: Capture, out: Path) -> dict:
        import iree.compiler as ic
        from iree.compiler import ir
        from iree.compiler.extras.fx_importer import FxImporter

        program = cap.program
        try:
            with quiet():
                if not is_core(program):
                    program = program.run_decompositions()
                importer = FxImporter(context=ir.Context())
                importer.import_frozen_program(program)
                mlir = str(importer.module)
        except ENVIRONMENT:
            raise
        except Exception as e:
            raise Unlowerable(f"IREE's FX importer cannot import it: {first_line(e)}") from None
        try:
            vmfb = ic.compile_str(mlir, target_backends=[self.hal_target], input_type="torch",
                                  extra_args=list(self.compile_flags))
        except ENVIRONMENT:
            raise
        except Exception as e:
            raise Unlowerable(_compile_reason(e)) from None
        (out / "module.vmfb").write_bytes(vmfb)
        return {}

    def _load(self, path: Path, meta: dict) -> Runner:
        import iree.runtime as rt

        ctx = rt.SystemContext(config=self.config)
        ctx.add_vm_module(rt.VmModule.copy_buffer(ctx.instance, (path / "module.vmfb").read_bytes()))
        main = ctx.modules.module["main"]

        def run(handles: list[Any]) -> list[Any]:
            out = main(*handles)
            return list(out) if isinstance(out, (tuple, list)) else [out]

        return run

    def to_native(self, t: torch.Tensor) -> Any:
        import iree.runtime as rt

        return rt.asdevicearray(self.config.device, numpy_of(t))

    def from_native(self, x: Any) -> torch.Tensor:
        return torch_of(_to_host(self.config.device, x))

    def is_handle(self, x: Any) -> bool:
        from iree.runtime import DeviceArray

        return isinstance(x, DeviceArray)

    def handle_meta(self, h: Any) -> tuple[list[int], torch.dtype]:
        return list(h.shape), torch_of(_empty_like(h)).dtype


class IreeVulkanBackend(IreeBackend):
    name = "iree-vulkan"
    description = "IREE: FX importer → iree-compile (vulkan-spirv) → runtime driver vulkan"
    hal_target = "vulkan-spirv"
    driver = "vulkan"
    compile_flags: tuple[str, ...] = ()


class IreeCudaBackend(IreeBackend):
    """IREE's `cuda` HAL target and driver, for placements on `--device cuda` (tapml.place opens it; it is not an
    entry-point backend because cases replay through `torch-cuda` there)."""

    name = "iree-cuda"
    description = "IREE: FX importer → iree-compile (cuda) → runtime driver cuda"
    hal_target = "cuda"
    driver = "cuda"
    compile_flags: tuple[str, ...] = ()


def _empty_like(h: Any) -> Any:
    import numpy as np

    return np.empty((0,), dtype=h.dtype)


def _to_host(device: Any, arr: Any) -> Any:
    """Copy a device array to host memory through a staging buffer.

    DeviceArray.to_host() imports host memory into the device when the allocator says it can, and lavapipe
    then rejects the pointer's alignment; a staging copy works on every driver.
    """
    import numpy as np
    from iree.runtime import BufferUsage, HalFence, MemoryType

    view = arr._buffer_view
    src = view.get_buffer()
    host = device.allocator.allocate_buffer(
        memory_type=int(MemoryType.HOST_LOCAL | MemoryType.DEVICE_VISIBLE),
        allowed_usage=int(BufferUsage.TRANSFER_TARGET | BufferUsage.MAPPING_SCOPED),
        allocation_size=src.byte_length())
    sem = device.create_semaphore(0)
    device.queue_copy(src, host, wait_semaphores=HalFence.create_at(sem, 0),
                      signal_semaphores=HalFence.create_at(sem, 1))
    HalFence.create_at(sem, 1).wait()
    raw = arr._get_raw_dtype()
    values = np.array(host.map().asarray(tuple(view.shape), raw), copy=True)
    want = arr.dtype
    return values if values.dtype == want else values.astype(want)


def _compile_reason(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"failed to legalize operation 'torch\.operator'.*?name = \"torch\.(aten\.[\w.]+)\"", text, re.DOTALL)
    if m:
        return f"IREE has no lowering for {m.group(1)} (torch dialect)"
    m = re.search(r"failed to legalize operation '(torch\.[\w.]+)'", text)
    if m:
        return f"IREE has no lowering for {m.group(1).removeprefix('torch.')} (torch dialect)"
    m = re.search(r"error: ([^\n]+)", text)
    if m:
        return f"iree-compile failed: {m.group(1).strip()[:250]}"
    return f"iree-compile failed: {first_line(e)}"

"""`iree` on an NVIDIA GPU: the project's IREE backend with IREE's `cuda` HAL target and runtime driver, for
placements on `--device cuda` (the compilers package ships llvm-cpu and vulkan only). It adds no logic of its own.
"""

from __future__ import annotations

from tapml.backends.compilers.iree import IreeBackend


class IreeCudaBackend(IreeBackend):
    name = "iree-cuda"
    description = "IREE: FX importer → iree-compile (cuda) → runtime driver cuda"
    hal_target = "cuda"
    driver = "cuda"
    compile_flags: tuple[str, ...] = ()

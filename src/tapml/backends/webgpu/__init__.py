"""WebGPU backend (work in progress): placeholder so the entry point resolves and reports why it is unusable."""

from tapml.backends import Backend


class WebGPUBackend(Backend):
    name = "webgpu"
    description = "WGSL kernels through wgpu (Vulkan: lavapipe or a GPU)"

    @classmethod
    def unavailable(cls) -> str | None:
        return "not implemented yet"

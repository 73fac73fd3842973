"""`torch-cuda`: eager PyTorch on a CUDA GPU, the reference's kernels on the mature GPU platform.

A target like any other (it is judged against the CPU float64 oracle); it must not be used as the oracle.
"""

from __future__ import annotations

import torch

from tapml.backends.reference import TorchBackend


class TorchCudaBackend(TorchBackend):
    name = "torch-cuda"
    description = "eager PyTorch on a CUDA GPU"
    replays_torch_rng = False  # seeded ops draw from the CUDA generator: a different stream than the CPU's

    def __init__(self, device: str = "cuda", tf32: bool | None = None):
        """`tf32`: None keeps PyTorch's settings (cuDNN convolutions in TF32, matmuls in full float32);
        False or True sets TF32 off or on for both, process-wide."""
        super().__init__(device)
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32

    @classmethod
    def unavailable(cls) -> str | None:
        if not torch.cuda.is_available():
            return f"no CUDA device (torch {torch.__version__} sees none)"
        return None

    def close(self) -> None:
        torch.cuda.synchronize(self.device)

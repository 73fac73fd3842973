"""The WebGPU kernel library: one module per kernel family, each kernel's WGSL beside its launcher, sharing
`prelude` (WGSL every kernel uses) and `host` (fresh tensors, parameter words).

Handlers call the launchers re-exported here (`kernels.ew`, `kernels.matmul`, ...); nothing in the package
knows ATen ops, and it reaches the device only through the runtime's `kernel` and `dispatch`.
"""

from tapml.backends.webgpu.kernels.bitcast import SIZES as BITCAST_SIZES
from tapml.backends.webgpu.kernels.bitcast import reinterpret
from tapml.backends.webgpu.kernels.conv import convolution, pool2d
from tapml.backends.webgpu.kernels.elementwise import LETTERS, contiguous, copy, ew, fill
from tapml.backends.webgpu.kernels.gemm import grouped_mm, matmul
from tapml.backends.webgpu.kernels.host import bcast_strides, contiguous_strides, new
from tapml.backends.webgpu.kernels.index import gather, histc, isin, scatter
from tapml.backends.webgpu.kernels.norm import layer_norm, softmax
from tapml.backends.webgpu.kernels.prelude import finalize
from tapml.backends.webgpu.kernels.reduction import reduce
from tapml.backends.webgpu.kernels.scan import cumulative
from tapml.backends.webgpu.kernels.sdpa import attention
from tapml.backends.webgpu.kernels.sort import rank_sort

__all__ = ["BITCAST_SIZES", "LETTERS", "attention", "bcast_strides", "contiguous", "contiguous_strides",
           "convolution", "copy", "cumulative", "ew", "fill", "finalize", "gather", "grouped_mm", "histc", "isin",
           "layer_norm", "matmul", "new", "pool2d", "rank_sort", "reduce", "reinterpret", "scatter", "softmax"]

"""Moving tensors between the host and the device: narrowing int64 on the way in (range-checked), widening
it on the way out, bool as u32, bfloat16 as exact f32. The only host-side data work of the backend."""

from __future__ import annotations

import torch

from tapml.backends.webgpu import kernels as K
from tapml.backends.webgpu.runtime import I32_MAX, I32_MIN, Runtime, WGTensor, dtype_reason
from tapml.errors import TapmlError


def upload(rt: Runtime, t: torch.Tensor, name: str = "tensor") -> WGTensor:
    """Copy a host tensor to the device, keeping its strides and offset (a view stays a view of its span)."""
    reason = dtype_reason(t.dtype, rt.f16)
    if reason:
        raise TapmlError(f"webgpu: cannot upload {name} ({t.dtype}{list(t.shape)}): {reason}")
    info = rt.dtypes[t.dtype]
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    n = t.numel()
    if n == 0:
        return WGTensor(rt.alloc(info.size), t.shape, t.stride(), 0, t.dtype)
    if t.dtype == torch.int64 and not rt.int64_native:
        lo, hi = int(t.min()), int(t.max())
        if lo < I32_MIN or hi > I32_MAX:
            bad = lo if lo < I32_MIN else hi
            raise TapmlError(f"webgpu: {name} (int64{list(t.shape)}) holds {bad}, outside the int32 range that "
                             "int64 tensors are narrowed to on WebGPU")
    start = t.storage_offset()
    span = 1 + sum((s_n - 1) * st for s_n, st in zip(t.shape, t.stride()))
    if span > 2 * n + 1024:  # a sparse view of a large storage: send only its elements
        t = t.contiguous()
        start, span = 0, n
    # A small storage offset travels as it is (the kernels see the view's offset, as they do for a view made on
    # the device); a large one is cut away with the elements before it.
    lead = start if start <= n + 1024 else 0
    flat = torch.as_strided(t, (lead + span,), (1,), start - lead)
    data = flat.to(info.host).contiguous() if flat.dtype != info.host else flat.contiguous()
    storage = rt.alloc((lead + span) * info.size)
    rt.write(storage, data.view(torch.uint8).numpy() if data.dtype != torch.bool else data.numpy())
    return WGTensor(storage, t.shape, t.stride(), t.storage_offset() - start + lead, t.dtype)


def download(rt: Runtime, h: WGTensor) -> torch.Tensor:
    """The handle's values as a contiguous CPU tensor of its logical dtype."""
    info = h.info
    n = h.numel()
    if n == 0:
        return torch.empty(h.shape, dtype=h.dtype)
    x = h if h.is_contiguous() else K.copy(rt, h, K.new(rt, h.shape, h.dtype))
    raw = rt.read(x.storage, x.offset * info.size, n * info.size)
    t = torch.frombuffer(bytearray(raw), dtype=info.host).reshape(h.shape)
    if h.dtype == torch.bool:
        return t != 0
    if t.dtype != h.dtype:
        t = t.to(h.dtype)
    return t

"""Reference backends: `torch` (eager PyTorch on the CPU) and `torch64` (the float64 oracle).

`torch64` runs every floating op in float64 (inputs and dtype arguments promoted) so verdicts can measure the
reference's own rounding error; it must not be used as a target's precision model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.backends import Backend
from tapml.ops import OpCall, is_seeded_random

_HALF = {torch.float16, torch.bfloat16, torch.float32}


class TorchBackend(Backend):
    name = "torch"
    description = "eager PyTorch on the CPU (the reference)"
    replays_torch_rng = True

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)

    def upload(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device)

    def download(self, h: torch.Tensor) -> torch.Tensor:
        return h.cpu() if h.device.type != "cpu" else h

    def run(self, call: OpCall) -> Any:
        func = call.func()
        kwargs = dict(call.kwargs)
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs["device"] = self.device
        if is_seeded_random(func, call.args, call.kwargs) and call.rng_state is not None:
            # Replay the recorded generator stream exactly; the caller's global RNG is left untouched.
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(call.rng_state)
                return func(*call.args, **kwargs)
        return func(*call.args, **kwargs)


class Float64Backend(TorchBackend):
    name = "torch64"
    description = "PyTorch in float64 on the CPU (the oracle for verdicts)"

    def __init__(self, device: str = "cpu", narrow: bool = True):
        """`narrow`: round outputs back to the dtypes the op returns in its own precision (as a target does);
        the verdicts' oracle keeps them in float64."""
        super().__init__(device)
        self.narrow = narrow

    def execute(self, call: OpCall) -> Any:
        if is_seeded_random(call.func(), call.args, call.kwargs):
            # A draw in float64 is a different stream; the exact replay in the op's own dtype is the oracle.
            return TorchBackend(str(self.device)).execute(call)
        out = super().execute(call)
        if not self.narrow:
            return out
        try:
            expected = _meta_dtypes(call)
        except Exception:  # no meta kernel: keep the inputs' floating dtype
            floats = [t.dtype for t in call.tensors() if t.is_floating_point()]
            expected = None if not floats else floats[0]
        if isinstance(expected, torch.dtype) or expected is None:
            want = expected
            return pytree.tree_map_only(torch.Tensor, lambda t: t.to(want) if want and t.is_floating_point()
                                        else t, out)
        leaves, spec = pytree.tree_flatten(out)
        return pytree.tree_unflatten([t.to(d) if isinstance(t, torch.Tensor) and isinstance(d, torch.dtype)
                                      else t for t, d in zip(leaves, expected)], spec)

    def upload(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.to(torch.float64)
        if t.is_complex():
            return t.to(torch.complex128)
        return t

    def run(self, call: OpCall) -> Any:
        def widen(x: Any) -> Any:
            if isinstance(x, torch.dtype) and x in _HALF:
                return torch.float64
            if isinstance(x, torch.dtype) and x == torch.complex64:
                return torch.complex128
            return x

        args, kwargs = pytree.tree_map(widen, (call.args, call.kwargs))
        return super().run(OpCall(call.op, args, kwargs, None, call.provenance, call.rng_state))


def oracle() -> Float64Backend:
    """The fp64 oracle every verdict is judged against: float64 all the way, outputs not narrowed back."""
    return Float64Backend(narrow=False)


def _meta_dtypes(call: OpCall) -> list:
    """The dtypes the op returns in its own precision, found by running it on meta tensors."""
    def to_meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    args, kwargs = pytree.tree_map_only(torch.Tensor, to_meta, (call.args, call.kwargs))
    if "device" in kwargs and kwargs["device"] is not None:
        kwargs["device"] = torch.device("meta")
    out = call.func()(*args, **kwargs)
    return [t.dtype if isinstance(t, torch.Tensor) else None for t in pytree.tree_leaves(out)]

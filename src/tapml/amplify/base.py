"""What every kind of amplified variant shares: the call read by its schema names (`_Args`), the `Variant`, the op
families and the tensor helpers. It must not run ops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tapml.ops import OpCall, op_kind

DEFAULT_LIMIT = 12  # variants per sample
# A sample whose inputs are large gets fewer: each variant costs a reference, an oracle and a target run.
ELEMENT_BUDGET, MIN_VARIANTS = 1 << 23, 3
# Tile, workgroup and vector widths kernels are commonly blocked by: lengths just around them reach tails.
TILES = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LONG_CONTEXT = (8192, 131072)
LONG_SCAN = 4096  # a scan's row repeated to this length: the running sum of a long prompt
SHIFT = 1e4  # a shift of this many RMS: rows whose mean dwarfs their spread
SCALE_UP, SCALE_DOWN = 16.0, 1e-3

_ROW = {"aten._softmax", "aten._log_softmax", "aten._safe_softmax", "aten.cumsum", "aten.cumprod", "aten.sort",
        "aten.topk", "aten.argmax", "aten.argmin", "aten.max", "aten.min", "aten.sum", "aten.mean", "aten.amax",
        "aten.amin", "aten.prod", "aten.var", "aten.std", "aten.var_mean", "aten.logsumexp",
        "aten.linalg_vector_norm", "aten.any", "aten.all", "aten.nansum", "aten.cummax", "aten.cummin"}
_SOFTMAX = {"aten._softmax", "aten._log_softmax", "aten._safe_softmax", "aten.logsumexp"}
_SCANS = {"aten.sort", "aten.topk", "aten.cumsum", "aten.cumprod", "aten.cummax", "aten.cummin"}
_NORM = {"aten.native_layer_norm", "aten.native_group_norm", "aten.native_batch_norm",
         "aten._native_batch_norm_legit", "aten._native_batch_norm_legit_no_training"}
_MATMUL = {"aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm", "aten.mv", "aten.dot"}
_SDPA = {"aten._scaled_dot_product_flash_attention_for_cpu", "aten.scaled_dot_product_attention",
         "aten._scaled_dot_product_attention_math"}
# Unary float math whose kernels reduce ranges or saturate: a wider input reaches those paths.
_MATH = {"aten.exp", "aten.exp2", "aten.expm1", "aten.log", "aten.log1p", "aten.log2", "aten.sin", "aten.cos",
         "aten.tan", "aten.tanh", "aten.sigmoid", "aten.silu", "aten.gelu", "aten.erf", "aten.mish",
         "aten.softplus", "aten.elu", "aten.pow", "aten.rsqrt", "aten.sqrt", "aten.reciprocal"}
_CANCEL = {"aten.add", "aten.sub", "aten.rsub"}  # a shared shift cancels: catastrophic cancellation
_INDEX_ARGS = {"indices", "index", "offs", "offsets", "repeats", "target", "lengths", "src_index"}


@dataclass(frozen=True)
class Variant:
    """One amplified call: `name` is short and stable (`cut:dim-1=65`), `description` says how it was made.
    `layout_only`: the same values as the real sample in other layouts, so the reference must give the values
    it gives for contiguous inputs (some CPU kernels assume a layout their callers guarantee)."""

    name: str
    description: str
    call: OpCall
    layout_only: bool = False


# --- the call, by schema names ------------------------------------------------------------------------------

class _Args:
    """A call's arguments by schema name, rebuilt into an OpCall with some of them changed."""

    def __init__(self, call: OpCall) -> None:
        self.call = call
        self.func = call.func()
        self.kind = op_kind(call.op)
        self.schema = {arg.name: arg for arg in self.func._schema.arguments}
        self.names = list(self.schema)
        self.values: dict[str, Any] = dict(zip(self.names, call.args))
        self.values.update(call.kwargs)

    def get(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        arg = self.schema.get(name)
        return arg.default_value if arg is not None and arg.has_default_value() else None

    def tensors(self) -> list[tuple[str, int | None, torch.Tensor]]:
        """(name, index in a list or None, tensor) of every tensor input."""
        out = []
        for name, v in self.values.items():
            if isinstance(v, torch.Tensor):
                out.append((name, None, v))
            elif isinstance(v, (list, tuple)):
                out += [(name, i, t) for i, t in enumerate(v) if isinstance(t, torch.Tensor)]
        return out

    def main(self) -> tuple[str, torch.Tensor] | None:
        for name, i, t in self.tensors():
            if i is None:
                return name, t
        return None

    def with_(self, changes: dict[str, Any]) -> OpCall:
        values = dict(self.values, **changes)
        npos = len(self.call.args)
        args = tuple(values[n] for n in self.names[:npos])
        kwargs = {n: values[n] for n in self.names[npos:] if n in values}
        return OpCall(self.call.op, args, kwargs, None, self.call.provenance, self.call.rng_state)

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> dict[str, Any] | None:
        """The tensor inputs `fn` changes (None: unchanged); None when it changes none."""
        changes: dict[str, Any] = {}
        for name, v in self.values.items():
            if isinstance(v, torch.Tensor):
                new = fn(name, v)
                if new is not None:
                    changes[name] = new
            elif isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v):
                items = [fn(name, t) if isinstance(t, torch.Tensor) else None for t in v]
                if any(x is not None for x in items):
                    changes[name] = type(v)(x if x is not None else t for x, t in zip(items, v))
        return changes or None


# --- layout helpers -----------------------------------------------------------------------------------------

def _like(values: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """`values` (orig's shape or a cut of it) laid out in orig's dim order (a transposed weight stays
    transposed), so a variant changes one thing at a time."""
    if orig.dim() < 2 or orig.is_contiguous() or any(s == 0 for s in orig.stride()):
        return values.contiguous().clone()
    order = sorted(range(orig.dim()), key=lambda d: (-orig.stride()[d], d))
    back = [order.index(d) for d in range(orig.dim())]
    return values.permute(order).contiguous().permute(back)


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A fresh [rows, n] copy of `t` with `dim` last."""
    return t.movedim(dim, -1).reshape(-1, t.shape[dim]).clone()


def _unrows(flat: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    moved = list(t.movedim(dim, -1).shape)
    return _like(flat.reshape(moved).movedim(-1, dim), t)


def _floats(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0


def _fits(t: torch.Tensor, headroom: float = 16.0) -> bool:
    """Whether `t` stays well inside its float dtype's range."""
    finite = t[torch.isfinite(t)]
    return not finite.numel() or float(finite.abs().max()) * headroom < torch.finfo(t.dtype).max


def _peak(t: torch.Tensor) -> float:
    """The largest finite magnitude in `t` (0 when none is finite)."""
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _rms(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)].double()
    return float(finite.pow(2).mean().sqrt()) if finite.numel() else 0.0



def _row_dim(a: _Args, x: torch.Tensor) -> int:
    """The dim a row op walks: its `dim` argument (the last of several), else the last dim."""
    d = a.get("dim")
    if isinstance(d, (list, tuple)):
        d = max(v % x.dim() for v in d) if d else None
    if not isinstance(d, int):
        return x.dim() - 1
    return d % x.dim()



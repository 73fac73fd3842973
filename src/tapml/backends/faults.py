"""Fault injection: a Backend wrapper under which one op kind (or one instance of it) computes a known wrong answer.

Used by `--inject` (through `open_backend`) so anyone can watch localization work, and by the tests, where the
location of the bug is known. A fault never changes which ops the inner backend supports; it only corrupts
results.

Spec grammar: `[decode-only:]KIND[=PARAM]:OP[@N]`, e.g. `noise:aten.mm.default@37` (relative noise on the
37th call of that overload in the run, counted from 0), `offbyone:aten.cat.default`, `fp16:aten.softmax.int`,
`decode-only:noise:aten.mul.Tensor`, `noise=0.2:aten.addmm.default`, `layout:aten.mul.Tensor` (wrong only where an
input is a view with an offset or an odd size-1 stride).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.backends.base import Backend
from tapml.errors import TapmlError
from tapml.ops import OpCall, odd_layout

# Composite ops never reach the dispatcher under their own name; a fault on them means the op they become.
ALIASES = {"aten.softmax.int": "aten._softmax.default", "aten.log_softmax.int": "aten._log_softmax.default",
           "aten.softmax": "aten._softmax.default", "aten.log_softmax": "aten._log_softmax.default"}

KINDS = {
    "noise": "relative Gaussian noise: out + ε·rms(out)·N(0,1) (PARAM = ε, default 0.05)",
    "offbyone": "results shifted by one along the last dim",
    "zero": "a zeroed slice: the first quarter of the last dim set to 0",
    "fp16": "results rounded to float16 and back",
    "bf16": "results rounded to bfloat16 and back",
    "dropmask": "the attention mask argument dropped (attn_mask=None)",
    "stalekv": "a stale KV-cache write: the appended slice of a cat (or an index_copy/index_put write) is lost",
    "layout": "relative noise (as `noise`), only on calls whose tensor inputs include a storage offset or a size-1 "
              "dim with a non-default stride (a kernel that mis-reads views; needs a backend whose handles are "
              "torch tensors, such as torch)",
}


_TAKES_PARAM = ("noise", "layout")  # the kinds whose corruption has a size


@dataclass(frozen=True)
class Fault:
    kind: str
    op: str  # an overload or an fnmatch pattern over overload names
    index: int | None = None  # only this per-overload instance
    decode_only: bool = False
    param: float | None = None

    @property
    def spec(self) -> str:
        s = ("decode-only:" if self.decode_only else "") + self.kind
        s += f"={self.param:g}" if self.param is not None else ""
        s += f":{self.op}" + (f"@{self.index}" if self.index is not None else "")
        return s

    def applies(self, call: OpCall) -> bool:
        if not (call.op == self.op or fnmatchcase(call.op, self.op) or call.kind == self.op):
            return False
        if self.decode_only and not call.provenance.phase.startswith("decode:"):
            return False
        return self.index is None or call.provenance.op_index == self.index


def parse_fault(spec: str) -> Fault:
    """Parse a fault spec; a one-line TapmlError naming the bad part otherwise."""
    rest = spec.strip()
    decode_only = rest.startswith("decode-only:")
    rest = rest.removeprefix("decode-only:")
    kind_part, sep, target = rest.partition(":")
    if not sep or not target:
        raise TapmlError(f"bad fault {spec!r}: expected [decode-only:]KIND:OP[@N], e.g. noise:aten.mm.default@3")
    kind, _, param_s = kind_part.partition("=")
    if kind not in KINDS:
        raise TapmlError(f"bad fault {spec!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    param = None
    if param_s:
        if kind not in _TAKES_PARAM:
            raise TapmlError(f"bad fault {spec!r}: {kind} takes no =PARAM (only {', '.join(_TAKES_PARAM)} does)")
        try:
            param = float(param_s)
        except ValueError:
            raise TapmlError(f"bad fault {spec!r}: {param_s!r} is not a number") from None
        if not math.isfinite(param):  # NaN/inf noise is not noise: every output becomes NaN/inf
            raise TapmlError(f"bad fault {spec!r}: {param_s!r} must be a finite number (e.g. noise=0.2)")
    op, at, idx = target.partition("@")
    index = None
    if at:
        if not idx.isdigit():
            raise TapmlError(f"bad fault {spec!r}: @{idx} must be a call count ≥ 0 (e.g. @37)")
        index = int(idx)
    if not op.startswith(("aten.", "prims.", "*")) or op.count(".") < 1:
        raise TapmlError(f"bad fault {spec!r}: {op!r} is not an op overload such as aten.mm.default")
    return Fault(kind, ALIASES.get(op, op), index, decode_only, param)


class FaultyBackend(Backend):
    """`inner` with `fault` applied to the calls it matches (the only backend that lies on purpose)."""

    def __init__(self, inner: Backend, fault: Fault, seed: int = 0):
        self.inner, self.fault, self.seed = inner, fault, seed
        self.name = f"{inner.name}+{fault.spec}"
        self.description = f"{inner.name} with an injected fault: {KINDS[fault.kind]}"
        self.replays_torch_rng = inner.replays_torch_rng
        self.device = inner.device
        self.hits = 0  # how many calls the fault corrupted
        self.compiles_ahead = inner.compiles_ahead

    def supports(self, call: OpCall) -> str | None:
        return self.inner.supports(call)

    def int64_bits(self) -> int:
        return self.inner.int64_bits()

    def prepare(self, calls: list[OpCall]) -> None:
        self.inner.prepare(calls)

    def upload(self, t: torch.Tensor) -> Any:
        return self.inner.upload(t)

    def download(self, h: Any) -> torch.Tensor:
        return self.inner.download(h)

    def is_handle(self, x: Any) -> bool:
        return self.inner.is_handle(x)

    def close(self) -> None:
        self.inner.close()

    def run(self, call: OpCall) -> Any:
        kind = self.fault.kind
        if not self.fault.applies(call) or (kind == "layout" and not any(map(odd_layout, _host_tensors(call)))):
            return self.inner.run(call)
        if kind == "dropmask":
            return self.inner.run(_drop_mask(call))
        if kind == "stalekv" and call.kind in ("aten.index_copy_", "aten.index_put_", "aten.copy_"):
            self.hits += 1
            return call.args[0]  # the write never happens
        out = self.inner.run(call)
        self.hits += 1
        return pytree.tree_map(lambda h: self._corrupt(h, call) if self.inner.is_handle(h) else h, out)

    def _corrupt(self, h: Any, call: OpCall) -> Any:
        t = self.inner.download(h)
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return h
        bad = corrupt(self.fault, t, call, self.seed + self.hits)
        if bad is t:
            return h
        if call.func()._schema.returns and call.func()._schema.returns[0].alias_info is not None:
            # An in-place op: its result is its argument, so the corruption must land in that buffer.
            t.copy_(bad)
            return self.inner.upload(t) if not self.inner.is_handle(t) else t
        return self.inner.upload(bad)


def corrupt(fault: Fault, t: torch.Tensor, call: OpCall, seed: int) -> torch.Tensor:
    """The wrong value for one output tensor (a new tensor; `t` itself when the fault cannot apply)."""
    kind = fault.kind
    if kind == "offbyone":
        return torch.roll(t, 1, -1) if t.dim() else t + 1
    if kind == "stalekv":
        return _stale_cat(t, call)
    if not t.is_floating_point():
        return t
    if kind in ("noise", "layout"):
        eps = 0.05 if fault.param is None else fault.param
        gen = torch.Generator().manual_seed(seed)
        n = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)
        rms = t.float().pow(2).mean().sqrt().clamp(min=1e-12).item()
        return t + eps * rms * n
    if kind == "zero":
        out = t.clone()
        if t.dim() == 0:
            return torch.zeros_like(t)
        out[..., : max(1, t.shape[-1] // 4)] = 0
        return out
    if kind == "fp16":
        return t.to(torch.float16).to(t.dtype)
    if kind == "bf16":
        return t.to(torch.bfloat16).to(t.dtype)
    return t


def _host_tensors(call: OpCall) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves((call.args, call.kwargs)) if isinstance(t, torch.Tensor)]


def _stale_cat(t: torch.Tensor, call: OpCall) -> torch.Tensor:
    """For a cat: the slice appended by its last input is replaced by what was before it (a lost write)."""
    if call.kind != "aten.cat" or not call.args or not isinstance(call.args[0], (list, tuple)):
        return t
    parts = call.args[0]
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", 0)
    dim = dim % t.dim()
    new = parts[-1].shape[dim] if hasattr(parts[-1], "shape") else 0
    total = t.shape[dim]
    if new == 0 or new >= total:
        return torch.zeros_like(t) if new else t
    out = t.clone()
    prev = t.narrow(dim, total - new - 1, 1)
    out.narrow(dim, total - new, new).copy_(prev.expand_as(out.narrow(dim, total - new, new)))
    return out


def _drop_mask(call: OpCall) -> OpCall:
    schema = call.func()._schema
    names = [a.name for a in schema.arguments]
    args, kwargs = list(call.args), dict(call.kwargs)
    for key in ("attn_mask", "attention_mask", "mask"):
        if key in kwargs:
            kwargs[key] = None
        elif key in names and names.index(key) < len(args):
            args[names.index(key)] = None
    return OpCall(call.op, tuple(args), kwargs, call.outputs, call.provenance, call.rng_state)

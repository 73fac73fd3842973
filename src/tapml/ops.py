"""OpCall, Signature and the argument helpers shared by the Recorder, the store and every backend.

It knows how to turn ATen arguments into JSON plus tensor leaves and back; it must not know the store layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

import torch
import torch.utils._pytree as pytree
import xxhash

from tapml.errors import TapmlError, UnknownOp

# Ops that may read storage outside their input view: the whole storage is kept for them.
WHOLE_STORAGE = frozenset({"aten.as_strided.default", "aten.as_strided_.default", "aten.as_strided_scatter.default"})
# Ops whose result depends on the random generator (torch tags them `nondeterministic_seeded`).
_SEEDED = torch.Tag.nondeterministic_seeded


@dataclass
class Provenance:
    """Where a call came from: run, module path, phase (`prefill`, `decode:3`, `forward`) and index in the run."""

    run: int = 0
    module: str = ""
    phase: str = "forward"
    index: int = 0
    op_index: int | None = None  # the n-th call of this overload in the run (known in live runs, not in stores)

    def as_dict(self) -> dict[str, Any]:
        d = {"run": self.run, "module": self.module, "phase": self.phase, "index": self.index}
        if self.op_index is not None:
            d["op_index"] = self.op_index
        return d


@dataclass
class OpCall:
    """One call of an ATen operator with its real arguments and (when known) its reference outputs."""

    op: str  # overload name, e.g. "aten.mm.default"
    args: tuple
    kwargs: dict
    outputs: Any = None
    provenance: Provenance = field(default_factory=Provenance)
    rng_state: torch.Tensor | None = None  # CPU generator state before the call, for seeded random ops

    @property
    def kind(self) -> str:
        """The op kind without the overload: `aten.mm`."""
        return op_kind(self.op)

    def func(self) -> torch._ops.OpOverload:
        return resolve_op(self.op)

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(x, torch.Tensor)]


def op_kind(name: str) -> str:
    """The op kind of an overload name, without the overload: `aten.mm.default` -> `aten.mm`."""
    return name.rsplit(".", 1)[0]


@cache
def resolve_op(name: str) -> torch._ops.OpOverload:
    """`aten.mm.default` -> torch.ops.aten.mm.default; a clear error when the overload does not exist here."""
    parts = name.split(".")
    if len(parts) != 3:
        raise UnknownOp(f"bad op name {name!r}: expected namespace.op.overload, e.g. aten.mm.default")
    ns, op, overload = parts
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError) as e:
        raise UnknownOp(f"op {name} does not exist in this torch {torch.__version__}: {e}") from None


@cache
def mutated_args(func: torch._ops.OpOverload) -> tuple[str, ...]:
    """Names of the schema arguments the op writes to (in-place self, out=)."""
    return tuple(name for _, name in written_args(func))


@cache
def written_args(func: torch._ops.OpOverload) -> tuple[tuple[int, str], ...]:
    """(position, name) of the schema arguments the op writes to."""
    return tuple((i, a.name) for i, a in enumerate(func._schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


@cache
def _seeded(func: torch._ops.OpOverload) -> bool:
    return _SEEDED in func.tags


def is_seeded_random(func: torch._ops.OpOverload, args: tuple | None = None, kwargs: dict | None = None) -> bool:
    """Whether the call draws from the generator. Given the call's arguments, a dropout with probability 0
    (SDPA's `dropout_p=0.0`, `native_dropout(p=0)`) or `train=False` draws nothing and is deterministic."""
    if not _seeded(func):
        return False
    if args is None:
        return True
    kwargs = kwargs or {}
    for i, a in enumerate(func._schema.arguments):
        if a.name not in ("dropout_p", "p", "train"):
            continue
        value = kwargs[a.name] if a.name in kwargs else args[i] if i < len(args) else a.default_value
        if a.name == "train" and value is False:
            return False
        if a.name in ("dropout_p", "p") and isinstance(value, (int, float)) and value == 0:
            return False
    return True


@cache
def op_name(func: torch._ops.OpOverload) -> str:
    return str(func)  # "aten.mm.default"


# --- non-tensor arguments <-> JSON -------------------------------------------------------------------------

class Unserializable(Exception):
    """An argument the store cannot hold faithfully; the case is kept but marked non-replayable."""


def encode_value(x: Any, tensors: list[torch.Tensor]) -> Any:
    """Turn an argument pytree into JSON, appending tensor leaves to `tensors` (replaced by {"T": i})."""
    if isinstance(x, torch.Tensor):
        tensors.append(x)
        return {"T": len(tensors) - 1}
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return {"float": repr(x)}  # 'inf', '-inf', 'nan'
    if isinstance(x, complex):
        return {"complex": [x.real, x.imag]}
    if isinstance(x, (list, tuple)):
        items = [encode_value(v, tensors) for v in x]
        return items if isinstance(x, list) else {"tuple": items}
    if isinstance(x, dict):
        return {"dict": {str(k): encode_value(v, tensors) for k, v in x.items()}}
    if isinstance(x, torch.dtype):
        return {"dtype": str(x).removeprefix("torch.")}
    if isinstance(x, torch.device):
        return {"device": "cpu"}  # replay places tensors on the backend's own device
    if isinstance(x, torch.layout):
        return {"layout": str(x).removeprefix("torch.")}
    if isinstance(x, torch.memory_format):
        return {"memory_format": str(x).removeprefix("torch.")}
    if isinstance(x, torch.Generator):
        return {"generator": None}
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise Unserializable(f"symbolic value {x!r}")
    raise Unserializable(f"argument of type {type(x).__name__}")


def decode_value(x: Any, tensors: list[Any]) -> Any:
    if isinstance(x, list):
        return [decode_value(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    (key, val), = x.items()
    if key == "T":
        return tensors[val]
    if key == "tuple":
        return tuple(decode_value(v, tensors) for v in val)
    if key == "dict":
        return {k: decode_value(v, tensors) for k, v in val.items()}
    if key == "float":
        return float(val)
    if key == "complex":
        return complex(*val)
    if key == "dtype":
        return getattr(torch, val)
    if key == "device":
        return torch.device(val)
    if key == "layout":
        return getattr(torch, val)
    if key == "memory_format":
        return getattr(torch, val)
    if key == "generator":
        return None
    raise TapmlError(f"store holds an argument tag {key!r} this tapml does not know; upgrade tapml")


def encode_args(args: tuple, kwargs: dict) -> tuple[Any, list[torch.Tensor]]:
    tensors: list[torch.Tensor] = []
    spec = {"args": [encode_value(a, tensors) for a in args], "kwargs": {k: encode_value(v, tensors)
                                                                         for k, v in kwargs.items()}}
    return spec, tensors


def decode_args(spec: Any, tensors: list[Any]) -> tuple[tuple, dict]:
    args = tuple(decode_value(a, tensors) for a in spec["args"])
    kwargs = {k: decode_value(v, tensors) for k, v in spec["kwargs"].items()}
    return args, kwargs


# --- tensor metadata and compact capture -------------------------------------------------------------------

def default_strides(shape: torch.Size | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The strides of a fresh contiguous tensor of `shape` (as torch makes them: a size 0 counts as 1)."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


def default_layout(t: torch.Tensor) -> bool:
    """True when `t` is laid out exactly as a fresh contiguous tensor: offset 0 and every stride the default one,
    size-1 dims included (torch's `is_contiguous()` ignores those: a KV-cache slice [2,4,1,32] with stride 128 on
    its size-1 dim is `contiguous`, and a kernel may still read that stride)."""
    return t.storage_offset() == 0 and t.stride() == _default_strides(t.shape)


@lru_cache(maxsize=8192)
def _default_strides(shape: torch.Size) -> tuple[int, ...]:
    return default_strides(shape)


def odd_layout(t: torch.Tensor) -> bool:
    """A storage offset, or a size-1 dim whose stride is not the default one: the layouts `is_contiguous()` does
    not see (used by the `layout` fault)."""
    if t.storage_offset() != 0:
        return True
    return any(n == 1 and s != d for n, s, d in zip(t.shape, t.stride(), _default_strides(t.shape)))


def tensor_meta(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and, unless the layout is exactly the default one (`default_layout`), the live strides and
    storage offset: size-1 dims' strides and the offsets of views are part of what a call saw."""
    meta: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if not default_layout(t):
        meta["stride"] = list(t.stride())
        meta["offset"] = t.storage_offset()
    return meta


def compact(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The distinct values of `t` as a contiguous tensor, and whether they are in storage order.

    Broadcast (stride-0) dims are cut to size 1: an expanded [4096, 4096] view of a [4096] bias keeps 4096
    values. A permuted dense view (a transposed weight) keeps its memory span as it is — no transposing copy;
    `rebuild` lays it out again from the recorded strides.
    """
    t = t.detach()
    if t.is_contiguous():
        return t, False
    stride = t.stride()
    if any(s == 0 and n > 1 for s, n in zip(stride, t.shape)):
        index = tuple(slice(0, 1) if s == 0 else slice(None) for s in stride)
        return t[index].contiguous(), False
    if _dense(t.shape, stride):
        return torch.as_strided(t, (t.numel(),), (1,), t.storage_offset()), True
    return t.contiguous(), False


def _dense(shape: torch.Size, stride: tuple[int, ...]) -> bool:
    """True when the view covers one gap-free memory span (a permutation of a contiguous tensor)."""
    expected = 1
    for s, n in sorted((s, n) for n, s in zip(shape, stride) if n != 1):
        if s != expected:
            return False
        expected *= n
    return expected > 0


def rebuild(values: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Inverse of `compact` + `tensor_meta`: a tensor with the recorded shape, strides and storage offset."""
    shape = meta["shape"]
    dtype = getattr(torch, meta["dtype"])
    if meta.get("span"):  # storage-order values of a dense permuted view
        storage = torch.zeros(meta["offset"] + values.numel(), dtype=dtype)
        storage[meta["offset"]:] = values.reshape(-1)
        return torch.as_strided(storage, shape, meta["stride"], meta["offset"])
    if "stride" not in meta:
        return values.reshape(shape).to(dtype).clone() if values.numel() else torch.empty(shape, dtype=dtype)
    stride, offset = meta["stride"], meta["offset"]
    storage = torch.zeros(_extent(shape, stride, offset), dtype=dtype)
    compact_shape = [1 if s == 0 and n > 1 else n for n, s in zip(shape, stride)]
    view = torch.as_strided(storage, compact_shape, stride, offset)
    if view.numel():
        view.copy_(values.reshape(compact_shape))
    return torch.as_strided(storage, shape, stride, offset)


def clone_layout(t: torch.Tensor, whole: bool = False) -> torch.Tensor:
    """A copy of `t` with its exact layout: shape, strides (size-1 dims' included) and storage offset.

    The new storage holds t's values where its view reaches and zeros elsewhere; `whole`: all of t's storage is
    copied instead (ops such as `as_strided` read outside their input's view). A default-layout tensor is simply
    cloned."""
    t = t.detach()
    if default_layout(t):
        return t.clone(memory_format=torch.contiguous_format)
    shape, stride, offset = t.shape, t.stride(), t.storage_offset()
    if not whole:
        storage = torch.zeros(_extent(shape, stride, offset), dtype=t.dtype, device=t.device)
        index = tuple(slice(0, 1) if s == 0 and n > 1 else slice(None) for n, s in zip(shape, stride))
        compact_shape = [1 if s == 0 and n > 1 else n for n, s in zip(shape, stride)]
        try:
            torch.as_strided(storage, compact_shape, stride, offset).copy_(t[index])
            return torch.as_strided(storage, shape, stride, offset)
        except RuntimeError:  # a self-overlapping view other than broadcast dims: copy the storage instead
            pass
    n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    storage = torch.empty(n, dtype=t.dtype, device=t.device)
    storage.copy_(torch.as_strided(t, (n,), (1,), 0))
    return torch.as_strided(storage, shape, stride, offset)


def _extent(shape: Any, stride: Any, offset: int) -> int:
    """Elements a storage needs for the view (shape, stride, offset)."""
    if any(n == 0 for n in shape):
        return offset
    return offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1


def content_hash(t: torch.Tensor) -> str:
    """Content address of a compact tensor's values: dtype and bytes, not shape (xxh3-128, seeded by the dtype:
    fast enough to run per sample). A weight and its transposed view (recorded as the same memory span) share
    one blob; the shape lives in each sample's tensor meta."""
    raw = t.numpy() if t.dtype in _NUMPY_DTYPES else t.reshape(-1).view(torch.uint8).numpy()
    return xxhash.xxh3_128_hexdigest(raw, seed=_dtype_seed(t.dtype))


# dtypes whose tensors numpy can view directly (their bytes, as the others' are through a uint8 view)
_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.complex64, torch.complex128, torch.int64,
                 torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}


@cache
def _dtype_seed(dtype: torch.dtype) -> int:
    return zlib.crc32(str(dtype).encode())


# --- signatures --------------------------------------------------------------------------------------------

def signature(op: str, spec: Any, tensors: list[torch.Tensor]) -> str:
    """Dedup key: overload, each tensor's shape/dtype (+strides where they matter) and the non-tensor args."""
    return signature_parts(op, spec, [tensor_meta(t) for t in tensors])[0]


def _canonical_encoder() -> Callable[[Any], str]:
    """Compact, key-sorted JSON. JSONEncoder.encode builds its C encoder on every call (half the cost for the small
    specs signatures are made of), so the C encoder is built once here, with the arguments JSONEncoder passes it."""
    enc = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # an interpreter without the _json accelerator
        return enc.encode
    c_enc = c_make_encoder(None, enc.default, json.encoder.encode_basestring_ascii, None, enc.key_separator,
                           enc.item_separator, True, False, True)
    return lambda o: "".join(c_enc(o, 0))


canonical_json = _canonical_encoder()


def signature_parts(op: str, spec: Any, metas: list[dict]) -> tuple[str, str, str]:
    """(signature, spec JSON, metas JSON): the signature hashes `[op, spec, metas]` as canonical JSON, whose
    two parts are what the store keeps for the case."""
    spec_json = canonical_json(spec)
    metas_json = canonical_json(metas)
    text = f"[{json.dumps(op)},{spec_json},{metas_json}]"
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest(), spec_json, metas_json


def describe_signature(spec: Any, metas: list[dict]) -> str:
    """Human-readable short form: `f32[4,64] f32[64,128]` plus scalar args."""
    short = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16", "int64": "i64",
             "int32": "i32", "bool": "b8", "int8": "i8", "uint8": "u8", "int16": "i16", "complex64": "c64"}

    def fmt(x: Any) -> str:
        if isinstance(x, list):
            return "[" + ",".join(fmt(v) for v in x) + "]"
        if isinstance(x, dict):
            (k, v), = x.items()
            if k == "T":
                m = metas[v]
                s = f"{short.get(m['dtype'], m['dtype'])}[{','.join(map(str, m['shape']))}]"
                return s + ("~" if "stride" in m else "")
            if k == "tuple":
                return "(" + ",".join(fmt(i) for i in v) + ")"
            if k in ("dtype", "layout", "memory_format", "float", "device"):
                return str(v)
            return f"{k}={v}"
        return repr(x) if isinstance(x, str) else str(x)

    parts = [fmt(a) for a in spec["args"]] + [f"{k}={fmt(v)}" for k, v in spec["kwargs"].items()]
    return " ".join(parts)


def outputs_to_list(out: Any) -> tuple[Any, list[torch.Tensor]]:
    """Encode an op's return value as JSON + tensor leaves (the same encoding as arguments)."""
    tensors: list[torch.Tensor] = []
    return encode_value(out, tensors), tensors

"""The TapML wire protocol (docs/PROTOCOL.md): frames, the fixed dtype table, tensor payloads, strict decoding.

Only data crosses: a frame is a JSON header plus raw byte blobs; op names resolve against `torch.ops` through
an allow-list, dtypes and other enums through fixed tables. It must not unpickle, eval or import anything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
from typing import Any

import torch

from tapml.errors import TapmlError
from tapml.ops import resolve_op
from tapml.remote.oppolicy import OpPolicy

VERSION = 1
MAX_DEPTH = 32  # nesting of argument pytrees
MAX_DIMS = 64
_ALIGN = 8  # blobs start at 8-byte offsets so the page can view them as typed arrays in place


class ProtocolError(Exception):
    """A frame or message that breaks the protocol (answered with an error reply, never a crash)."""


class RemoteError(Exception):
    """The other side answered a request with an error (for a run: the backend's own failure)."""


# --- the fixed dtype table ---------------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in (
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2") if isinstance(getattr(torch, name, None), torch.dtype)
}
DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}
ITEMSIZE = {name: dt.itemsize for name, dt in DTYPES.items()}
LAYOUTS = {n: getattr(torch, n) for n in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "jagged")
           if isinstance(getattr(torch, n, None), torch.layout)}
MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "channels_last", "channels_last_3d",
                                                 "preserve_format")}
_OP_NAME = re.compile(r"^(aten|prims)\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")


def dtype_of(name: Any) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise ProtocolError(f"unknown dtype {name!r}")
    return DTYPES[name]


def resolve_allowed(name: Any, policy: OpPolicy) -> torch._ops.OpOverload:
    """Resolve an op name the server's allow-list admits (docs/SECURITY.md). The name is checked against the
    list before anything is looked up, and the result must be an OpOverload."""
    if not isinstance(name, str) or len(name) > 200 or not _OP_NAME.match(name):
        raise ProtocolError(f"bad op name {str(name)[:80]!r}: expected aten.OP.OVERLOAD")
    why = policy.refusal(name)
    if why:
        raise ProtocolError(why)
    try:
        op = resolve_op(name)
    except TapmlError as e:
        raise ProtocolError(str(e)) from None
    if not isinstance(op, torch._ops.OpOverload):
        raise ProtocolError(f"{name} is not an operator overload")
    return op


# --- frames ------------------------------------------------------------------------------------------------

def _pad(n: int) -> int:
    return -n % _ALIGN


def encode_frame(header: dict[str, Any], blobs: list[Any] = ()) -> list[Any]:
    """A frame as a list of bytes-like pieces (header then blobs, 8-aligned), to send without joining.

    Layout: u32 LE header length H, H bytes of UTF-8 JSON (space-padded so blobs start 8-aligned), then each
    blob padded to 8 bytes; `header["blobs"]` lists the blobs' unpadded lengths.
    """
    views = [memoryview(b).cast("B") for b in blobs]
    header = dict(header, blobs=[len(v) for v in views]) if views else header
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    text += b" " * _pad(4 + len(text))
    pieces: list[Any] = [struct.pack("<I", len(text)) + text]
    for v in views:
        pieces.append(v)
        if _pad(len(v)):
            pieces.append(bytes(_pad(len(v))))
    return pieces


def join_frame(pieces: list[Any]) -> bytes:
    return b"".join(pieces)


def decode_frame(data: Any) -> tuple[dict[str, Any], list[memoryview]]:
    """Split a frame into its header and blob views (no copies); ProtocolError when it is malformed."""
    if isinstance(data, str):
        raise ProtocolError("text frames are not part of the protocol; send binary frames")
    mv = memoryview(data).cast("B")
    if len(mv) < 4:
        raise ProtocolError("frame shorter than its length prefix")
    (hlen,) = struct.unpack_from("<I", mv, 0)
    if hlen > len(mv) - 4:
        raise ProtocolError("header length exceeds the frame")
    try:
        header = json.loads(bytes(mv[4:4 + hlen]), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"header is not JSON: {str(e)[:80]}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    sizes = header.get("blobs", [])
    if not isinstance(sizes, list) or not all(_is_int(n) and n >= 0 for n in sizes):
        raise ProtocolError("`blobs` must be a list of byte lengths")
    blobs, pos = [], 4 + hlen
    for n in sizes:
        if pos + n > len(mv):
            raise ProtocolError("blob lengths exceed the frame")
        blobs.append(mv[pos:pos + n])
        pos += n + _pad(n)
    if pos < len(mv) - _ALIGN:
        raise ProtocolError("trailing bytes after the last blob")
    return header, blobs


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: our replies could not echo them back


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --- authentication ----------------------------------------------------------------------------------------

def auth_mac(token: str, role: str, nonce: str, cnonce: str) -> str:
    """HMAC-SHA256 over both nonces with the shared token; `role` (client/server) keeps the two proofs apart."""
    msg = f"tapml-auth-v{VERSION}|{role}|{nonce}|{cnonce}".encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def check_mac(token: str, role: str, nonce: str, cnonce: str, mac: Any) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(auth_mac(token, role, nonce, cnonce), mac)


# --- tensors -----------------------------------------------------------------------------------------------

# A view whose storage prefix (bytes before its offset) exceeds this is sent rebased to offset 0.
_REBASE_WASTE = 1 << 20


def tensor_payload(t: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    """Wire metadata and bytes of a tensor without copying a contiguous one.

    A non-contiguous view keeps its strides and storage offset and sends the storage span it covers (so
    layout-sensitive ops replay faithfully); broadcast dims cost nothing since their stride is 0.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in DTYPE_NAMES:
        raise TapmlError(f"remote: dtype {t.dtype} cannot cross the wire")
    meta: dict[str, Any] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if t.numel() == 0:
        return meta, memoryview(b"")
    if t.is_contiguous():
        flat = t.reshape(-1)
    else:
        stride, off = list(t.stride()), t.storage_offset()
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, stride))
        if off * t.element_size() > _REBASE_WASTE:
            flat, off = torch.as_strided(t, (extent,), (1,), off), 0
        else:
            flat = torch.as_strided(t, (off + extent,), (1,), 0)
        meta["stride"], meta["offset"] = stride, off
    return meta, memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_from_payload(meta: Any, blob: memoryview) -> torch.Tensor:
    """Rebuild a tensor from wire metadata and bytes (copied: the frame's buffer is not kept)."""
    if not isinstance(meta, dict):
        raise ProtocolError("tensor metadata must be an object")
    dtype = dtype_of(meta.get("dtype"))
    shape = _dims(meta.get("shape"), "shape")
    item = dtype.itemsize
    if len(blob) % item:
        raise ProtocolError(f"tensor bytes ({len(blob)}) are not a multiple of {meta['dtype']}'s size")
    n = len(blob) // item
    numel = math.prod(shape)
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype) if n else torch.empty(0, dtype=dtype)
    if "stride" not in meta:
        if n != numel:
            raise ProtocolError(f"tensor of shape {shape} needs {numel} elements, got {n}")
        return data.reshape(shape)
    stride = _dims(meta.get("stride"), "stride")
    off = meta.get("offset", 0)
    if len(stride) != len(shape) or not _is_int(off) or off < 0:
        raise ProtocolError("stride/offset do not match the shape")
    extent = off + (1 + sum((d - 1) * s for d, s in zip(shape, stride)) if numel else 0)
    if extent > n:
        raise ProtocolError(f"strided view needs {extent} elements of storage, got {n}")
    return torch.as_strided(data, shape, stride, off)


def _dims(x: Any, what: str) -> list[int]:
    if not isinstance(x, list) or len(x) > MAX_DIMS or not all(_is_int(d) and 0 <= d < 2**62 for d in x):
        raise ProtocolError(f"tensor {what} must be a list of at most {MAX_DIMS} non-negative ints")
    return x


def meta_of(h: Any) -> dict[str, Any] | None:
    """Wire metadata (dtype, shape, stride, offset) of a tensor or a backend handle that exposes them."""
    try:
        dtype, shape = h.dtype, tuple(h.shape)
        stride = h.stride() if callable(getattr(h, "stride", None)) else getattr(h, "stride", None)
        offset = h.storage_offset() if callable(getattr(h, "storage_offset", None)) else getattr(h, "offset", 0)
    except Exception:
        return None
    if dtype not in DTYPE_NAMES:
        return None
    meta: dict[str, Any] = {"dtype": DTYPE_NAMES[dtype], "shape": [int(n) for n in shape]}
    if stride is not None:
        meta["stride"], meta["offset"] = [int(s) for s in stride], int(offset or 0)
    return meta


def nbytes_of(meta: dict[str, Any] | None) -> int:
    if not meta:
        return 0
    return math.prod(meta["shape"]) * ITEMSIZE[meta["dtype"]]


# --- arguments: the JSON grammar of tapml.ops.encode_value, decoded strictly ---------------------------------

def decode_arg(x: Any, tensors: list[Any], depth: int = 0) -> Any:
    """Inverse of `tapml.ops.encode_value` that accepts only the known tags and fixed enum tables."""
    if depth > MAX_DEPTH:
        raise ProtocolError("argument nesting too deep")
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, list):
        return [decode_arg(v, tensors, depth + 1) for v in x]
    if not isinstance(x, dict) or len(x) != 1:
        raise ProtocolError("argument must be a scalar, a list or a one-key tagged object")
    (key, val), = x.items()
    if key == "T":
        if not _is_int(val) or not 0 <= val < len(tensors):
            raise ProtocolError(f"tensor reference {val!r} out of range")
        return tensors[val]
    if key == "tuple" and isinstance(val, list):
        return tuple(decode_arg(v, tensors, depth + 1) for v in val)
    if key == "dict" and isinstance(val, dict):
        return {str(k): decode_arg(v, tensors, depth + 1) for k, v in val.items()}
    if key == "float" and val in ("inf", "-inf", "nan"):
        return float(val)
    if key == "complex" and isinstance(val, list) and len(val) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in val):
        return complex(*val)
    if key == "dtype":
        return dtype_of(val)
    if key == "device":
        return torch.device("cpu")  # the backend places tensors on its own device
    if key == "layout" and val in LAYOUTS:
        return LAYOUTS[val]
    if key == "memory_format" and val in MEMORY_FORMATS:
        return MEMORY_FORMATS[val]
    if key == "generator" and val is None:
        return None
    raise ProtocolError(f"unknown argument tag {key!r}")


def decode_call_args(spec: Any, tensors: list[Any]) -> tuple[tuple, dict]:
    if not isinstance(spec, dict) or not isinstance(spec.get("args"), list) or not isinstance(
            spec.get("kwargs", {}), dict):
        raise ProtocolError("call spec must be {args: [...], kwargs: {...}}")
    args = tuple(decode_arg(a, tensors) for a in spec["args"])
    kwargs = {str(k): decode_arg(v, tensors) for k, v in spec.get("kwargs", {}).items()}
    return args, kwargs


def meta_tensor(m: Any) -> torch.Tensor:
    """A data-less tensor on torch's meta device with the described dtype, shape, strides and offset."""
    if not isinstance(m, dict):
        raise ProtocolError("tensor metadata must be an object")
    dtype, shape = dtype_of(m.get("dtype")), _dims(m.get("shape"), "shape")
    stride = _dims(m["stride"], "stride") if "stride" in m else None
    off = m.get("offset", 0)
    if stride is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    if len(stride) != len(shape) or not _is_int(off) or off < 0:
        raise ProtocolError("stride/offset do not match the shape")
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta").as_strided(shape, stride, off)

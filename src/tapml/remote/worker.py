"""One client session of `tapml serve`, run in a process of its own: the backend instance, the session's handle
table, and every check a request passes before and after the backend sees it.

A process per session is what makes the server's limits real: a request over its time budget is stopped by
killing this process (nothing else shares it), a crash in a backend takes down one session, and memory one
session freed is never handed to another. It must not talk to the network; the server relays frames to it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.backends import Backend, get_backend
from tapml.errors import first_line
from tapml.ops import OpCall, encode_value
from tapml.remote.oppolicy import OpPolicy
from tapml.remote.protocol import (
    VERSION,
    ProtocolError,
    decode_call_args,
    decode_frame,
    encode_frame,
    meta_of,
    meta_tensor,
    nbytes_of,
    resolve_allowed,
    tensor_from_payload,
    tensor_payload,
)

# Ahead of each reply frame from a session process: handles held, bytes held, reply carries stats.
ACCOUNT = struct.Struct("<QQ?")
MAX_OUTPUTS = 1 << 16  # ids a run may name: out, out+1, ... (the client reserves that many per run)
# Ops whose outputs hold whatever memory they were given: zero-filled before a client can read them.
_UNINITIALIZED = ("aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
                  "aten.new_empty_strided", "aten.empty_permuted")


@dataclass(frozen=True)
class Limits:
    """What one session may hold and ask for (docs/SECURITY.md); 0 means no limit."""

    max_session_bytes: int = 8 << 30
    max_op_elements: int = 1 << 31
    max_message: int = 256 << 20
    allow: frozenset[str] = field(default_factory=frozenset)  # overloads added to the shipped allow-list


@dataclass
class _Entry:
    handle: Any
    meta: dict[str, Any] | None
    nbytes: int


class _BackendFailure(Exception):
    """The backend raised while running a request: the client sees its type and message."""


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except ProtocolError:
        raise
    except Exception as e:
        raise _BackendFailure(f"{type(e).__name__}: {first_line(e, 500)}") from None


def _kind(e: Exception) -> str:
    return "backend" if isinstance(e, _BackendFailure) else "protocol"


def _encode_out(x: Any, leaves: list[Any], is_handle: Callable[[Any], bool]) -> Any:
    if is_handle(x) or isinstance(x, torch.Tensor):
        leaves.append(x)
        return {"T": len(leaves) - 1}
    if isinstance(x, list):
        return [_encode_out(v, leaves, is_handle) for v in x]
    if isinstance(x, tuple):
        return {"tuple": [_encode_out(v, leaves, is_handle) for v in x]}
    return encode_value(x, [])


_META_CACHE = 4096


def _frozen(x: Any) -> Any:
    """A hashable copy of decoded JSON (lists and dicts as tuples)."""
    if isinstance(x, list):
        return tuple(_frozen(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _frozen(v)) for k, v in x.items())
    return x


def _to_meta(x: Any) -> Any:
    m = meta_of(x)
    if m is None:
        raise ValueError("no metadata")
    return meta_tensor(m)


def check_storage(t: torch.Tensor) -> None:
    """A view must lie inside its storage (torch checks most view ops; this is the fence for any it does not)."""
    if t.layout != torch.strided or t.device.type == "meta" or t.numel() == 0:
        return
    if any(s < 0 for s in t.stride()):
        raise ProtocolError("an op built a view with negative strides; refused")
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    if (last + 1) * t.element_size() > t.untyped_storage().nbytes():
        raise ProtocolError("an op built a view that reaches outside its storage; refused")


class Session:
    """One client's state: its backend, its handles and its limits. Runs inside the session's worker process."""

    def __init__(self, backend: Backend, limits: Limits):
        self.backend, self.limits = backend, limits
        self.policy = OpPolicy(limits.allow)
        self.handles: dict[int, _Entry] = {}
        self.nbytes = 0
        self._meta_cache: dict[tuple, list[dict[str, Any]] | None] = {}

    def close(self) -> None:
        self.handles.clear()
        self.nbytes = 0

    # --- requests ------------------------------------------------------------------------------------------
    def serve(self, data: bytes) -> tuple[dict[str, Any], list[Any]]:
        """One frame in, one reply out; every error becomes a reply, never an exception."""
        rid = None
        try:
            header, blobs = decode_frame(data)
            rid = header.get("id")
            reply, out = self.handle(header, blobs)
        except (ProtocolError, _BackendFailure) as e:
            reply, out = {"ok": False, "error": str(e), "kind": _kind(e)}, []
        except Exception as e:  # a bug of ours must not end the session; the client gets its message
            reply, out = {"ok": False, "error": f"server error: {type(e).__name__}: {first_line(e, 480)}",
                          "kind": "server"}, []
        reply["id"] = rid if isinstance(rid, (int, str)) and not isinstance(rid, bool) else None
        return reply, out

    def handle(self, header: dict[str, Any], blobs: list[memoryview]) -> tuple[dict[str, Any], list[Any]]:
        kind = header.get("type")
        if kind == "batch":
            calls = header.get("calls")
            if not isinstance(calls, list):
                raise ProtocolError("batch needs a list `calls`")
            replies, out_blobs = [], []
            for i, call in enumerate(calls):
                if not isinstance(call, dict) or call.get("type") == "batch":
                    raise ProtocolError(f"batch call {i} must be a request object (batches do not nest)")
                try:
                    rep, b = self.one(call, blobs, len(out_blobs))
                except (ProtocolError, _BackendFailure) as e:
                    return {"ok": False, "error": str(e), "kind": _kind(e), "at": i, "replies": replies}, out_blobs
                replies.append(rep)
                out_blobs += b
            return {"ok": True, "replies": replies}, out_blobs
        rep, b = self.one(header, blobs, 0)
        return dict(rep, ok=True), b

    def one(self, req: dict[str, Any], blobs: list[memoryview], base: int) -> tuple[dict[str, Any], list[Any]]:
        kind = req.get("type")
        fn = _REQUESTS.get(kind) if isinstance(kind, str) else None
        if fn is None:
            raise ProtocolError(f"unknown request type {str(kind)[:40]!r}")
        return fn(self, req, blobs, base)

    def _blob(self, blobs: list[memoryview], i: Any) -> memoryview:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(blobs):
            raise ProtocolError(f"blob index {i!r} out of range")
        return blobs[i]

    def _ids(self, req: dict[str, Any], key: str = "ids") -> list[int]:
        ids = req.get(key)
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ProtocolError(f"`{key}` must be a list of handle ids")
        return ids

    def _get(self, hid: int) -> _Entry:
        e = self.handles.get(hid)
        if e is None:
            raise ProtocolError(f"unknown handle {hid} (freed, or from another session)")
        return e

    def _check_elements(self, metas: list[dict[str, Any] | None], what: str) -> None:
        cap = self.limits.max_op_elements
        for m in metas:
            if cap and m is not None and math.prod(m["shape"]) > cap:
                raise ProtocolError(f"{what} has {math.prod(m['shape']):,} elements, more than this server's "
                                    f"limit of {cap:,} per tensor (tapml serve --max-op-elements)")

    def _room(self, nbytes: int, replacing: int = 0) -> None:
        cap = self.limits.max_session_bytes
        if cap and self.nbytes - replacing + nbytes > cap:
            raise ProtocolError(f"the session would hold {self.nbytes - replacing + nbytes:,} bytes, more than this "
                                f"server's limit of {cap:,} (tapml serve --max-session-mb); free handles first")

    def _put_all(self, items: list[tuple[Any, Any, dict[str, Any] | None]]) -> None:
        for hid, _, _ in items:
            if not isinstance(hid, int) or isinstance(hid, bool) or hid < 0:
                raise ProtocolError(f"bad handle id {hid!r}")
        entries = [(hid, _Entry(h, meta, nbytes_of(meta))) for hid, h, meta in items]
        replacing = sum(self.handles[hid].nbytes for hid, _ in entries if hid in self.handles)
        self._room(sum(e.nbytes for _, e in entries), replacing)
        for hid, e in entries:
            old = self.handles.get(hid)
            self.nbytes += e.nbytes - (old.nbytes if old else 0)
            self.handles[hid] = e

    def r_info(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        be = self.backend
        ops = be.supported_ops()
        return {"backend": be.name, "description": be.description, "device": str(be.device or ""),
                "protocol": VERSION, "torch": torch.__version__, "replays_torch_rng": bool(be.replays_torch_rng),
                "ops": sorted(ops) if ops is not None else None,
                "max_message": self.limits.max_message,
                "limits": {"max_session_bytes": self.limits.max_session_bytes,
                           "max_op_elements": self.limits.max_op_elements}}, []

    def r_ping(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        t = req.get("t")
        return {"pong": t if isinstance(t, (int, float, str)) and not isinstance(t, bool) else None}, []

    def r_stats(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        return {"handles": len(self.handles), "bytes": self.nbytes, "server": None}, []  # the server fills it

    def r_upload(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        tensors = req.get("tensors")
        if not isinstance(tensors, list):
            raise ProtocolError("upload needs a list `tensors`")
        for t in tensors:
            if not isinstance(t, dict):
                raise ProtocolError("each uploaded tensor is an object {id, blob, dtype, shape, ...}")
            host = tensor_from_payload(t, self._blob(blobs, t.get("blob")))
            meta = meta_of(host)
            self._check_elements([meta], "an uploaded tensor")
            handle = _call(self.backend.upload, host)
            self._put_all([(t.get("id"), handle, meta)])
        return {"count": len(tensors)}, []

    def r_download(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        metas, out = [], []
        for hid in self._ids(req):
            meta, blob = tensor_payload(_call(self.backend.download, self._get(hid).handle))
            metas.append(dict(meta, blob=base + len(out)))
            out.append(blob)
        return {"tensors": metas}, out

    def r_free(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        n = 0
        for hid in self._ids(req):
            e = self.handles.pop(hid, None)
            if e is not None:
                self.nbytes -= e.nbytes
                n += 1
        return {"freed": n}, []

    def _call_of(self, req: dict, blobs: list) -> OpCall:
        func = resolve_allowed(req.get("op"), self.policy)
        refs = req.get("tensors", [])
        if not isinstance(refs, list):
            raise ProtocolError("`tensors` must be a list of handle ids")
        leaves = []
        for r in refs:
            if isinstance(r, int) and not isinstance(r, bool):
                leaves.append(self._get(r).handle)
            elif isinstance(r, dict) and "meta" in r:  # `supports` needs shapes and dtypes, not data
                leaves.append(meta_tensor(r["meta"]))
            else:
                raise ProtocolError("a tensor reference is a handle id or {meta: ...}")
        args, kwargs = decode_call_args(req.get("args"), leaves)
        rng = None
        if req.get("rng") is not None:
            blob = self._blob(blobs, req["rng"])
            rng = tensor_from_payload({"dtype": "uint8", "shape": [len(blob)]}, blob)
        return OpCall(str(func), args, kwargs, None, rng_state=rng)

    def _expected_outputs(self, call: OpCall, req: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The outputs' metadata from the op's meta kernel, before anything is allocated; None when the sizes
        depend on values (nonzero, masked_select): those are checked after the run. Cached by the request's op,
        arguments and input layouts: a model's calls repeat, and a meta kernel costs ~100 µs of Python."""
        try:
            key = (req.get("op"), _frozen(req.get("args")), tuple(
                _frozen(self.handles[r].meta) if isinstance(r, int) else _frozen(r) for r in req["tensors"]))
            hash(key)
        except (KeyError, TypeError):
            key = None
        if key is not None and key in self._meta_cache:
            return self._meta_cache[key]
        out = self._run_meta(call)
        if key is not None:
            if len(self._meta_cache) >= _META_CACHE:
                self._meta_cache.pop(next(iter(self._meta_cache)))
            self._meta_cache[key] = out
        return out

    def _run_meta(self, call: OpCall) -> list[dict[str, Any]] | None:
        try:
            args, kwargs = pytree.tree_map_only(object, lambda x: _to_meta(x) if self.backend.is_handle(x)
                                                or isinstance(x, torch.Tensor) else x, (call.args, call.kwargs))
            if "device" in kwargs and kwargs["device"] is not None:
                kwargs["device"] = torch.device("meta")
            with torch.no_grad():
                out = call.func()(*args, **kwargs)
        except Exception:
            return None
        return [meta_of(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    def r_supports(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        call = self._call_of(req, blobs)
        try:
            reason = self.backend.supports(call)
        except Exception:  # a backend that cannot judge from metadata alone: let `run` decide
            reason = None
        return {"reason": reason if reason is None else str(reason)}, []

    def r_run(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        call = self._call_of(req, blobs)
        keep, fetch = bool(req.get("keep", True)), req.get("fetch", False)
        out_id = req.get("out", 0)
        if keep and (not isinstance(out_id, int) or isinstance(out_id, bool) or out_id < 0):
            raise ProtocolError("run with keep needs a non-negative int `out` (first id of its outputs)")
        expected = self._expected_outputs(call, req)
        if expected is not None:
            self._check_elements(expected, f"an output of {call.op}")
            self._room(sum(map(nbytes_of, expected)))
        result = _call(self.backend.run, call)
        leaves: list[Any] = []
        spec = _encode_out(result, leaves, self.backend.is_handle)
        if len(leaves) > MAX_OUTPUTS:
            raise ProtocolError(f"op returned {len(leaves)} tensors, more than {MAX_OUTPUTS}")
        for h in leaves:
            if isinstance(h, torch.Tensor):
                check_storage(h)
        if call.kind in _UNINITIALIZED:
            for h in leaves:
                _call(self.backend.run, OpCall("aten.zero_.default", (h,), {}))
        metas, out = [], []
        if not isinstance(fetch, bool):  # a byte budget: fetch only when every output is known and fits
            sizes = [meta_of(h) for h in leaves]
            fetch = isinstance(fetch, int) and None not in sizes and sum(map(nbytes_of, sizes)) <= fetch
        for h in leaves:
            meta = meta_of(h)
            if fetch:
                meta, blob = tensor_payload(_call(self.backend.download, h))
                meta["blob"] = base + len(out)
                out.append(blob)
            metas.append(meta)
        self._check_elements(metas, f"an output of {call.op}")
        if keep:  # all outputs or none: a failure above leaves no orphan handles
            self._put_all([(out_id + i, h, m) for i, (h, m) in enumerate(zip(leaves, metas))])
        return {"out": spec, "tensors": metas}, out


_REQUESTS: dict[str, Callable[..., tuple[dict, list]]] = {
    "info": Session.r_info, "ping": Session.r_ping, "stats": Session.r_stats, "upload": Session.r_upload,
    "download": Session.r_download, "free": Session.r_free, "supports": Session.r_supports, "run": Session.r_run,
}


def make_backend(backend: str, options: dict[str, Any]) -> Backend:
    """The session's backend: a registered name, or `module:Class` naming a Backend subclass (tests)."""
    if ":" not in backend:
        return get_backend(backend, **options)
    module, _, qualname = backend.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise TypeError(f"{backend} is not a Backend subclass")
    return obj(**options)


def backend_spec(backend: str | type[Backend]) -> str:
    """What crosses to a session process to name its backend."""
    return backend if isinstance(backend, str) else f"{backend.__module__}:{backend.__qualname__}"


def _expendable(with_parent: bool) -> None:
    """Linux: be the first process the kernel's out-of-memory killer takes, so a session that allocates past the
    machine's memory ends itself, not the server; a session process also ends with the zygote. (The zygote ends
    when the server's end of its socket closes: the parent-death signal fires when the parent *thread* ends,
    and the server starts the zygote from a pool thread.) Best effort elsewhere."""
    if with_parent:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def main(conn: Connection, backend: str, options: dict[str, Any], limits: Limits) -> None:
    """A session process: build the backend, then answer frames from the server until the connection closes.

    Per frame the reply is one message: `ACCOUNT` (the session's handles and bytes, and whether the reply holds
    stats for the server to fill in), then the reply frame, which the server forwards as it is.
    """
    try:
        be = make_backend(backend, options)
    except Exception as e:
        conn.send_bytes(json.dumps({"error": f"{type(e).__name__}: {first_line(e, 500)}"}).encode())
        return
    conn.send_bytes(json.dumps({"ok": True, "backend": be.name}).encode())
    session = Session(be, limits)
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                break
            reply, out = session.serve(data)
            stats = reply.get("server", 0) is None or any(
                isinstance(r, dict) and "server" in r for r in reply.get("replies", ()))
            conn.send_bytes(ACCOUNT.pack(len(session.handles), session.nbytes, stats)
                            + b"".join(encode_frame(reply, out)))
    finally:
        session.close()
        be.close()


# --- the zygote ----------------------------------------------------------------------------------------------
# Session processes are forks of one single-threaded process that imported torch once (a fork takes
# milliseconds; a fresh interpreter seconds). The server is multi-threaded and must not fork itself, and
# multiprocessing's forkserver re-runs the parent's main script in every child. Requests to the zygote are one
# JSON message with the session's socket passed along (SCM_RIGHTS); it answers with the child's pid.

def zygote(control_fd: int) -> None:
    """Fork a session process for each request on `control_fd` until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    _expendable(with_parent=False)
    ctrl = socket.socket(fileno=control_fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctrl, 1 << 20, 1)
        except OSError:
            return
        if not msg:
            return
        spec = json.loads(msg)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ctrl.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _expendable(with_parent=True)
                main(Connection(fds[0]), spec["backend"], spec["options"], Limits(**{
                    k: frozenset(v) if k == "allow" else v for k, v in spec["limits"].items()}))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        ctrl.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _warm() -> None:
    """Import once what every session would otherwise import at its first op: the reference backends and the
    Python meta kernels (`torch._refs`, which pull in torch._dynamo: seconds, per fork, on a busy machine)."""
    import tapml.backends.reference  # noqa: F401

    x = torch.empty(2, 3, device="meta")
    for op, args in [("neg", (x,)), ("add", (x, x)), ("mm", (x, x.t())), ("sum", (x,)), ("view", (x, [6])),
                     ("softmax", (x, -1, False))]:
        with contextlib.suppress(Exception):
            getattr(torch.ops.aten, op)(*args)


if __name__ == "__main__":
    _warm()
    zygote(int(sys.argv[1]))

"""`tapml serve`: host any registered backend behind the TapML WebSocket protocol (docs/PROTOCOL.md).

Each connection is a session with its own handle table, freed when the client goes; backend calls run on one
worker thread, so clients are isolated but serialized. It must not trust the client: nothing is unpickled or
evaluated, op names and enums come from fixed tables, and a session is served only after the HMAC handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch

from tapml.backends import Backend, get_backend
from tapml.errors import TapmlError
from tapml.ops import OpCall, encode_value
from tapml.remote.protocol import (
    VERSION,
    ProtocolError,
    auth_mac,
    check_mac,
    decode_call_args,
    decode_frame,
    encode_frame,
    meta_of,
    meta_tensor,
    nbytes_of,
    safe_op,
    tensor_from_payload,
    tensor_payload,
)

DEFAULT_MAX_MESSAGE = 256 << 20
DEFAULT_TIMEOUT = 120.0
AUTH_TIMEOUT = 10.0
MAX_OUTPUTS = 1 << 16  # ids a run may name: out, out+1, ... (the client reserves that many per run)


def read_token(token_file: str | Path | None = None, env: str = "TAPML_TOKEN") -> str | None:
    """The shared secret: from `token_file` when given, else the environment, else None."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise TapmlError(f"cannot read token file {token_file}: {e.strerror}") from None
        if not token:
            raise TapmlError(f"token file {token_file} is empty; put a long random secret in it")
        return token
    return os.environ.get(env) or None


def _tls_context(cert: str | Path, key: str | Path | None) -> Any:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TapmlError(f"cannot load the TLS certificate {cert}: {e}") from None
    return ctx


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings to backend options; VALUE is read as JSON when it parses (false, 3, null), else kept
    as a string."""
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise TapmlError(f"backend option {pair!r} must look like KEY=VALUE (e.g. tf32=false)")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Entry:
    handle: Any
    meta: dict[str, Any] | None
    nbytes: int


class Session:
    """One client's state: its handles. Every method runs on the worker thread."""

    def __init__(self, server: Server, peer: str):
        self.server, self.peer = server, peer
        self.handles: dict[int, _Entry] = {}

    @property
    def backend(self) -> Backend:
        return self.server.backend

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.handles.values())

    def close(self) -> None:
        self.handles.clear()

    # --- requests ------------------------------------------------------------------------------------------
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

    def _put_all(self, items: list[tuple[Any, Any, dict[str, Any] | None]]) -> None:
        for hid, _, _ in items:
            if not isinstance(hid, int) or isinstance(hid, bool) or hid < 0:
                raise ProtocolError(f"bad handle id {hid!r}")
        entries = [(hid, _Entry(h, meta, nbytes_of(meta))) for hid, h, meta in items]
        limit = self.server.max_session_bytes
        if limit and self.nbytes + sum(e.nbytes for _, e in entries) > limit:
            raise ProtocolError(f"session would hold more than {limit} bytes; free handles first")
        self.handles.update(entries)

    def _put(self, hid: Any, handle: Any, meta: dict[str, Any] | None) -> None:
        self._put_all([(hid, handle, meta)])

    def r_info(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        be = self.backend
        ops = getattr(be, "supported_ops", None)
        return {"backend": be.name, "description": be.description, "device": str(getattr(be, "device", "")),
                "protocol": VERSION, "torch": torch.__version__,
                "replays_torch_rng": bool(getattr(be, "replays_torch_rng", False)),
                "ops": sorted(ops()) if callable(ops) else None,
                "max_message": self.server.max_message}, []

    def r_ping(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        return {"pong": req.get("t")}, []

    def r_stats(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        return {"handles": len(self.handles), "bytes": self.nbytes, "server": self.server.stats()}, []

    def r_upload(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        tensors = req.get("tensors")
        if not isinstance(tensors, list):
            raise ProtocolError("upload needs a list `tensors`")
        for t in tensors:
            if not isinstance(t, dict):
                raise ProtocolError("each uploaded tensor is an object {id, blob, dtype, shape, ...}")
            host = tensor_from_payload(t, self._blob(blobs, t.get("blob")))
            handle = _call(self.backend.upload, host)
            self._put(t.get("id"), handle, meta_of(host))
        return {"count": len(tensors)}, []

    def r_download(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        metas, out = [], []
        for hid in self._ids(req):
            meta, blob = tensor_payload(_call(self.backend.download, self._get(hid).handle))
            metas.append(dict(meta, blob=base + len(out)))
            out.append(blob)
        return {"tensors": metas}, out

    def r_free(self, req: dict, blobs: list, base: int) -> tuple[dict, list]:
        n = sum(self.handles.pop(hid, None) is not None for hid in self._ids(req))
        return {"freed": n}, []

    def _call_of(self, req: dict, blobs: list) -> OpCall:
        func = safe_op(req.get("op"))
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
        result = _call(self.backend.run, call)
        leaves: list[Any] = []
        spec = _encode_out(result, leaves, self.backend.is_handle)
        if len(leaves) > MAX_OUTPUTS:
            raise ProtocolError(f"op returned {len(leaves)} tensors, more than {MAX_OUTPUTS}")
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
        if keep:  # all outputs or none: a failure above leaves no orphan handles
            self._put_all([(out_id + i, h, m) for i, (h, m) in enumerate(zip(leaves, metas))])
        return {"out": spec, "tensors": metas}, out


_REQUESTS: dict[str, Callable[..., tuple[dict, list]]] = {
    "info": Session.r_info, "ping": Session.r_ping, "stats": Session.r_stats, "upload": Session.r_upload,
    "download": Session.r_download, "free": Session.r_free, "supports": Session.r_supports, "run": Session.r_run,
}


class _BackendFailure(Exception):
    """The backend raised while running a request: the client sees its type and message."""


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except ProtocolError:
        raise
    except Exception as e:
        raise _BackendFailure(f"{type(e).__name__}: {e}".splitlines()[0][:500]) from None


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


class Server:
    """The protocol server around one backend instance. `start()` in a running loop, or `ServerThread`."""

    def __init__(self, backend: Backend | str, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_message: int = DEFAULT_MAX_MESSAGE, timeout: float = DEFAULT_TIMEOUT,
                 max_session_bytes: int = 0, backend_options: dict[str, Any] | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None):
        if not is_loopback(host) and not token:
            raise TapmlError(f"refusing to listen on {host} without a token: pass --token-file FILE "
                             "(or set TAPML_TOKEN); clients need the same token")
        self.ssl = _tls_context(tls_cert, tls_key) if tls_cert else None
        self.owns_backend = isinstance(backend, str)  # made here, so closed here
        self.backend = get_backend(backend, **(backend_options or {})) if isinstance(backend, str) else backend
        self.host, self.port, self.token = host, port, token
        self.max_message, self.timeout, self.max_session_bytes = max_message, timeout, max_session_bytes
        self.sessions: set[Session] = set()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="tapml-serve")
        self.refused = 0
        self._server: Any = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.ssl else 'ws'}://{host}:{self.port}"

    def stats(self) -> dict[str, int]:
        sessions = list(self.sessions)
        return {"sessions": len(sessions), "handles": sum(len(s.handles) for s in sessions),
                "bytes": sum(s.nbytes for s in sessions), "refused": self.refused}

    async def start(self) -> None:
        from websockets.asyncio.server import serve

        self._server = await serve(self._connection, self.host, self.port, ssl=self.ssl, max_size=self.max_message,
                                   compression=None, ping_interval=20, ping_timeout=60, max_queue=4,
                                   write_limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.worker.shutdown(wait=False, cancel_futures=True)

    async def _connection(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        peer = str(ws.remote_address)
        session: Session | None = None
        try:
            session = await self._handshake(ws, peer)
            if session is None:
                return
            self.sessions.add(session)
            async for msg in ws:
                reply, blobs = await self._serve_one(session, msg)
                await ws.send(encode_frame(reply, blobs))
        except ConnectionClosed:
            pass
        finally:
            if session is not None:
                self.sessions.discard(session)
                # Drop the tensors on the worker: a request of this session may still be running there.
                await asyncio.get_running_loop().run_in_executor(self.worker, session.close)

    async def _handshake(self, ws: Any, peer: str) -> Session | None:
        nonce = secrets.token_hex(32)
        await ws.send(encode_frame({"type": "hello", "protocol": VERSION, "server": "tapml", "nonce": nonce,
                                    "auth": bool(self.token), "max_message": self.max_message}))
        try:
            msg = await asyncio.wait_for(ws.recv(), AUTH_TIMEOUT)
            header, _ = decode_frame(msg)
        except (TimeoutError, ProtocolError):
            header = {}
        cnonce = header.get("cnonce")
        ok = header.get("type") == "auth" and header.get("protocol") == VERSION and isinstance(cnonce, str) \
            and 16 <= len(cnonce) <= 256
        if ok and self.token:
            ok = check_mac(self.token, "client", nonce, cnonce, header.get("mac"))
        if not ok:
            self.refused += 1
            why = ("protocol version mismatch" if header.get("type") == "auth" and header.get("protocol") != VERSION
                   else "authentication failed")
            with contextlib.suppress(Exception):
                await ws.send(encode_frame({"type": "refused", "ok": False, "error": why}))
            await ws.close(1008, why)
            return None
        session = Session(self, peer)
        smac = auth_mac(self.token, "server", nonce, cnonce) if self.token else None
        await ws.send(encode_frame({"type": "welcome", "ok": True, "mac": smac, "backend": self.backend.name}))
        return session

    async def _serve_one(self, session: Session, msg: Any) -> tuple[dict[str, Any], list[Any]]:
        rid = None
        try:
            header, blobs = decode_frame(msg)
            rid = header.get("id")
            if header.get("type") == "ping":  # answered on the loop: a busy worker must not look like a dead server
                return {"ok": True, "pong": header.get("t"), "id": rid}, []
            fut = asyncio.get_running_loop().run_in_executor(self.worker, session.handle, header, blobs)
            reply, out = await asyncio.wait_for(fut, self.timeout)
        except ProtocolError as e:
            reply, out = {"ok": False, "error": str(e), "kind": "protocol"}, []
        except _BackendFailure as e:
            reply, out = {"ok": False, "error": str(e), "kind": "backend"}, []
        except TimeoutError:
            reply, out = {"ok": False, "error": f"request timed out after {self.timeout:g}s", "kind": "timeout"}, []
        except Exception as e:  # a bug of ours must not take the server down; the client gets its message
            reply, out = {"ok": False, "error": f"server error: {type(e).__name__}: {e}"[:500], "kind": "server"}, []
        reply["id"] = rid if isinstance(rid, (int, str)) else None
        return reply, out


class ServerThread:
    """A `Server` running its own event loop in a daemon thread (tests, benchmarks, the browser host)."""

    def __init__(self, backend: Backend | str, **options: Any):
        self.server = Server(backend, **options)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tapml-serve-loop", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self.thread.start()
        self._ready.wait()
        if self._error:
            raise self._error
        return self

    @property
    def url(self) -> str:
        return self.server.url

    def stats(self) -> dict[str, int]:
        return self.server.worker.submit(self.server.stats).result(60)  # on the worker: no request mid-way

    def stop(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if self.server.owns_backend:
            self.server.backend.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(backend: str, host: str = "127.0.0.1", port: int = 0, token_file: str | Path | None = None,
          max_message: int = DEFAULT_MAX_MESSAGE, timeout: float = DEFAULT_TIMEOUT,
          on_listening: Callable[[Server], None] | None = None, backend_options: dict[str, Any] | None = None,
          tls_cert: str | Path | None = None, tls_key: str | Path | None = None) -> None:
    """Serve `backend` until interrupted: the API behind `tapml serve`."""
    token = read_token(token_file)
    try:
        server = Server(backend, host, port, token, max_message, timeout, backend_options=backend_options,
                        tls_cert=tls_cert, tls_key=tls_key)
    except TypeError as e:  # an option the backend does not take
        raise TapmlError(f"backend {backend}: {e}") from None

    async def main() -> None:
        # Ctrl-C (SIGINT) and SIGTERM stop the server, also when the process inherited SIGINT as ignored (as
        # children of some test runners and of `cmd &` in scripts do), where Python's KeyboardInterrupt never comes.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        if on_listening:
            on_listening(server)
        try:
            await stop.wait()
        finally:
            # From here the process must end: a worker thread still inside a backend call, or a connection that
            # does not close, would otherwise hold asyncio's and the interpreter's exit (both join threads).
            watchdog = threading.Timer(2 * _STOP_SECONDS, _leave)
            watchdog.daemon = True
            watchdog.start()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.stop(), _STOP_SECONDS)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise TapmlError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    finally:
        server.backend.close()


_STOP_SECONDS = 5.0


def _leave() -> None:
    import sys

    print("tapml serve: shutdown did not finish in time; exiting", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

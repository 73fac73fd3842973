"""The `remote` backend: a host-side Backend that forwards every call to a `tapml serve` over WebSocket.

Uploads and frees are queued and ride along with the next request, so a chain of run() calls on resident
handles costs one round trip each and `execute()` costs one in all. A dropped connection is redialled with
backoff; tensors the host still has are re-uploaded, anything else fails its case as an error. It must not
report a result it did not get back from the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.backends import Backend
from tapml.errors import TapmlError
from tapml.ops import OpCall, encode_value, mutated_args
from tapml.remote.protocol import (
    VERSION,
    ProtocolError,
    RemoteError,
    auth_mac,
    check_mac,
    decode_frame,
    encode_frame,
    tensor_from_payload,
    tensor_payload,
)
from tapml.remote.server import read_token
from tapml.remote.worker import MAX_OUTPUTS

_STATELESS = ("info", "ping", "stats", "supports")  # safe to send again on a new connection
BACKOFF = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)  # seconds between redials of a dropped connection (~3 s in all)


class RemoteTensor:
    """A tensor held by the server: its id in this client's session, its metadata, and (for uploads) the host
    tensor it came from, so it can be sent again after a reconnect if the host has not changed it since."""

    __slots__ = ("__weakref__", "cache", "cache_at", "client", "dirty", "epoch", "host", "id", "meta", "version")

    def __init__(self, client: RemoteBackend, hid: int, meta: dict[str, Any] | None,
                 host: torch.Tensor | None = None):
        self.client, self.id, self.epoch, self.meta = client, hid, client.epoch, meta
        self.host, self.version, self.dirty = host, (host._version if host is not None else 0), False
        self.cache, self.cache_at = None, -1  # the value fetched with the run that made it (one download)
        weakref.finalize(self, client._release, hid, client.epoch)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.meta["shape"]) if self.meta else torch.Size()

    @property
    def dtype(self) -> torch.dtype | None:
        from tapml.remote.protocol import DTYPES

        return DTYPES[self.meta["dtype"]] if self.meta else None

    def __repr__(self) -> str:
        m = self.meta or {}
        return f"RemoteTensor(#{self.id}, {m.get('dtype', '?')}{m.get('shape', '?')})"


class _Lost(Exception):
    """A handle from before a reconnect that cannot be sent again."""


class RemoteBackend(Backend):
    name = "remote"
    description = "forwards op calls to `tapml serve` on another machine (WebSocket protocol)"

    def __init__(self, url: str | None = None, token: str | None = None, token_file: str | Path | None = None,
                 expect: str | None = None, timeout: float = 300.0, max_message: int | None = None,
                 cafile: str | Path | None = None, prefetch: int = 4 << 20):
        """`prefetch`: a run's outputs come back with its reply when together they take at most this many
        bytes, so the download that usually follows costs no round trip (0: never)."""
        url = url or os.environ.get("TAPML_REMOTE")
        if not url:
            raise TapmlError("backend remote needs a server: pass --remote ws://HOST:PORT (start one with "
                             "`tapml serve --backend NAME`)")
        _check_url(url)
        self.url, self.timeout = url, timeout
        self.cafile = cafile or os.environ.get("TAPML_CA") or None
        self.token = token or read_token(token_file)
        self.epoch = 0
        self._ws: Any = None
        self._lock = threading.RLock()
        self._next = 1
        self._rid = 0
        self._pending: list[tuple[dict[str, Any], list[Any]]] = []
        self._frees: list[int] = []
        self._supports: dict[str, str | None] = {}
        self._gone: str | None = None
        self.reconnects = 0
        self.prefetch = prefetch
        self._mutations = 0  # runs of in-place ops so far: a prefetched value from before one may be stale
        self.requests = self.bytes_sent = self.bytes_received = 0
        self.max_message = max_message
        try:
            self._connect()
        except _Unreachable as e:
            raise TapmlError(f"{e}; is `tapml serve` running there?") from None
        self.info = self._request({"type": "info"})[0]
        if expect and expect != self.info["backend"]:
            self.close()
            raise TapmlError(f"the server at {url} hosts backend {self.info['backend']!r}, not {expect!r}")
        self.name = f"remote:{self.info['backend']}"
        self.description = f"{self.info['backend']} at {url}: {self.info.get('description', '')}"
        self.replays_torch_rng = bool(self.info.get("replays_torch_rng"))
        self.max_message = max_message or int(self.info.get("max_message") or 0) or None

    # --- connection ----------------------------------------------------------------------------------------
    def _connect(self) -> None:
        from websockets.exceptions import InvalidHandshake, InvalidURI
        from websockets.sync.client import connect

        tls = None
        if self.url.startswith("wss://"):
            import ssl

            try:
                tls = ssl.create_default_context(cafile=self.cafile)
            except (OSError, ssl.SSLError) as e:
                raise TapmlError(f"cannot load the CA certificate {self.cafile}: {e}") from None
        try:
            ws = connect(self.url, compression=None, max_size=None, proxy=None, open_timeout=10,
                         ping_interval=None, close_timeout=2, legacy=True, ssl=tls)
        except InvalidURI as e:
            raise TapmlError(f"bad remote URL {self.url}: {e}") from None
        except (OSError, TimeoutError, InvalidHandshake) as e:
            raise _Unreachable(f"cannot reach {self.url}: {_why(e)}") from None
        try:
            hello, _ = decode_frame(ws.recv(timeout=10))
            if hello.get("type") != "hello" or hello.get("server") != "tapml":
                raise TapmlError(f"{self.url} is not a tapml server")
            if hello.get("protocol") != VERSION:
                raise TapmlError(f"{self.url} speaks tapml protocol {hello.get('protocol')}, this client {VERSION}; "
                                 "install the same tapml on both sides")
            if hello.get("auth") and not self.token:
                raise TapmlError(f"{self.url} requires a token: set TAPML_TOKEN or pass --token-file FILE")
            cnonce = secrets.token_hex(32)
            mac = auth_mac(self.token, "client", hello["nonce"], cnonce) if self.token else None
            ws.send(encode_frame({"type": "auth", "protocol": VERSION, "cnonce": cnonce, "mac": mac,
                                  "client": "tapml"}))
            welcome, _ = decode_frame(ws.recv(timeout=10))
            if welcome.get("type") != "welcome":
                raise TapmlError(f"{self.url} refused this client: {welcome.get('error', 'no reason given')}"
                                 + ("; check the token" if self.token else ""))
            if self.token and not check_mac(self.token, "server", hello["nonce"], cnonce, welcome.get("mac")):
                raise TapmlError(f"{self.url} could not prove it knows the token; refusing to talk to it")
            # The server reads the first frame after `welcome` under its pre-authentication size limit: a ping
            # takes that slot, so the next request may be as large as max_message (docs/PROTOCOL.md).
            ws.send(encode_frame({"type": "ping", "id": 0}))
            decode_frame(ws.recv(timeout=10))
        except TapmlError:
            ws.close()
            raise
        except Exception as e:
            ws.close()
            raise _Unreachable(f"handshake with {self.url} failed: {_why(e)}") from None
        self._ws = ws

    def _drop(self) -> None:
        """Forget the connection; the server frees everything of this session, so old handles go stale."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
        self._ws = None
        self.epoch += 1
        self._pending.clear()
        self._frees.clear()

    def _redial(self, first_error: str) -> None:
        delays = BACKOFF if self._gone is None else (0.0,)
        last = first_error
        for d in delays:
            time.sleep(d)
            try:
                self._connect()
                self._gone = None
                self.reconnects += 1
                return
            except _Unreachable as e:
                last = str(e)
        self._gone = f"remote server {self.url} is gone ({last}); start `tapml serve` again"
        raise TapmlError(self._gone)

    # --- requests ------------------------------------------------------------------------------------------
    def _request(self, header: dict[str, Any], blobs: list[Any] = (),
                 build: Callable[[], tuple[dict[str, Any], list[Any]]] | None = None
                 ) -> tuple[dict[str, Any], list[memoryview]]:
        """Send one request (with queued uploads/frees ahead of it) and return its reply.

        `build` rebuilds the request after a reconnect (re-sending what the host still has); without it a
        dropped connection during the request is an error.
        """
        with self._lock:
            if self._ws is None:
                self._redial(self._gone or "not connected")
                if build is not None:
                    header, blobs = build()
            try:
                return self._roundtrip(header, list(blobs))
            except _Dropped as e:
                self._drop()
                self._redial(str(e))
            if build is None and header.get("type") not in _STATELESS:
                raise TapmlError(f"connection to {self.url} dropped during a request; reconnected, but the "
                                 "request's server-side tensors are gone")
            if build is not None:
                header, blobs = build()
            try:
                return self._roundtrip(header, list(blobs))
            except _Dropped as e:
                self._drop()
                raise TapmlError(f"connection to {self.url} dropped twice during one request ({e})") from None

    def _roundtrip(self, header: dict[str, Any], blobs: list[Any], carry: bool = True
                   ) -> tuple[dict[str, Any], list[memoryview]]:
        from websockets.exceptions import ConnectionClosed

        queued = self._take_queued() if carry else []
        if queued:
            own = header["calls"] if header.get("type") == "batch" else [header]
            calls, all_blobs = [], []
            for h, b in [*queued, (None, blobs)]:
                if h is None:
                    calls += [_rebase(c, len(all_blobs)) for c in own]
                else:
                    calls.append(_rebase(h, len(all_blobs)))
                all_blobs += b
            wire, wire_blobs = {"type": "batch", "calls": calls}, all_blobs
        else:
            wire, wire_blobs = header, blobs
        self._rid += 1
        pieces = encode_frame(dict(wire, id=self._rid), wire_blobs)
        size = sum(len(memoryview(p).cast("B")) for p in pieces)
        if self.max_message and size > self.max_message:
            self._pending[:0] = [q for q in queued if q[0]["type"] != "free"]  # keep them for the next request
            self._frees += [i for q in queued if q[0]["type"] == "free" for i in q[0]["ids"]]
            raise TapmlError(f"request of {size} bytes exceeds the server's maximum message size "
                             f"({self.max_message}); start `tapml serve --max-message-mb` larger")
        try:
            self._ws.send(pieces if size > (1 << 20) else b"".join(pieces))
            self.requests += 1
            self.bytes_sent += size
            while True:
                msg = self._ws.recv(timeout=self.timeout)
                self.bytes_received += len(msg)
                reply, rblobs = decode_frame(msg)
                if reply.get("id") == self._rid:
                    break
        except TimeoutError:
            raise _Dropped(f"no reply within {self.timeout:g}s") from None
        except (ConnectionClosed, OSError, ProtocolError) as e:
            raise _Dropped(_why(e)) from None
        if queued:
            reply = _unbatch(reply, len(queued), header.get("type") == "batch")
        if not reply.get("ok"):
            raise RemoteError(f"{reply.get('error', 'remote error')}")
        return reply, rblobs

    def _take_queued(self) -> list[tuple[dict[str, Any], list[Any]]]:
        q = list(self._pending)
        if self._frees:
            q.append(({"type": "free", "ids": list(self._frees)}, []))
        self._pending.clear()
        self._frees.clear()
        return q

    def _release(self, hid: int, epoch: int) -> None:
        if epoch == self.epoch and self._ws is not None:
            self._frees.append(hid)  # rides along with the next request

    def _ids(self, n: int) -> int:
        first = self._next
        self._next += n
        return first

    # --- tensors -------------------------------------------------------------------------------------------
    def _upload_req(self, t: torch.Tensor, hid: int, blob_index: int) -> tuple[dict[str, Any], Any]:
        meta, blob = tensor_payload(t)
        return dict(meta, id=hid, blob=blob_index), blob

    def upload(self, t: torch.Tensor) -> RemoteTensor:
        with self._lock:
            hid = self._ids(1)
            meta, blob = self._upload_req(t, hid, 0)
            if self.max_message and len(blob) + 4096 > self.max_message:
                raise TapmlError(f"a tensor of {len(blob)} bytes exceeds the server's maximum message size "
                                 f"({self.max_message}); start `tapml serve --max-message-mb` larger")
            cap = min(64 << 20, (self.max_message or 1 << 62) // 2)
            if self._pending and sum(len(b[0]) for _, b in self._pending) + len(blob) > cap:
                self._request({"type": "ping"})  # send what is queued before it grows past one message
            self._pending.append(({"type": "upload", "tensors": [meta]}, [blob]))
            return RemoteTensor(self, hid, {k: v for k, v in meta.items() if k not in ("id", "blob")}, t)

    def _ensure(self, h: RemoteTensor, uploads: list[dict[str, Any]], blobs: list[Any]) -> int:
        """The id of `h` in the current connection, re-uploading it from the host after a reconnect."""
        if h.client is not self:
            raise TapmlError("a remote tensor from another remote backend was passed to this one")
        if h.epoch == self.epoch:
            return h.id
        if h.host is None or h.dirty or h.host._version != h.version:
            raise _Lost(f"remote tensor #{h.id} was lost when the connection to {self.url} dropped (it was "
                        "computed or changed on the server, so the host has no copy); rerun from its inputs")
        hid = self._ids(1)
        meta, blob = self._upload_req(h.host, hid, len(blobs))
        uploads.append(meta)
        blobs.append(blob)
        h.id, h.epoch = hid, self.epoch
        weakref.finalize(h, self._release, hid, self.epoch)
        return hid

    def download(self, h: RemoteTensor) -> torch.Tensor:
        if h.cache is not None:
            t, fresh = h.cache, h.cache_at == self._mutations and h.epoch == self.epoch
            h.cache = None
            if fresh:
                return t

        def build() -> tuple[dict, list]:
            uploads: list = []
            blobs: list = []
            hid = self._ensure(h, uploads, blobs)
            calls = ([{"type": "upload", "tensors": uploads}] if uploads else []) + [{"type": "download",
                                                                                    "ids": [hid]}]
            return {"type": "batch", "calls": calls}, blobs

        with self._lock:
            try:
                header, blobs = build()
                reply, rblobs = self._request(header, blobs, build)
            except _Lost as e:
                raise TapmlError(str(e)) from None
            t = reply["replies"][-1]["tensors"][0]
            return tensor_from_payload(t, rblobs[t["blob"]])

    def is_handle(self, x: Any) -> bool:
        return isinstance(x, RemoteTensor)

    # --- calls ---------------------------------------------------------------------------------------------
    def _encode_call(self, call: OpCall, uploads: list[dict[str, Any]], blobs: list[Any],
                     temps: list[int]) -> dict[str, Any]:
        """The run request's op, args and tensor refs; host tensors become temporary uploads."""
        leaves: list[Any] = []
        spec = {"args": [_encode(a, leaves) for a in call.args],
                "kwargs": {k: _encode(v, leaves) for k, v in call.kwargs.items()}}
        refs = []
        for x in leaves:
            if isinstance(x, RemoteTensor):
                refs.append(self._ensure(x, uploads, blobs))
            else:
                hid = self._ids(1)
                meta, blob = self._upload_req(x, hid, len(blobs))
                uploads.append(meta)
                blobs.append(blob)
                temps.append(hid)
                refs.append(hid)
        req: dict[str, Any] = {"type": "run", "op": call.op, "args": spec, "tensors": refs}
        if call.rng_state is not None:
            req["rng"] = len(blobs)
            blobs.append(memoryview(call.rng_state.contiguous().numpy()).cast("B"))
        return req

    def _call(self, call: OpCall, keep: bool, fetch: bool | int
              ) -> tuple[Any, list[dict[str, Any]], list[memoryview], int]:
        state: dict[str, Any] = {}

        def build() -> tuple[dict, list]:
            uploads: list = []
            blobs: list = []
            temps: list = []
            req = self._encode_call(call, uploads, blobs, temps)
            base = self._ids(MAX_OUTPUTS) if keep else 0
            state["base"] = base
            calls = [{"type": "upload", "tensors": uploads}] if uploads else []
            calls.append(dict(req, keep=keep, fetch=fetch, out=base))
            if temps:
                calls.append({"type": "free", "ids": temps})
            state["temps"] = temps
            return {"type": "batch", "calls": calls}, blobs

        with self._lock:
            try:
                header, blobs = build()
                reply, rblobs = self._request(header, blobs, build)
            except _Lost as e:
                raise TapmlError(str(e)) from None
            except RemoteError:
                self._frees += state.get("temps", [])  # the batch stopped before its free
                raise
            run = next(r for r in reply["replies"] if "out" in r)
            return run["out"], run["tensors"], rblobs, state["base"]

    def run(self, call: OpCall) -> Any:
        try:
            spec, metas, rblobs, base = self._call(call, keep=True, fetch=self.prefetch or False)
        finally:
            if mutated_args(call.func()):  # the server's copy changed (perhaps even when the op failed)
                self._mutations += 1  # prefetched values from before are stale
                for x in pytree.tree_leaves((call.args, call.kwargs)):
                    if isinstance(x, RemoteTensor):
                        x.dirty = True  # the host's copy is no longer a valid backup
        handles = []
        for i, m in enumerate(metas):
            h = RemoteTensor(self, base + i, m and {k: v for k, v in m.items() if k != "blob"})
            if m and "blob" in m:
                h.cache, h.cache_at = tensor_from_payload(m, rblobs[m["blob"]]), self._mutations
            handles.append(h)
        return _decode(spec, handles)

    def execute(self, call: OpCall) -> Any:
        """Upload, run, download and free in one round trip."""
        spec, metas, rblobs, _ = self._call(call, keep=False, fetch=True)
        return _decode(spec, [tensor_from_payload(m, rblobs[m["blob"]]) for m in metas])

    def supports(self, call: OpCall) -> str | None:
        leaves: list[Any] = []
        spec = {"args": [_encode(a, leaves) for a in call.args],
                "kwargs": {k: _encode(v, leaves) for k, v in call.kwargs.items()}}
        metas = [_meta(x) for x in leaves]
        key = json.dumps([call.op, spec, metas], separators=(",", ":"))
        if key not in self._supports:
            reply, _ = self._request({"type": "supports", "op": call.op, "args": spec,
                                      "tensors": [{"meta": m} for m in metas]})
            self._supports[key] = reply.get("reason")
        return self._supports[key]

    def stats(self) -> dict[str, Any]:
        """This session's handles and bytes on the server (after queued frees are applied)."""
        return self._request({"type": "stats"})[0]

    def ping(self) -> float:
        """Seconds for a round trip the server answers on its event loop (queued work stays queued)."""
        with self._lock:
            if self._ws is None:
                self._redial(self._gone or "not connected")
            t0 = time.perf_counter()
            try:
                self._roundtrip({"type": "ping"}, [], carry=False)
            except _Dropped as e:
                self._drop()
                raise TapmlError(f"connection to {self.url} dropped during a ping ({e})") from None
            return time.perf_counter() - t0

    def close(self) -> None:
        with self._lock:
            if self._ws is not None:
                with contextlib.suppress(Exception):  # flush queued frees; the server frees all on close anyway
                    if self._frees or self._pending:
                        self._roundtrip({"type": "ping"}, [])
                self._ws.close()
                self._ws = None
            self.epoch += 1


def _check_url(url: str) -> None:
    """ws://HOST:PORT or wss://HOST:PORT, checked before anything dials it."""
    from urllib.parse import urlsplit

    if not url.startswith(("ws://", "wss://")):
        raise TapmlError(f"remote URL {url!r} must start with ws:// or wss://")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port out of range or not a number
    except ValueError as e:
        raise TapmlError(f"bad remote URL {url!r} ({e}); expected ws://HOST:PORT") from None
    if not parts.hostname or port is None:
        raise TapmlError(f"bad remote URL {url!r}: expected ws://HOST:PORT, e.g. ws://127.0.0.1:8765")


class _Unreachable(TapmlError):
    """The server could not be reached or did not complete the handshake (redialling may help)."""


class _Dropped(Exception):
    pass


def _why(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def _meta(x: Any) -> dict[str, Any]:
    if isinstance(x, RemoteTensor):
        return dict(x.meta or {})
    from tapml.remote.protocol import DTYPE_NAMES

    m: dict[str, Any] = {"dtype": DTYPE_NAMES.get(x.dtype, str(x.dtype)), "shape": list(x.shape)}
    if not x.is_contiguous() or x.storage_offset():
        m["stride"], m["offset"] = list(x.stride()), x.storage_offset()
    return m


def _encode(x: Any, leaves: list[Any]) -> Any:
    if isinstance(x, (torch.Tensor, RemoteTensor)):
        leaves.append(x)
        return {"T": len(leaves) - 1}
    if isinstance(x, list):
        return [_encode(v, leaves) for v in x]
    if isinstance(x, tuple):
        return {"tuple": [_encode(v, leaves) for v in x]}
    if isinstance(x, dict):
        return {"dict": {str(k): _encode(v, leaves) for k, v in x.items()}}
    return encode_value(x, [])


def _decode(x: Any, leaves: list[Any]) -> Any:
    if isinstance(x, list):
        return [_decode(v, leaves) for v in x]
    if not isinstance(x, dict):
        return x
    (key, val), = x.items()
    if key == "T":
        return leaves[val]
    if key == "tuple":
        return tuple(_decode(v, leaves) for v in val)
    from tapml.remote.protocol import decode_arg

    return decode_arg(x, [])


def _rebase(req: dict[str, Any], base: int) -> dict[str, Any]:
    """Shift a request's blob indices by `base` (requests are merged into one batch frame)."""
    if not base:
        return req
    req = dict(req)
    if req.get("type") == "upload":
        req["tensors"] = [dict(t, blob=t["blob"] + base) for t in req["tensors"]]
    if req.get("rng") is not None:
        req["rng"] = req["rng"] + base
    return req


def _unbatch(reply: dict[str, Any], n_queued: int, was_batch: bool) -> dict[str, Any]:
    """The reply to the caller's own request out of a batch that carried queued requests ahead of it."""
    if not reply.get("ok"):
        at = reply.get("at", 0)
        if at < n_queued:
            return dict(reply, error=f"a queued upload/free failed: {reply.get('error')}")
        return dict(reply, at=at - n_queued)
    replies = reply["replies"][n_queued:]
    if was_batch:
        return {"ok": True, "replies": replies}
    return dict(replies[0], ok=True)

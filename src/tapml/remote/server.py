"""`tapml serve`: host any registered backend behind the TapML WebSocket protocol (docs/PROTOCOL.md,
docs/SECURITY.md).

The event loop admits connections (connection caps, Host and Origin checks, a tiny message limit until the
HMAC handshake passes — a token is always required, generated when none is given) and relays each session's
frames to a worker process of its own (`tapml.remote.worker`), which holds the backend and the session's
tensors. A request over its time budget kills that process; no client can hold another's work. It must not
trust the client: nothing is unpickled or evaluated, and ops run only from an allow-list.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Self

from tapml.backends import Backend, backend_class
from tapml.errors import TapmlError
from tapml.remote.oppolicy import OpPolicy
from tapml.remote.protocol import VERSION, ProtocolError, auth_mac, check_mac, decode_frame, encode_frame
from tapml.remote.worker import ACCOUNT, MAX_OUTPUTS, Limits, backend_spec

__all__ = ["MAX_OUTPUTS", "Server", "ServerThread", "is_loopback", "parse_options", "read_token", "serve"]

DEFAULT_MAX_MESSAGE = 256 << 20
DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_SESSION_BYTES = 8 << 30
DEFAULT_MAX_OP_ELEMENTS = 1 << 31
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_MAX_UNAUTHENTICATED = 4
AUTH_TIMEOUT = 10.0
# Until a connection has authenticated (and for its first frame after `welcome`, see docs/PROTOCOL.md), no frame
# may exceed this: an unauthenticated peer can make the server hold no more than a few KiB.
PREAUTH_MAX_MESSAGE = 4 << 10
WORKER_START_TIMEOUT = 300.0
_MIN_MAX_MESSAGE = 64 << 10


def read_token(token_file: str | Path | None = None, env: str = "TAPML_TOKEN") -> str | None:
    """The shared secret: from `token_file` when given, else the environment, else None."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise TapmlError(f"cannot read token file {token_file}: {getattr(e, 'strerror', None) or e}") from None
        if not token:
            raise TapmlError(f"token file {token_file} is empty; put a long random secret in it")
        return token
    return os.environ.get(env) or None


def new_token() -> str:
    return secrets.token_urlsafe(32)


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
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_header_is_loopback(value: str | None) -> bool:
    """A Host header naming the loopback address (with or without a port): what a local client sends. A web page
    that rebinds its own domain to 127.0.0.1 sends its domain instead."""
    if not value:
        return False
    host = value.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return is_loopback(host)


# --- worker processes --------------------------------------------------------------------------------------

class WorkerGone(Exception):
    """The session's worker process ended while a request was in it."""


class _Zygote:
    """The process session processes are forked from (`tapml.remote.worker.zygote`): started once per server
    process, restarted if it died."""

    _lock = threading.Lock()
    _current: _Zygote | None = None

    def __init__(self) -> None:
        self.ctrl, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this process imports
        self.proc = subprocess.Popen([sys.executable, "-m", "tapml.remote.worker", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.reader = self.ctrl.makefile("rb")

    @classmethod
    def get(cls) -> _Zygote:
        with cls._lock:
            if cls._current is None or cls._current.proc.poll() is not None:
                cls._current = cls()
            return cls._current

    def fork(self, spec: dict[str, Any]) -> tuple[int, Connection]:
        ours, theirs = socket.socketpair()
        with self._lock:
            socket.send_fds(self.ctrl, [json.dumps(spec).encode()], [theirs.fileno()])
            theirs.close()
            line = self.reader.readline()
        if not line:
            raise TapmlError("the session process could not be started (the zygote ended)")
        return json.loads(line)["pid"], Connection(ours.detach())


class Worker:
    """The server's side of one session's process: start it, relay frames, kill it."""

    def __init__(self, backend: str | type[Backend], options: dict[str, Any], limits: Limits):
        spec = {"backend": backend_spec(backend), "options": options,
                "limits": {k: sorted(v) if isinstance(v, frozenset) else v for k, v in asdict(limits).items()}}
        try:
            self.pid, self.conn = _Zygote.get().fork(spec)
        except OSError as e:
            raise TapmlError(f"the session process could not be started: {e}") from None
        self.backend_name: str | None = None

    def wait_ready(self, timeout: float = WORKER_START_TIMEOUT) -> str:
        """Block until the backend is built; its name, or a TapmlError with the reason it could not be."""
        try:
            if not self.conn.poll(timeout):
                self.kill()
                raise TapmlError(f"the backend did not start within {timeout:g}s")
            msg = json.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            self.kill()
            raise TapmlError("the session process ended while building the backend") from None
        if "error" in msg:
            self.close()
            raise TapmlError(f"the backend failed to start: {msg['error']}")
        self.backend_name = msg["backend"]
        return self.backend_name

    def request(self, frame: bytes) -> tuple[tuple[int, int, bool], memoryview]:
        """Send one frame, return ((handles, bytes, has stats), reply frame). Blocking; WorkerGone if the process
        ends."""
        try:
            self.conn.send_bytes(frame)
            reply = memoryview(self.conn.recv_bytes())
            return ACCOUNT.unpack_from(reply), reply[ACCOUNT.size:]
        except (EOFError, OSError, ValueError, struct.error):
            raise WorkerGone("the session's process ended while running the request (a crash, or the machine ran "
                             "out of memory); its tensors are gone") from None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.conn.close()

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        return True

    def close(self, grace: float = 5.0) -> None:
        """Let the process free its backend and exit; kill it if it does not within `grace` seconds."""
        with contextlib.suppress(Exception):
            self.conn.close()
        end = time.monotonic() + grace
        while time.monotonic() < end and self.alive():
            time.sleep(0.02)
        if self.alive():
            self.kill()


@dataclass(eq=False)
class _Session:
    peer: str
    ready: asyncio.Future
    handles: int = 0
    nbytes: int = 0
    dead: str | None = None
    worker: Worker | None = field(default=None, repr=False)


class Server:
    """The protocol server around one backend. `start()` in a running loop, or `ServerThread`.

    `backend` is a registered name or a Backend subclass; each session builds its own instance in its own
    process. `token=None` generates one (`generated_token` is then True): there is no unauthenticated mode.
    """

    def __init__(self, backend: str | type[Backend], host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_message: int = DEFAULT_MAX_MESSAGE, timeout: float = DEFAULT_TIMEOUT,
                 max_session_bytes: int = DEFAULT_MAX_SESSION_BYTES, max_op_elements: int = DEFAULT_MAX_OP_ELEMENTS,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED, allow_origins: tuple[str, ...] = (),
                 allow_ops: tuple[str | Path, ...] = (), backend_options: dict[str, Any] | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None):
        _check_int("--port", port, 0, 65535)
        _check_int("--max-message-mb", max_message, _MIN_MAX_MESSAGE, 1 << 40, unit=1 << 20)
        _check_int("--max-session-mb", max_session_bytes, 1 << 20, 1 << 50, unit=1 << 20)
        _check_int("--max-op-elements", max_op_elements, 1, 1 << 50)
        _check_int("--max-connections", max_connections, 1, 1 << 16)
        _check_int("max_unauthenticated", max_unauthenticated, 1, 1 << 16)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or not 0 < timeout <= 86400:
            raise TapmlError(f"--timeout must be a number of seconds in (0, 86400] (got {timeout})")
        if isinstance(backend, Backend):
            raise TapmlError("the server builds a backend per session: pass its name or its class, not an instance")
        if isinstance(backend, str):
            backend_class(backend)  # unknown or unusable: a clear error now, not at the first connection
        if token is not None and not token:
            raise TapmlError("the token is empty; put a long random secret in it")
        self.generated_token = token is None
        self.token = token or new_token()
        self.ssl = _tls_context(tls_cert, tls_key) if tls_cert else None
        self.backend, self.backend_options = backend, dict(backend_options or {})
        self.backend_name = backend if isinstance(backend, str) else getattr(backend, "name", backend.__name__)
        self.policy = OpPolicy.from_files(list(allow_ops))
        self.limits = Limits(max_session_bytes, max_op_elements, max_message,
                             frozenset(self.policy.allowed - OpPolicy().allowed))
        self.host, self.port = host, port
        self.loopback = is_loopback(host)
        self.max_message, self.timeout = max_message, float(timeout)
        self.max_connections, self.max_unauthenticated = max_connections, max_unauthenticated
        self.allow_origins = frozenset(allow_origins)
        self.sessions: set[_Session] = set()
        self._unauth: dict[int, float] = {}  # admitted, not yet authenticated: id(connection) -> deadline
        self.refused = 0
        self._pool = ThreadPoolExecutor(max_connections + 4, thread_name_prefix="tapml-serve-io")
        self._server: Any = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.ssl else 'ws'}://{host}:{self.port}"

    def stats(self) -> dict[str, int]:
        sessions = list(self.sessions)
        return {"sessions": len(sessions), "handles": sum(s.handles for s in sessions),
                "bytes": sum(s.nbytes for s in sessions), "refused": self.refused}

    async def start(self) -> None:
        from websockets.asyncio.server import serve

        loop = asyncio.get_running_loop()
        # One session process built and dropped before listening: a backend that cannot be built (bad options,
        # no device) fails `tapml serve` itself, and the forkserver is warm for the first client.
        probe = await loop.run_in_executor(self._pool, Worker, self.backend, self.backend_options, self.limits)
        try:
            self.backend_name = await loop.run_in_executor(self._pool, probe.wait_ready)
        finally:
            await loop.run_in_executor(self._pool, probe.close)
        self._server = await serve(self._connection, self.host, self.port, ssl=self.ssl,
                                   max_size=PREAUTH_MAX_MESSAGE, process_request=self._admit, compression=None,
                                   ping_interval=20, ping_timeout=60, max_queue=4, write_limit=1 << 20,
                                   open_timeout=AUTH_TIMEOUT)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for s in list(self.sessions):
            if s.worker is not None:
                s.worker.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- admission -----------------------------------------------------------------------------------------
    def _admit(self, connection: Any, request: Any) -> Any:
        """Before the WebSocket handshake: Host (loopback servers), Origin, and the connection caps."""
        headers = request.headers
        hosts, origins = headers.get_all("Host"), headers.get_all("Origin")
        if len(hosts) != 1 or len(origins) > 1:
            self.refused += 1
            return connection.respond(HTTPStatus.FORBIDDEN, "one Host header and at most one Origin header\n")
        if self.loopback and not _host_header_is_loopback(hosts[0]):
            self.refused += 1
            return connection.respond(HTTPStatus.FORBIDDEN, "Host must name the loopback address\n")
        origin = origins[0] if origins else None
        if origin is not None and origin not in self.allow_origins:
            self.refused += 1
            return connection.respond(HTTPStatus.FORBIDDEN, f"origin {origin[:100]} is not allowed; start tapml "
                                      "serve with --allow-origin ORIGIN to let a page connect\n")
        now = time.monotonic()
        for key in [k for k, deadline in self._unauth.items() if deadline < now]:
            del self._unauth[key]
        if len(self._unauth) >= self.max_unauthenticated or \
                len(self._unauth) + len(self.sessions) >= self.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; try again later\n")
        self._unauth[id(connection)] = now + 2 * AUTH_TIMEOUT
        return None

    async def _connection(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        session: _Session | None = None
        try:
            ok = await self._handshake(ws)
            self._unauth.pop(id(ws), None)
            if not ok:
                return
            session = _Session(str(ws.remote_address), asyncio.get_running_loop().create_future())
            self.sessions.add(session)
            asyncio.get_running_loop().create_task(self._start_worker(session))
            async for msg in ws:
                await ws.send(await self._serve_one(session, msg))
                if session.dead:
                    await ws.close(1011, session.dead[:120])
                    break
        except ConnectionClosed:
            pass
        finally:
            self._unauth.pop(id(ws), None)
            if session is not None:
                self.sessions.discard(session)
                if session.worker is not None:
                    await asyncio.get_running_loop().run_in_executor(self._pool, session.worker.close)

    async def _start_worker(self, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        try:
            session.worker = await loop.run_in_executor(self._pool, Worker, self.backend, self.backend_options,
                                                        self.limits)
            await loop.run_in_executor(self._pool, session.worker.wait_ready)
            session.ready.set_result(session.worker)
        except Exception as e:
            session.ready.set_exception(TapmlError(str(e)))

    async def _handshake(self, ws: Any) -> bool:
        nonce = secrets.token_hex(32)
        await ws.send(encode_frame({"type": "hello", "protocol": VERSION, "server": "tapml", "nonce": nonce,
                                    "auth": True, "max_message": self.max_message,
                                    "preauth_max_message": PREAUTH_MAX_MESSAGE}))
        try:
            msg = await asyncio.wait_for(ws.recv(), AUTH_TIMEOUT)
            header, _ = decode_frame(msg)
        except (TimeoutError, ProtocolError):
            header = {}
        cnonce = header.get("cnonce")
        ok = header.get("type") == "auth" and header.get("protocol") == VERSION and isinstance(cnonce, str) \
            and 16 <= len(cnonce) <= 256 and check_mac(self.token, "client", nonce, cnonce, header.get("mac"))
        if not ok:
            self.refused += 1
            why = ("protocol version mismatch" if header.get("type") == "auth" and header.get("protocol") != VERSION
                   else "authentication failed")
            with contextlib.suppress(Exception):
                await ws.send(encode_frame({"type": "refused", "ok": False, "error": why}))
            await ws.close(1008, why)
            return False
        # The limit for messages rises now; the frame already being read keeps the small one, which is why the
        # client's first message after `welcome` is a ping (docs/PROTOCOL.md).
        ws.protocol.max_message_size = self.max_message
        await ws.send(encode_frame({"type": "welcome", "ok": True, "mac": auth_mac(self.token, "server", nonce, cnonce),
                                    "backend": self.backend_name}))
        return True

    # --- requests ------------------------------------------------------------------------------------------
    async def _serve_one(self, session: _Session, msg: Any) -> Any:
        try:
            header, _ = decode_frame(msg)
        except ProtocolError as e:
            return encode_frame({"ok": False, "error": str(e), "kind": "protocol", "id": None})
        rid = header.get("id")
        rid = rid if isinstance(rid, (int, str)) and not isinstance(rid, bool) else None
        if header.get("type") == "ping":  # answered on the loop: a busy worker must not look like a dead server
            t = header.get("t")
            return encode_frame({"ok": True, "pong": t if isinstance(t, (int, float, str)) and not isinstance(
                t, bool) else None, "id": rid})
        try:
            worker = await session.ready
        except TapmlError as e:
            session.dead = str(e)
            return encode_frame({"ok": False, "error": str(e), "kind": "backend", "id": rid})
        loop = asyncio.get_running_loop()
        data = msg if isinstance(msg, bytes) else bytes(msg)
        try:
            ctrl, frame = await asyncio.wait_for(loop.run_in_executor(self._pool, worker.request, data),
                                                 self.timeout)
        except TimeoutError:
            worker.kill()  # the only way to stop a computation; it took this session's tensors with it
            session.dead = (f"request exceeded the server's time budget of {self.timeout:g}s; the session was "
                            "stopped and its tensors freed (tapml serve --timeout)")
            session.handles = session.nbytes = 0
            return encode_frame({"ok": False, "error": session.dead, "kind": "timeout", "id": rid})
        except WorkerGone as e:
            session.dead = str(e)
            session.handles = session.nbytes = 0
            return encode_frame({"ok": False, "error": str(e), "kind": "backend", "id": rid})
        session.handles, session.nbytes, has_stats = ctrl
        if has_stats:
            reply, blobs = decode_frame(frame)
            for r in [reply, *reply.get("replies", ())]:
                if isinstance(r, dict) and "server" in r:
                    r["server"] = self.stats()
            return encode_frame(reply, blobs)
        return frame


def _check_int(flag: str, value: Any, lo: int, hi: int, unit: int = 1) -> None:
    """A one-line error in the flag's own unit (`--max-message-mb` counts MiB; the API counts bytes)."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        def show(x: Any) -> str:
            return f"{x / unit:g}" if unit != 1 and isinstance(x, (int, float)) else repr(x)

        raise TapmlError(f"{flag} must be in [{show(lo)}, {show(hi)}] (got {show(value)})")


class ServerThread:
    """A `Server` running its own event loop in a daemon thread (tests, benchmarks, the browser host)."""

    def __init__(self, backend: str | type[Backend], **options: Any):
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

    @property
    def token(self) -> str:
        return self.server.token

    def stats(self) -> dict[str, int]:
        async def read() -> dict[str, int]:
            return self.server.stats()

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(60)

    def stop(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(backend: str, host: str = "127.0.0.1", port: int = 0, token_file: str | Path | None = None,
          on_listening: Callable[[Server], None] | None = None, **options: Any) -> None:
    """Serve `backend` until interrupted: the API behind `tapml serve`. `options` are Server's keywords."""
    token = read_token(token_file)
    try:
        server = Server(backend, host, port, token, **options)
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
            # From here the process must end: a session process that does not go, or a connection that does not
            # close, would otherwise hold asyncio's and the interpreter's exit (both join threads).
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


_STOP_SECONDS = 5.0


def _leave() -> None:
    import sys

    print("tapml serve: shutdown did not finish in time; exiting", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


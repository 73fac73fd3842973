"""The browser host: a loopback HTTP + WebSocket server for the page, and headless Chromium pointed at it.

It serves `index.html` and `tapml.js`, launches Chromium (WebGPU on, network off, a throw-away profile), waits
for the page to connect and pass the HMAC handshake with a per-launch token, and then relays requests to it
synchronously. It must not run kernels itself, nor accept a second page.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from tapml.errors import TapmlError
from tapml.remote.protocol import (
    VERSION,
    ProtocolError,
    RemoteError,
    auth_mac,
    check_mac,
    decode_frame,
    encode_frame,
)

HERE = Path(__file__).parent
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/tapml.js": ("tapml.js", "text/javascript; charset=utf-8")}
CONNECT_TIMEOUT = 60.0

# WebGPU on (SwiftShader when there is no GPU: WebGPU with no driver at all), the network off but loopback,
# nothing that phones home, a throw-away profile. `--no-sandbox` is added only when running as root.
CHROMIUM_FLAGS = (
    "--headless=new", "--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-angle=swiftshader",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
    "--disable-domain-reliability", "--no-pings", "--no-proxy-server", "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows", "--enable-logging=stderr", "--v=0",
)


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if os.access(env, os.X_OK) else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class PageHost:
    """Owns the server thread, the Chromium process and the one page connection."""

    def __init__(self, chromium: str | None = None, flags: tuple[str, ...] = (), timeout: float = 300.0,
                 connect_timeout: float = CONNECT_TIMEOUT):
        self.chromium = chromium or find_chromium()
        if not self.chromium:
            raise TapmlError("webgpu-browser needs Chromium: install it (apt-get install chromium) or set "
                             "CHROMIUM=/path/to/chrome")
        self.timeout = timeout
        self.token = secrets.token_hex(32)
        self.loop = asyncio.new_event_loop()
        self._connected: asyncio.Future | None = None
        self._ws: Any = None
        self._rid = 0
        self._lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.profile = tempfile.mkdtemp(prefix="tapml-chromium-")
        self.log = Path(self.profile) / "chromium.log"
        self._thread = threading.Thread(target=self.loop.run_forever, name="tapml-browser-host", daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._start(), 30)
            self._launch(flags)
            self._call(self._wait_page(connect_timeout), connect_timeout + 5)
        except BaseException:
            self.close()
            raise

    # --- startup -------------------------------------------------------------------------------------------
    async def _start(self) -> int:
        from websockets.asyncio.server import serve

        self._connected = self.loop.create_future()
        self._server = await serve(self._page, "127.0.0.1", 0, process_request=self._http, max_size=None,
                                   compression=None, ping_interval=None, max_queue=None)
        return self._server.sockets[0].getsockname()[1]

    def _http(self, connection: Any, request: Any) -> Any:
        from websockets.datastructures import Headers
        from websockets.http11 import Response

        path = request.path.split("?", 1)[0]
        if path == "/ws":
            return None  # the WebSocket handshake goes on
        if path not in STATIC:
            return Response(404, "Not Found", Headers([("Content-Length", "0")]), b"")
        name, ctype = STATIC[path]
        body = (HERE / name).read_bytes()
        csp = f"default-src 'self'; connect-src ws://127.0.0.1:{self.port}"
        return Response(200, "OK", Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                                            ("Cache-Control", "no-store"), ("Content-Security-Policy", csp)]), body)

    def _launch(self, flags: tuple[str, ...]) -> None:
        cmd = [self.chromium, *CHROMIUM_FLAGS, *flags, f"--user-data-dir={self.profile}"]
        setpriv = shutil.which("setpriv")
        if setpriv:  # Chromium gets SIGKILL when the host dies, even by SIGKILL (parent-death signal)
            cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--no-sandbox")
        extra = os.environ.get("TAPML_CHROMIUM_FLAGS", "").split()
        cmd += [*extra, f"http://127.0.0.1:{self.port}/#{self.token}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        atexit.register(self.close)  # an exception or exit that skips close() must not leave Chromium running

    async def _wait_page(self, timeout: float = CONNECT_TIMEOUT) -> None:
        assert self._connected is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._connected), timeout)
        except TimeoutError:
            code = self.proc.poll() if self.proc else None
            state = f"Chromium exited with code {code}" if code is not None else "Chromium is running"
            raise TapmlError(f"the browser page did not connect within {timeout:g}s ({state}); "
                             f"its log: {self._log_tail()}") from None

    async def _page(self, ws: Any) -> None:
        """The page's connection: handshake, then hold it open until the host closes."""
        assert self._connected is not None
        if self._connected.done():
            await ws.close(1008, "a page is already connected")
            return
        nonce = secrets.token_hex(32)
        await ws.send(encode_frame({"type": "hello", "protocol": VERSION, "server": "tapml", "nonce": nonce,
                                    "auth": True, "profile": "gpu"}))
        try:
            header, _ = decode_frame(await asyncio.wait_for(ws.recv(), 30))
        except (TimeoutError, ProtocolError):
            header = {}
        cnonce = header.get("cnonce")
        if header.get("type") != "auth" or not isinstance(cnonce, str) or not check_mac(
                self.token, "client", nonce, cnonce, header.get("mac")):
            await ws.close(1008, "authentication failed")
            return
        await ws.send(encode_frame({"type": "welcome", "ok": True, "mac": auth_mac(self.token, "server", nonce,
                                                                                   cnonce)}))
        self._ws = ws
        self._connected.set_result(True)
        await ws.wait_closed()

    # --- requests ------------------------------------------------------------------------------------------
    def _call(self, coro: Any, timeout: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise TapmlError(f"the browser page did not answer within {timeout:g}s") from None

    def request(self, header: dict[str, Any], blobs: list[Any] = ()) -> tuple[dict[str, Any], list[memoryview]]:
        """Send one request to the page and return its reply; RemoteError when the page reports an error."""
        with self._lock:
            self._rid += 1
            reply, out = self._call(self._roundtrip(dict(header, id=self._rid), list(blobs)), self.timeout)
        if not reply.get("ok"):
            raise RemoteError(reply.get("error", "the page reported an error"))
        return reply, out

    async def _roundtrip(self, header: dict[str, Any], blobs: list[Any]) -> tuple[dict[str, Any], list]:
        from websockets.exceptions import ConnectionClosed

        if self._ws is None:
            raise TapmlError("the browser page is not connected")
        try:
            await self._ws.send(encode_frame(header, blobs))
            while True:
                reply, out = decode_frame(await self._ws.recv())
                if reply.get("id") == header["id"]:
                    return reply, out
        except ConnectionClosed:
            code = self.proc.poll() if self.proc else None
            raise TapmlError("the browser page went away" + (f" (Chromium exited with code {code})"
                                                            if code is not None else "")
                             + f"; its log: {self._log_tail()}") from None

    def _log_tail(self, n: int = 3) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines()
                     if "ERROR" in ln or "CONSOLE" in ln or "FATAL" in ln]
        except OSError:
            return "(no log)"
        return " | ".join(ln[-200:] for ln in lines[-n:]) or "(empty)"

    # --- shutdown ------------------------------------------------------------------------------------------
    def close(self) -> None:
        atexit.unregister(self.close)
        if self.loop.is_running():
            async def stop() -> None:
                if self._ws is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._ws.close(), 2)
                if getattr(self, "_server", None) is not None:
                    self._server.close()
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)

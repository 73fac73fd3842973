"""`BrowserRuntime`: the native WebGPU runtime's interface (alloc, write, read, kernel, dispatch, flush, sync),
carried out by a browser page instead of wgpu.

The WebGPU backend's launchers plan "dispatch kernel K over buffers B with parameter words P"; this runtime
records those plans and ships them to the page in one `gpu` request per flush (on a read, a sync, or when the
batch grows large), so a chain of ops costs one round trip. WGSL text comes from the backend's `kernels`
package; it must not generate kernels or know ATen ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tapml.backends.webgpu.runtime import (
    DTYPES,
    Kernel,
    RuntimeBase,
    Stats,
    Storage,
    _Buf,
    check_dispatch,
    grid_for,
)
from tapml.errors import TapmlError
from tapml.remote.browser.host import PageHost
from tapml.remote.protocol import RemoteError

_FLUSH_PARAMS = 1 << 20  # parameter bytes of one batch before it is sent anyway
_FLUSH_DATA = 64 << 20  # written bytes of one batch before it is sent anyway


class BrowserRuntime(RuntimeBase):
    """Drop-in for `tapml.backends.webgpu.runtime.Runtime` whose device is a WebGPU page."""

    who = "webgpu-browser"

    def __init__(self, host: PageHost):
        self.host = host
        info, _ = self._request({"type": "info"})
        limits = info.get("limits", {})
        self.features = set(info.get("features", []))
        self.f16 = "shader-f16" in self.features
        self.max_binding = int(limits.get("maxStorageBufferBindingSize", 128 << 20))
        self.max_groups = int(limits.get("maxComputeWorkgroupsPerDimension", 65535))
        self.wg_storage = int(limits.get("maxComputeWorkgroupStorageSize", 16384))
        self.uniform_align = max(256, int(limits.get("minUniformBufferOffsetAlignment", 256)))
        arch = info.get("architecture") or info.get("description") or "?"
        self.is_cpu = bool(info.get("fallback")) or arch == "swiftshader"
        self.info = {"device": f"{arch} ({info.get('vendor') or '?'})", "backend_type": "WebGPU in Chromium",
                     "adapter_type": "cpu" if self.is_cpu else "gpu", "user_agent": info.get("userAgent", "")}
        # A browser's WebGPU has no shader-int64: int64 lives narrowed to int32, range-checked on upload.
        self.int64_native = False
        self.dtypes = DTYPES
        self.finalize: Callable[[str], str] = lambda src: src  # the kernel library's last pass over a source
        self.stats = Stats()
        self._init_caches()
        self._next_buf = 0
        self._cmds: list[list[Any]] = []
        self._blobs: list[Any] = []
        self._data_bytes = 0
        self._params = bytearray()
        self._pending = 0

    def _request(self, header: dict[str, Any], blobs: list[Any] = ()) -> tuple[dict[str, Any], list[memoryview]]:
        try:
            return self.host.request(header, blobs)
        except RemoteError as e:
            raise TapmlError(f"webgpu-browser: {e}") from None

    # --- buffers -------------------------------------------------------------------------------------------
    def _new_buffer(self, size: int) -> _Buf:
        self._next_buf += 1
        buf = _Buf(self._next_buf, size)
        self._cmds.append(["create", buf.gpu, size])
        return buf

    def _drop(self, buf: _Buf) -> None:
        self._cmds.append(["destroy", buf.gpu])

    def write(self, storage: Storage, data: Any, offset: int = 0) -> None:
        """Queue host bytes for a buffer (copied now: the caller may reuse its memory before the flush)."""
        raw = bytes(memoryview(data).cast("B"))
        if not raw:
            return
        if len(raw) % 4:
            raw += bytes(4 - len(raw) % 4)
        self.stats.writes += 1
        self._cmds.append(["write", storage.buf.gpu, offset, len(self._blobs)])
        self._blobs.append(raw)
        self._data_bytes += len(raw)
        if self._data_bytes > _FLUSH_DATA:
            self.flush()

    def read(self, storage: Storage, offset: int, nbytes: int) -> memoryview:
        """Bytes [offset, offset+nbytes) of a buffer after everything recorded so far has run."""
        if nbytes <= 0:
            return memoryview(b"")
        lo, hi = offset & ~3, (offset + nbytes + 3) & ~3
        self.stats.reads += 1
        self._cmds.append(["read", storage.buf.gpu, lo, hi - lo])
        reply, blobs = self._send()
        return blobs[reply["reads"][-1]][offset - lo: offset - lo + nbytes]

    # --- kernels -------------------------------------------------------------------------------------------
    def _compile(self, src: str, bindings: str, name: str) -> Kernel:
        """Compiled in the page, from the WGSL the backend generates."""
        kid = len(self._by_source) + 1
        try:
            self.host.request({"type": "kernel", "kernel": kid, "source": src, "bindings": bindings, "name": name})
        except RemoteError as e:
            raise TapmlError(f"webgpu-browser: kernel {name} failed to compile: {e}") from None
        self.stats.compiles += 1
        return Kernel(kid, None, bindings, name)

    def grid(self, groups: int) -> tuple[int, int, int]:
        return grid_for(groups, self.max_groups)

    def dispatch(self, kernel: Kernel, bufs: Sequence[_Buf], params: Sequence[int] | bytes,
                 grid: tuple[int, int, int] | int) -> None:
        checked = check_dispatch("webgpu-browser", kernel, bufs, params, grid, self.max_groups)
        if checked is None:
            return
        grid, blob = checked
        off = len(self._params)
        slot = (max(len(blob), 4) + self.uniform_align - 1) // self.uniform_align * self.uniform_align
        self._params += blob + bytes(slot - len(blob))
        self._cmds.append(["dispatch", kernel.pipeline, [b.gpu for b in bufs], off, *grid])
        self._pending += 1
        self.stats.dispatches += 1
        if len(self._params) > _FLUSH_PARAMS:
            self.flush()

    # --- the command stream --------------------------------------------------------------------------------
    def _send(self, sync: bool = False) -> tuple[dict[str, Any], list[memoryview]]:
        header: dict[str, Any] = {"type": "gpu", "cmds": self._cmds}
        blobs = self._blobs
        if self._params:
            header["params"] = len(blobs)
            blobs = [*blobs, bytes(self._params)]
        if sync:
            header["sync"] = True
        self._cmds, self._blobs, self._params, self._data_bytes, self._pending = [], [], bytearray(), 0, 0
        self.stats.submits += 1
        return self._request(header, blobs)

    def flush(self) -> None:
        if self._cmds:
            self._send()

    def sync(self) -> None:
        self._send(sync=True)

    def trim(self) -> None:
        for bufs in self._free.values():
            self._cmds += [["destroy", b.gpu] for b in bufs]
        self._free.clear()
        self._pooled_bytes = 0
        self.flush()

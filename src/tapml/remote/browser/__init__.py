"""`webgpu-browser`: the WebGPU backend's kernels run by a WebGPU page in headless Chromium.

The op table, launchers and WGSL are the native `webgpu` backend's own; only the runtime differs: a
`BrowserRuntime` ships each planned batch of buffers, writes, compiles and dispatches to the page
(`tapml.js`), which carries them out with the browser's WebGPU. It must not hold kernel logic of its own.
"""

from __future__ import annotations

from typing import Any

from tapml.backends.webgpu import WebGPUBackend


class BrowserBackend(WebGPUBackend):
    name = "webgpu-browser"
    description = "the webgpu backend's WGSL kernels in headless Chromium's WebGPU (SwiftShader without a GPU)"

    @classmethod
    def unavailable(cls) -> str | None:
        from tapml.remote.browser.host import find_chromium

        try:
            import websockets  # noqa: F401
        except ImportError:
            return "the websockets package is not installed (pip install 'tapml[remote]')"
        if find_chromium() is None:
            return "Chromium not found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)"
        return None

    def __init__(self, chromium: str | None = None, flags: tuple[str, ...] = (), timeout: float = 300.0):
        # The same op table and launchers as `webgpu`; the device is the page (no wgpu runtime is created).
        from tapml.backends.webgpu import bits, kernels, ops, pointwise, selection, structured, transfer  # noqa: F401
        from tapml.remote.browser.host import PageHost
        from tapml.remote.browser.runtime import BrowserRuntime

        self.host = PageHost(chromium, tuple(flags), timeout)
        self.rt: Any = BrowserRuntime(self.host)
        self.rt.finalize = kernels.finalize
        self._ops, self._transfer = ops, transfer

    def close(self) -> None:
        host = getattr(self, "host", None)
        if host is not None:
            try:
                self.rt.flush()
            finally:
                host.close()
                self.host = None

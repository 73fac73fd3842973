"""The `webgpu-browser` backend: the webgpu backend's WGSL kernels run by a page in real headless Chromium
(SwiftShader WebGPU), over the TapML protocol's gpu profile."""

import os
import signal
import subprocess
import urllib.error
import urllib.request

import pytest
import torch
from conftest import TAPML

from tapml.backends import get_backend
from tapml.errors import TapmlError
from tapml.ops import OpCall
from tapml.remote.browser import BrowserBackend
from tapml.replay import run_tests

pytestmark = pytest.mark.skipif(BrowserBackend.unavailable() is not None,
                                reason=f"webgpu-browser: {BrowserBackend.unavailable()}")

BROWSER_MODELS = ("llama", "resnet", "vit")  # an LLM with decode steps, a CNN, a transformer on a photo


@pytest.fixture(scope="module")
def browser():
    be = get_backend("webgpu-browser")
    yield be
    be.close()


class Counting:
    """Counts the requests the host sends to the page, by type."""

    def __init__(self, host):
        self.host, self.counts, self._request = host, {}, host.request

    def __enter__(self):
        def request(header, blobs=()):
            self.counts[header["type"]] = self.counts.get(header["type"], 0) + 1
            return self._request(header, blobs)

        self.host.request = request
        return self.counts

    def __exit__(self, *exc):
        self.host.request = self._request


@pytest.mark.parametrize("model", BROWSER_MODELS)
def test_zoo_models_pass_in_the_browser(browser, zoo_stores, model):
    before = browser.rt.stats.dispatches
    run = run_tests(str(zoo_stores[model]), browser, progress=False)
    t = run.totals()
    bad = [(r.op, r.status, r.reason) for r in run.results if r.status in ("fail", "error")]
    assert not bad, bad[:5]
    assert t["pass"] >= 0.9 * t["cases"], t
    assert browser.rt.stats.dispatches > before  # the page ran kernels, nothing was computed on the host
    if model == "llama":
        assert any(r.status == "pass" and r.provenance.get("phase", "").startswith("decode") for r in run.results)


def test_a_chain_of_ops_on_resident_handles_is_one_round_trip(browser):
    x, w = torch.randn(16, 32), torch.randn(32, 8)
    hx, hw = browser.upload(x), browser.upload(w)

    def chain():
        h = hx
        for _ in range(10):
            h = browser.run(OpCall("aten.mul.Tensor", (h, 1.5), {}))
            h = browser.run(OpCall("aten.add.Tensor", (h, hx), {}))
        return browser.run(OpCall("aten.relu.default", (browser.run(OpCall("aten.mm.default", (h, hw), {})),), {}))

    browser.download(chain())  # compiles the kernels
    with Counting(browser.host) as counts:
        out = chain()
        assert counts == {}  # 22 dispatches recorded, nothing sent yet
        got = browser.download(out)
    assert counts == {"gpu": 1}
    ref = x
    for _ in range(10):
        ref = ref * 1.5 + x
    assert torch.allclose(got, torch.relu(ref @ w), rtol=1e-4, atol=1e-3)


def test_compile_errors_come_back_with_their_position(browser):
    with pytest.raises(TapmlError, match=r"kernel broken failed to compile: .*WGSL error at \d+:\d+"):
        browser.rt.kernel(("broken",), lambda: ("@compute @workgroup_size(1) fn main() { let x: f32 = ; }", "w"),
                          "broken")
    assert browser.download(browser.upload(torch.arange(5))).tolist() == list(range(5))  # still serving


def test_the_host_serves_only_the_page_and_accepts_one_connection(browser):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    base = f"http://127.0.0.1:{browser.host.port}"
    with urllib.request.urlopen(f"{base}/") as r:
        assert r.status == 200 and b"tapml.js" in r.read()
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    for path in ("/../pyproject.toml", "/host.py", "/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(base + path)
        assert exc.value.code == 404
    with connect(f"ws://127.0.0.1:{browser.host.port}/ws", proxy=None) as ws, pytest.raises(ConnectionClosed) as c:
        ws.recv(timeout=5)
    assert c.value.rcvd.code == 1008


def test_a_dead_browser_is_a_clear_error():
    be = get_backend("webgpu-browser")
    try:
        h = be.upload(torch.ones(4))
        os.killpg(be.host.proc.pid, signal.SIGKILL)
        be.host.proc.wait(10)
        with pytest.raises(TapmlError, match="the browser page went away"):
            be.download(h)
    finally:
        be.close()


def test_no_chromium_is_reported_not_crashed(monkeypatch):
    monkeypatch.setenv("CHROMIUM", "/nonexistent/chromium")
    assert "Chromium not found" in BrowserBackend.unavailable()
    with pytest.raises(TapmlError, match="webgpu-browser is not usable here: Chromium not found"):
        get_backend("webgpu-browser")


def test_the_browser_runtime_keeps_the_native_runtimes_interface(browser):
    """The webgpu backend's launchers see either runtime; an attribute the native one gained and the browser
    one lacks would break them at the first op that uses it."""
    from tapml.backends.webgpu import WebGPUBackend, get_runtime

    if WebGPUBackend.unavailable():
        pytest.skip(f"no native WebGPU here to compare with: {WebGPUBackend.unavailable()}")
    native = get_runtime()
    device_only = {"wgpu", "adapter", "device", "queue"}  # the wgpu objects the page holds instead
    missing = {a for a in dir(native) if not a.startswith("_")} - device_only - set(dir(browser.rt))
    assert not missing, f"BrowserRuntime lacks {sorted(missing)}"


def test_a_mixed_run_of_zoo_llama_with_every_op_in_the_browser(browser):
    """`tapml debug --target webgpu-browser` style: many small run() calls, tensors resident in the page."""
    from tapml.migration import Placement, run_mixed
    from tapml.workload import load_workload

    _, w = load_workload("llama", max_new_tokens=2)
    ref = run_mixed(w, None, Placement.none())
    run = run_mixed(w, browser, Placement.all())
    assert len(run.records) > 0.9 * len(ref.trace)
    assert run.trace == ref.trace  # the same op calls in the same order: call indices line up
    assert torch.equal(run.output, ref.output)  # the same generated tokens
    for got, want in zip(run.logits, ref.logits):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_cli_debug_zoo_llama_in_the_browser(tmp_path):
    r = subprocess.run([*TAPML, "debug", "zoo:llama", "--target", "webgpu-browser", "--max-new-tokens", "2",
                        "--html", str(tmp_path / "d.html")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout.replace("\n", " ")
    assert "carved tests on webgpu-browser" in text and " 0 failed" in text
    assert "end to end with every op on the target: pass" in text

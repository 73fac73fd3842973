"""The `tapml debug` page read as a user reads it: rendered by headless Chromium at a laptop's window size, the
first screen shows the verdict (a red banner when a culprit was found), the culprit and its repro command, and the
drift plot; the full op table is collapsed below them."""

import json
import shutil
import subprocess

import pytest
from conftest import model_ref
from PIL import Image

from tapml.migration.debug import debug
from tapml.remote.browser.host import CHROMIUM_FLAGS, find_chromium

WIDTH, HEIGHT = 1280, 800
# Reports where the page's pieces landed, written into the title so --dump-dom carries them out.
_PROBE = """<script>
const at = s => { const e = document.querySelector(s); return e ? Math.round(e.getBoundingClientRect().top) : -1; };
const table = [...document.querySelectorAll('details')].find(d => d.textContent.includes('Every op kind'));
document.title = JSON.stringify({verdict: at('#verdict'), answer: at('table.answer'), svg: at('svg'),
  repro: document.querySelector('table.answer') ? document.querySelector('table.answer').innerText : '',
  table_open: table ? table.open : null, table_top: table ? Math.round(table.getBoundingClientRect().top) : -1});
</script>"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if find_chromium() is None:
        pytest.skip("no Chromium (make setup installs it)")
    tmp = tmp_path_factory.mktemp("debug-page")
    html = tmp / "debug.html"
    res = debug(model_ref("make_model"), target="torch", inject="offbyone:aten.addmm.default@1",
                out_dir=tmp / "work", html_out=html)
    assert res.localization is not None and res.localization.culprit is not None
    return tmp, html, res


def _chromium(*args: str) -> subprocess.CompletedProcess:
    flags = [f for f in CHROMIUM_FLAGS if not f.startswith(("--enable-unsafe-webgpu", "--enable-features=Vulkan",
                                                              "--use-angle"))]
    return subprocess.run([find_chromium(), *flags, "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={WIDTH},{HEIGHT}", *args], capture_output=True, text=True, timeout=120)


def test_the_first_screen_shows_the_answer(page):
    tmp, html, res = page
    probed = tmp / "probed.html"
    probed.write_text(html.read_text().replace("</body>", _PROBE + "</body>"))
    r = _chromium("--dump-dom", f"file://{probed}")
    assert r.returncode == 0, r.stderr[-2000:]
    at = json.loads(r.stdout.split("<title>", 1)[1].split("</title>", 1)[0].replace("&quot;", '"'))
    assert at["verdict"] == 0
    assert 0 < at["answer"] < HEIGHT and 0 < at["svg"] < HEIGHT, at  # culprit and drift plot above the fold
    c = res.localization.culprit
    assert "aten.addmm.default" in at["repro"] and f"@{c.index}" in at["repro"] and "pytest" in at["repro"]
    assert at["table_open"] is False and at["table_top"] > at["svg"], at  # the op table: collapsed, below


def test_the_verdict_banner_is_what_a_screenshot_shows_first(page):
    tmp, html, _ = page
    shot = tmp / "shot.png"
    r = _chromium(f"--screenshot={shot}", f"file://{html}")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (WIDTH, HEIGHT)
    band = img.crop((0, 0, WIDTH, 40)).getcolors(WIDTH * 40)
    red = sum(n for n, (r_, g, b) in band if r_ > 170 and g < 80 and b < 80)
    assert red > 0.6 * WIDTH * 40, "the top of the first screen is not the red verdict banner"
    shutil.copy(shot, tmp / "debug-first-screen.png")  # kept beside the page for a person to look at

"""The `tapml` command end to end: carve, show, test (JSON/HTML/exit codes), export-pytest, zoo, backends, and
bad input (one line, exit 2, nothing half-written)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import MODELS, TAPML, model_ref


def tapml(*args, cwd=None):
    return subprocess.run([*TAPML, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "store"
    r = tapml("carve", model_ref("make_model"), "--out", out)
    assert r.returncode == 0, r.stderr
    assert "9 op calls" in r.stdout
    return out


def test_show_prints_cases_calls_kinds_bytes_runs(store):
    r = tapml("show", store, "--cases")
    assert r.returncode == 0
    assert "6 cases covering 9 calls, 4 overloads" in r.stdout
    assert "aten.addmm.default" in r.stdout and "complete" in r.stdout and "KB" in r.stdout


def test_show_says_the_precision_of_each_run(store, tmp_path):
    from shutil import copytree

    from tapml.recorder import carve

    copytree(store, tmp_path / "s")
    carve(model_ref("make_model"), tmp_path / "s", dtype="bfloat16", progress=False)
    rows = [line for line in tapml("show", tmp_path / "s").stdout.splitlines() if "complete" in line]
    assert len(rows) == 2 and "float32" in rows[0] and "bfloat16" in rows[1], rows


def test_test_writes_json_and_html_and_exits_0(store, tmp_path):
    r = tapml("test", store, "--backend", "torch", "--json", tmp_path / "r.json", "--html", tmp_path / "r.html")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 passed" in r.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["totals"]["pass"] == 6 and data["totals"]["cases"] == 6
    rec = data["cases"][0]
    assert set(rec) >= {"op", "signature", "status", "metrics", "provenance", "rule"}
    assert rec["status"] in ("pass", "fail", "unsupported", "error")
    assert {"module", "phase", "index"} <= set(rec["provenance"])
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "aten.addmm.default" in page
    assert "src=\"http" not in page and "<link" not in page  # self-contained: no external resources


def test_export_pytest_writes_a_runnable_test_file(store, tmp_path):
    f = tmp_path / "test_carved.py"
    r = tapml("export-pytest", store, "--backend", "torch", "--out", f)
    assert r.returncode == 0, r.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(f)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert "6 passed" in run.stdout, run.stdout + run.stderr


def test_zoo_and_backends_listings():
    r = tapml("backends")
    assert r.returncode == 0 and "torch64" in r.stdout and "yes" in r.stdout
    r = tapml("zoo")
    assert r.returncode == 0
    for name in ("llama", "mixtral", "minilm", "vit", "resnet", "t5", "mmt4", "dlrm", "uno",
                 "llama3-8b-mqa-small", "resnext50", "nasnet"):  # graphpipe's, parallel's and place's models too
        assert name in r.stdout
    from tapml.zoo.census import architectures

    assert f"{len(architectures())} architectures in these tables" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["carve", "no-such-model", "--out", "{tmp}/a"], "unknown zoo model"),
    (["carve", f"{MODELS / 'tiny.py'}:make_raises", "--out", "{tmp}/a"], "raised ValueError"),
    (["carve", f"{MODELS / 'tiny.py'}:nope", "--out", "{tmp}/a"], "has no function nope"),
    (["carve", "{tmp}/missing.py:make_model", "--out", "{tmp}/a"], "no such model file"),
    (["test", "{tmp}/nothing", "--backend", "torch"], "no case store"),
    (["test", "{tmp}", "--backend", "torch"], "not a TapML case store"),
    (["show", "{tmp}/nothing"], "no case store"),
    (["export-pytest", "{tmp}/nothing", "--backend", "torch", "--out", "{tmp}/t.py"], "no case store"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, message):
    r = tapml(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("tapml: error:"), r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "t.py").exists()


def test_unknown_backend_is_exit_2_and_writes_no_report(store, tmp_path):
    r = tapml("test", store, "--backend", "nope", "--json", tmp_path / "r.json")
    assert r.returncode == 2 and "unknown backend 'nope'" in r.stderr
    assert not (tmp_path / "r.json").exists()


_PLUGIN = """
import torch
from tapml.backends.reference import TorchBackend

class Faulty(TorchBackend):
    name = "faulty"
    description = "reference with a broken addmm (test plug-in)"

    def run(self, call):
        out = super().run(call)
        return out * 1.001 if call.kind == "aten.addmm" else out

class Missing(TorchBackend):
    @classmethod
    def unavailable(cls):
        return "needs the frobnicator driver"
"""


def test_third_party_backend_plugin_and_exit_1_on_failure(store, tmp_path):
    """A backend installed as a separate package is found through the entry point; its failures exit 1."""
    site = tmp_path / "site"
    (site / "tapml_faulty").mkdir(parents=True)
    (site / "tapml_faulty" / "__init__.py").write_text(_PLUGIN)
    dist = site / "tapml_faulty-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tapml-faulty\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[tapml.backends]\nfaulty = tapml_faulty:Faulty\nmissing = tapml_faulty:Missing\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    listing = subprocess.run([*TAPML, "backends"], capture_output=True, text=True, env=env)
    assert "faulty" in listing.stdout and "needs the frobnicator driver" in listing.stdout
    r = subprocess.run([*TAPML, "test", str(store), "--backend", "faulty", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL aten.addmm.default" in r.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert {c["op"] for c in data["cases"] if c["status"] == "fail"} == {"aten.addmm.default"}
    r = subprocess.run([*TAPML, "test", str(store), "--backend", "missing"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 2 and "not usable here: needs the frobnicator driver" in r.stderr


_ODD = """
from tapml.backends.reference import TorchBackend

class OddSoftmax(TorchBackend):
    name = "odd-softmax"
    description = "reference whose softmax drops the last element of odd-length rows (test plug-in)"

    def run(self, call):
        out = super().run(call)
        if call.kind == "aten._softmax" and out.shape[-1] % 2:
            out = out.clone()
            out[..., -1] = 0
        return out
"""


def test_amplify_finds_what_the_real_cases_miss_and_reports_it_apart(store, tmp_path):
    """The tiny model's softmax rows have 4 elements: the bug passes the carved cases, and `--amplify` (a row
    cut to 3) finds it, on a line of its own, in the exit code and in the JSON's own section."""
    site = tmp_path / "site"
    (site / "tapml_odd").mkdir(parents=True)
    (site / "tapml_odd" / "__init__.py").write_text(_ODD)
    dist = site / "tapml_odd-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tapml-odd\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tapml.backends]\nodd-softmax = tapml_odd:OddSoftmax\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    base = [*TAPML, "test", str(store), "--backend", "odd-softmax", "--no-progress"]
    r = subprocess.run(base, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "amplified" not in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*base, "--amplify", "--json", str(tmp_path / "r.json")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    assert "6 passed, 0 failed" in out and "AMPLIFIED FAIL aten._softmax.default" in out
    assert "amplified: dim 1 cut from 4 to 3 (tile 4 - 1)" in out
    assert "amplified:" in out and "variants of" in out and "(seed 0)" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["totals"]["fail"] == 0 and data["amplified"]["totals"]["fail"] >= 1

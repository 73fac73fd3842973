"""Kernel-level carving from a TVM Relax VM and the replay of its TIR kernels on other TVM targets."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

from conftest import TAPML, model_ref

from tapml.backends import get_backend
from tapml.backends.compilers.tvm import TVMBackend
from tapml.frontends.tvm import carve_tvm
from tapml.replay import run_tests
from tapml.store import CaseStore

os.environ.setdefault("TAPML_CACHE_DIR", str(Path(__file__).resolve().parents[2] / ".tapml-cache" / "tests"))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tvm") / "store"
    r = carve_tvm(model_ref("make_model"), str(out))
    assert r.calls == 3 and r.cases == 3
    return out


def test_carve_records_kernels_with_written_arguments(kernels):
    with CaseStore.open(kernels) as store:
        cases = {c.op.split(".")[1]: c for c in store.cases()}
        assert set(cases) == {"fused_matmul_add_relu", "fused_matmul1_add1", "softmax"}
        c = cases["fused_matmul_add_relu"]
        call = store.load_call(c, store.samples(c.id)[0])
        x, w, b, _out = call.args
        assert call.kwargs["writes"] == [3]  # the last argument is the one written, found not assumed
        assert "T.prim_func" in bytes(call.kwargs["source"].numpy()).decode()
        (y,) = call.outputs
        torch.testing.assert_close(y, torch.relu(x @ w + b))
        assert store.samples(c.id)[0].provenance.module == "relax:main/fused_matmul_add_relu"
        assert store.runs()[0]["model"].startswith("tvm:")


def test_carve_dedups_across_runs(kernels):
    again = carve_tvm(model_ref("make_model"), str(kernels))
    assert again.new_cases == 0
    with CaseStore.open(kernels) as store:
        assert len(store.cases()) == 3 and all(c.count == 2 for c in store.cases())


@pytest.mark.parametrize("target", ["llvm", "llvm -opt-level=0", "llvm -mcpu=haswell"])
def test_kernels_replay_on_tvm_targets(kernels, target):
    run = run_tests(str(kernels), get_backend("tvm", target=target), progress=False)
    assert [r.status for r in run.results] == ["pass"] * 3
    assert {r.rule for r in run.results} == {"allclose"}  # no fp64 oracle for TIR kernels


class _PerturbedTVM(TVMBackend):
    """A test double for a broken target: every kernel output is nudged by 1e-3 relative."""

    def execute(self, call):
        return tuple(t * (1 + 1e-3) for t in super().execute(call))


def test_perturbed_target_fails(kernels):
    run = run_tests(str(kernels), _PerturbedTVM(), progress=False)
    assert [r.status for r in run.results] == ["fail"] * 3
    assert all("outside atol" in r.reason for r in run.results)


def test_other_backends_say_unsupported(kernels):
    run = run_tests(str(kernels), "onnxruntime", progress=False)
    assert {r.status for r in run.results} == {"unsupported"}
    assert "only the tvm backend runs it" in run.results[0].reason


def test_cli_carve_frontend_tvm_and_test_with_target(tmp_path):
    out = tmp_path / "k"
    r = subprocess.run([*TAPML, "carve", model_ref("make_model"), "--frontend", "tvm", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "3 signatures" in r.stdout
    r = subprocess.run([*TAPML, "test", str(out), "--backend", "tvm", "--tvm-target", "llvm -opt-level=1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 passed" in r.stdout
    r = subprocess.run([*TAPML, "test", str(out), "--backend", "onnxruntime", "--tvm-target", "llvm"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "backend onnxruntime does not take the option(s) target" in r.stderr
    r = subprocess.run([*TAPML, "carve", model_ref("make_model"), "--frontend", "jax", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown --frontend" in r.stderr


def test_zoo_resnet_kernels_replay(tmp_path):
    r = carve_tvm("resnet", str(tmp_path / "resnet"))
    assert r.cases >= 20
    run = run_tests(str(tmp_path / "resnet"), "tvm", progress=False)
    assert run.totals()["pass"] == run.totals()["cases"]

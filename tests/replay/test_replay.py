"""Replay: a backend that perturbs one op kind is caught with that kind named; errors and unsupported ops are
never counted as passes."""

import torch
from conftest import model_ref

from tapml.backends import Backend
from tapml.backends.reference import TorchBackend
from tapml.ops import OpCall
from tapml.recorder import carve
from tapml.replay import run_tests


class Perturbing(TorchBackend):
    """Test double: correct except for one op kind, whose float outputs get relative noise."""

    name = "perturb"

    def __init__(self, kind: str, eps: float = 1e-3):
        super().__init__()
        self.kind, self.eps = kind, eps

    def run(self, call: OpCall):
        out = super().run(call)
        if call.kind == self.kind and isinstance(out, torch.Tensor) and out.is_floating_point():
            g = torch.Generator().manual_seed(0)
            out = out * (1 + self.eps * torch.randn(out.shape, generator=g))
        return out


class Raising(TorchBackend):
    name = "raising"

    def run(self, call):
        if call.kind == "aten.relu":
            raise RuntimeError("kernel crashed")
        return super().run(call)


class Partial(Backend):
    """A backend that supports nothing: every case must come back unsupported with the reason."""

    name = "partial"

    def supports(self, call):
        return f"{call.op} is not implemented"


def test_perturbed_op_kind_is_caught_and_nothing_else_fails(tmp_path, tiny):
    carve(tiny, tmp_path / "s", progress=False)
    run = run_tests(str(tmp_path / "s"), Perturbing("aten.addmm"), progress=False)
    failed = {r.op for r in run.results if r.status == "fail"}
    assert failed == {"aten.addmm.default"}
    assert all(r.status == "pass" for r in run.results if r.op != "aten.addmm.default")
    assert run.exit_code == 1
    bad = [r for r in run.results if r.status == "fail"]
    assert all(r.rule.startswith("fp64-oracle") and "RMSE" in r.reason for r in bad)


def test_perturbation_in_a_zoo_llm_names_only_that_kind(tmp_path):
    carve("gpt2", tmp_path / "s", max_new_tokens=3, progress=False)
    run = run_tests(str(tmp_path / "s"), Perturbing("aten.mm"), progress=False)
    failed = {r.op for r in run.results if r.status in ("fail", "error")}
    assert failed == {"aten.mm.default"}, failed


def test_backend_errors_are_reported_not_passed(tmp_path, tiny):
    carve(tiny, tmp_path / "s", progress=False)
    run = run_tests(str(tmp_path / "s"), Raising(), progress=False)
    relu = [r for r in run.results if r.op == "aten.relu.default"]
    assert relu and all(r.status == "error" and "kernel crashed" in r.reason for r in relu)
    assert run.exit_code == 1


def test_unsupported_is_never_a_pass(tmp_path, tiny):
    carve(tiny, tmp_path / "s", progress=False)
    run = run_tests(str(tmp_path / "s"), Partial(), progress=False)
    t = run.totals()
    assert t["unsupported"] == t["cases"] and t["pass"] == 0
    assert run.exit_code == 0  # nothing supported failed
    assert all("not implemented" in r.reason for r in run.results)


def test_random_ops_are_unsupported_on_backends_that_cannot_replay_torch_rng(tmp_path):
    class Other(TorchBackend):
        name = "other"
        replays_torch_rng = False

    carve(model_ref("make_random"), tmp_path / "s", progress=False)
    run = run_tests(str(tmp_path / "s"), Other(), progress=False)
    rand = [r for r in run.results if r.op in ("aten.rand.default", "aten.randn_like.default")]
    assert rand and all(r.status == "unsupported" and "random" in r.reason for r in rand)


def test_k_pattern_selects_ops(tmp_path, tiny):
    carve(tiny, tmp_path / "s", progress=False)
    run = run_tests(str(tmp_path / "s"), "torch", pattern="addmm", progress=False)
    assert {r.op for r in run.results} == {"aten.addmm.default"}
    run = run_tests(str(tmp_path / "s"), "torch", pattern="not addmm", progress=False)
    assert "aten.addmm.default" not in {r.op for r in run.results} and run.results

"""No silent passes on compiler targets: compiles work inside the interception, environment failures are never
cached, the compiler's configuration is in the key, strided inputs run, many signatures compile together, and a
migration where nothing ran on the target is an error. Small ops and the tiny model only (fast on 2 cores)."""

import importlib
import json

import pytest
import torch
from conftest import model_ref
from torch.utils._python_dispatch import TorchDispatchMode

from tapml.backends import Backend, get_backend
from tapml.backends.compilers.inductor import InductorBackend
from tapml.errors import TapmlError
from tapml.ops import OpCall

pytest.importorskip("onnxruntime")
pytest.importorskip("tvm")

BUG = {"cpp.inject_relu_bug_TESTING_ONLY": "accuracy"}  # inductor's own codegen bug: relu emits x + 1


def relu_call(x=None) -> OpCall:
    return OpCall("aten.relu.default", (torch.randn(4, 8) if x is None else x,), {})


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_compiles_inside_a_dispatch_mode(tmp_path):
    """MixedRun compiles each op inside its dispatch mode: the compile must still happen (not a refusal)."""
    be = get_backend("inductor", cache_dir=str(tmp_path))
    call = relu_call()
    with _Passthrough():
        assert be.supports(call) is None
        out = be.execute(call)
    assert be.compiles == 1
    torch.testing.assert_close(out, call.args[0].relu())


def test_config_change_misses_the_cache(tmp_path):
    """An artifact built under one inductor configuration is never served under another: the injected codegen
    bug gets its own compile and its wrong result shows; the clean config loads its own artifact again."""
    call = relu_call()
    clean = get_backend("inductor", cache_dir=str(tmp_path))
    torch.testing.assert_close(clean.execute(call), call.args[0].relu())
    buggy = get_backend("inductor", cache_dir=str(tmp_path), config=BUG)
    assert buggy.key(1) != clean.key(1)
    torch.testing.assert_close(buggy.execute(call), call.args[0] + 1)
    assert buggy.compiles == 1 and buggy.disk_hits == 0
    import torch._inductor.config as ic

    plain = clean.key(1)
    with ic.patch(BUG):  # the process-wide config counts too, not only the backend's own overrides
        assert get_backend("inductor", cache_dir=str(tmp_path)).key(1) != plain
    again = get_backend("inductor", cache_dir=str(tmp_path))
    torch.testing.assert_close(again.execute(call), call.args[0].relu())
    assert again.compiles == 0 and again.disk_hits == 1


def test_other_compilers_key_their_configuration(tmp_path):
    import tvm

    ort_a = get_backend("onnxruntime", cache_dir=str(tmp_path))
    ort_b = get_backend("onnxruntime", cache_dir=str(tmp_path),
                        session_options={"graph_optimization_level": "ORT_DISABLE_ALL"})
    assert ort_a.key(1) != ort_b.key(1)
    with pytest.raises(TapmlError, match="session option"):
        get_backend("onnxruntime", cache_dir=str(tmp_path), session_options={"no_such_option": 1})
    t = get_backend("tvm", cache_dir=str(tmp_path))
    plain = t.key(1)
    with tvm.transform.PassContext(opt_level=1):
        assert t.key(1) != plain


def test_environment_failures_are_never_cached(tmp_path, monkeypatch):
    """A failure of the machine (here: the compiler cannot be imported) is a TapmlError, and nothing lands in the
    cache: the next run compiles and passes."""
    def broken(self, *a, **k):
        raise ImportError("No module named 'torch._inductor.fake_missing'")

    monkeypatch.setattr(InductorBackend, "_standalone", broken)
    be = get_backend("inductor", cache_dir=str(tmp_path))
    with pytest.raises(TapmlError, match="nothing was cached"):
        be.supports(relu_call())
    assert not [p for p in (tmp_path / "inductor").iterdir() if not p.name.startswith(".")]
    monkeypatch.undo()
    fresh = get_backend("inductor", cache_dir=str(tmp_path))
    assert fresh.supports(relu_call()) is None and fresh.compiles == 1


def test_strided_inputs_run_on_code_compiled_for_their_layout(tmp_path):
    be = get_backend("inductor", cache_dir=str(tmp_path))
    base = torch.randn(6, 8)
    views = [base.t(), base[:, ::2], base[1:4]]  # transposed, step 2, offset
    for v in views:
        other = torch.randn(v.shape)
        call = OpCall("aten.mul.Tensor", (v, other), {})
        assert be.supports(call) is None
        torch.testing.assert_close(be.execute(call), v * other)
    dense = OpCall("aten.mul.Tensor", (base.t().contiguous(), torch.randn(8, 6)), {})
    torch.testing.assert_close(be.execute(dense), dense.args[0] * dense.args[1])
    assert be.compiles == 4  # one per layout: the transposed view and its dense copy are two artifacts


def test_prepare_compiles_many_signatures_together_and_isolates_a_refusal(tmp_path):
    calls = [relu_call(), OpCall("aten.add.Tensor", (torch.randn(3, 5), torch.randn(5)), {}),
             OpCall("aten.exp.default", (torch.randn(7),), {}),
             OpCall("aten.histc.default", (torch.linspace(-1, 1, 100), 10, 0.0, 1.0), {}),  # an ATen fallback
             OpCall("aten.mul.Tensor", (torch.randn(2, 3), torch.randn(2, 3)), {})]
    be = get_backend("inductor", cache_dir=str(tmp_path))
    be.prepare(calls)
    assert be.compiles == 1  # one module for the five
    assert "aten.histc" in be.supports(calls[3])
    for c in calls[:3] + calls[4:]:
        assert be.supports(c) is None, c.op
        fresh = OpCall(c.op, tuple(a.clone() + 1 if isinstance(a, torch.Tensor) else a for a in c.args), {})
        got = be.execute(fresh)  # other values than prepared: the batch's module runs on them
        want = c.func()(*fresh.args)
        torch.testing.assert_close(got, want)
    assert be.compiles == 1
    # The refusal is the compiler's verdict, kept on disk by itself: another process finds it without compiling.
    other = get_backend("inductor", cache_dir=str(tmp_path))
    assert "aten.histc" in other.supports(calls[3]) and other.compiles == 0


def test_extern_kernels_beside_generated_ones_stay_in_one_batch(tmp_path):
    """ResNet's mix: convolutions (inductor calls the ATen kernel after a generated channels-last copy of its
    inputs, and reuses buffers across members) beside a max pool and a relu. Each ATen call is traced to its
    member by the provenance inductor writes, so the batch compiles once instead of being split to single ops."""
    conv = lambda cin, cout, k, hw: OpCall(
        "aten.convolution.default", (torch.randn(2, cin, hw, hw), torch.randn(cout, cin, k, k), None, [1, 1],
                                     [k // 2, k // 2], [1, 1], False, [0, 0], 1), {})
    calls = [conv(16, 4, 1, 16), OpCall("aten.max_pool2d_with_indices.default",
                                        (torch.randn(2, 16, 32, 32), [3, 3], [2, 2], [1, 1]), {}),
             conv(4, 4, 3, 16), relu_call(), conv(4, 16, 1, 16)]
    be = get_backend("inductor", cache_dir=str(tmp_path))
    be.prepare(calls)
    assert be.compiles == 1
    for c in calls:
        reason = be.supports(c)
        if c.op == "aten.convolution.default":
            assert reason and "extern_kernels.convolution" in reason
        else:
            assert reason is None, reason
            torch.testing.assert_close(be.execute(c), c.func()(*c.args))


def test_replay_on_inductor_names_the_injected_codegen_bug(tmp_path, monkeypatch):
    """The carved tiny model on inductor with the relu codegen bug: relu fails, nothing is skipped silently."""
    import torch._inductor.config as ic

    from tapml.recorder import carve
    from tapml.replay import run_tests

    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path / "cache"))
    carve(model_ref("make_model"), tmp_path / "store", progress=False)
    with ic.patch(BUG):
        run = run_tests(str(tmp_path / "store"), "inductor", progress=False)
    by = {r.op: r.status for r in run.results}
    assert by["aten.relu.default"] == "fail" and by["aten._softmax.default"] == "pass", by


class _RefusesAll(Backend):
    name = "refuses-all"

    def supports(self, call):
        return "cannot compile here"

    def run(self, call):
        raise AssertionError("never placed")


def test_migration_where_nothing_ran_is_an_error():
    from tapml.migration.localize import localize
    from tapml.workload import load_workload

    name, wl = load_workload(model_ref("make_model"))
    with pytest.raises(TapmlError, match=r"no op ran on refuses-all: it refused all \d+ calls"):
        localize(wl, name, _RefusesAll())


def test_migration_reports_counts_placed_ran_refused(tmp_path):
    from tapml.migration.localize import migrate

    loc = migrate(model_ref("make_model"), target="torch", json_out=tmp_path / "m.json")
    assert loc.counts["placed"] == loc.counts["ran"] > 0 and loc.counts["refused"] == 0
    assert json.loads((tmp_path / "m.json").read_text())["counts"] == loc.counts


def test_internal_error_exits_3_with_one_line_and_json(tmp_path, monkeypatch, capsys):
    localize_mod = importlib.import_module("tapml.migration.localize")  # the package re-exports a function named so
    from tapml import cli

    def bug(*a, **k):
        raise IndexError("list index out of range\nsecond line")

    monkeypatch.setattr(localize_mod, "localize", bug)
    monkeypatch.setattr("sys.argv", ["tapml", "migrate", model_ref("make_model"), "--target", "torch",
                                     "--json", str(tmp_path / "m.json")])
    monkeypatch.delenv("TAPML_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line: the error, one line
    assert err.startswith("tapml: internal error: IndexError: list index out of range (a tapml bug")
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["error"]["kind"] == "internal" and data["error"]["exit_code"] == 3
    monkeypatch.setenv("TAPML_DEBUG", "1")
    with pytest.raises(IndexError):
        cli.main()

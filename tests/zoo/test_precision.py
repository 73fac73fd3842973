"""Precisions (--dtype, --weights): a zoo model or a user file built in float16/bfloat16 runs, carves and replays in
that dtype, the run records it, and migrate's reference and mixed runs are in it."""

import pytest
import torch
from conftest import model_ref

from tapml import zoo
from tapml.errors import TapmlError
from tapml.migration.localize import migrate
from tapml.recorder import carve
from tapml.replay import run_tests
from tapml.store import CaseStore
from tapml.workload import load_workload

MATMULS = ("aten.mm.", "aten.bmm.", "aten.addmm.", "aten.baddbmm.", "aten._scaled_dot_product")


def _floating(store) -> dict[str, set[str]]:
    """Per case: the floating dtypes of its inputs, keyed by op and module."""
    out: dict[str, set[str]] = {}
    for c in store.cases():
        dts = {m["dtype"] for m in c.metas if "float" in m["dtype"]}
        if dts:
            out.setdefault(f"{c.op} {c.first.get('module')}", set()).update(dts)
    return out


def test_a_float16_carve_runs_the_model_in_float16_and_replays_clean(tmp_path):
    carve("gpt2", tmp_path / "s", max_new_tokens=2, dtype="float16", progress=False)
    with CaseStore.open(tmp_path / "s") as st:
        run = st.runs()[0]
        floating = _floating(st)
    assert run["options"]["dtype"] == "float16" and "weights" not in run["options"]
    assert "; float16" in run["description"]
    # Inside the model every floating tensor is float16; generate's logits processing (outside any module) is
    # float32 by transformers' choice.
    inside = {k: v for k, v in floating.items() if not k.endswith(" <none>")}
    assert inside and all(v == {"float16"} for v in inside.values()), inside
    assert any(k.startswith(MATMULS) for k in inside)
    t = run_tests(str(tmp_path / "s"), "torch", progress=False).totals()
    assert t["cases"] > 100 and t["pass"] == t["cases"], t


def test_bfloat16_vision_gets_its_photos_in_bfloat16():
    w = zoo.get("resnet").prepare(dtype="bfloat16")
    assert w.dtype == "bfloat16" and w.description.endswith("; bfloat16")
    with torch.no_grad():
        assert w.run().dtype == torch.bfloat16


def test_a_user_model_and_its_floating_inputs_are_cast(tmp_path):
    _, w = load_workload(model_ref("make_model"))
    assert w.dtype == "float32" and w.precision == {}  # as built: nothing recorded, a run's row is as it was
    _, w = load_workload(model_ref("make_model"), dtype="float16")
    assert w.precision == {"dtype": "float16"} and {p.dtype for p in w.model.parameters()} == {torch.float16}
    with torch.no_grad():
        assert w.run().dtype == torch.float16
    carve("tiny", tmp_path / "s", workload=w, progress=False)
    with CaseStore.open(tmp_path / "s") as st:
        assert set().union(*_floating(st).values()) == {"float16"}
    assert run_tests(str(tmp_path / "s"), "torch", progress=False).exit_code == 0


def test_migrate_runs_reference_and_target_in_the_dtype_with_its_tolerance():
    loc = migrate(model_ref("make_model"), target="torch", dtype="bfloat16")
    assert loc.culprit is None and loc.precision == {"dtype": "bfloat16"}
    assert loc.e2e.tol == 5e-2  # 1e-4 is below one bfloat16 ulp: any other target would "diverge"
    assert migrate(model_ref("make_model"), target="torch", dtype="float16", tol=1e-3).e2e.tol == 1e-3


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float64"}, "unknown --dtype 'float64'; choose one of: float32, float16, bfloat16"),
    ({"weights": "int4"}, "unknown --weights 'int4'"),
])
def test_bad_precision_is_refused_before_anything_is_built(kwargs, message):
    with pytest.raises(TapmlError, match=message):
        load_workload("llama", **kwargs)


def test_q4_0_on_a_model_without_a_quantizable_layer_says_so(tmp_path):
    with pytest.raises(TapmlError, match="no linear layer whose in_features is a multiple of 32"):
        carve(model_ref("make_model"), tmp_path / "s", weights="q4_0", progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(TapmlError, match="--dtype and --weights apply to --frontend torch"):
        carve(model_ref("make_model"), tmp_path / "s", frontend="tvm", dtype="float16", progress=False)

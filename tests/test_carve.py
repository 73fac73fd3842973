"""Carving: op kinds and counts, inputs before mutation, sampling, dedup/content addressing, RNG, SIGKILL."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import torch
from conftest import MODELS, model_ref

from tapml.carve import carve, load_workload
from tapml.replay import run_tests
from tapml.store import CaseStore


def test_tiny_model_yields_expected_op_kinds_and_counts(tmp_path, tiny):
    r = carve(tiny, tmp_path / "s", progress=False)
    assert r.calls == 9
    with CaseStore.open(tmp_path / "s") as st:
        table = {row["op"]: (row["cases"], row["calls"]) for row in st.op_table()}
        cases = st.cases()
    assert table == {"aten.t.default": (2, 3), "aten.addmm.default": (2, 3), "aten.relu.default": (1, 2),
                     "aten._softmax.default": (1, 1)}
    fc1 = [c for c in cases if c.op == "aten.addmm.default" and c.first["module"] == "fc1"]
    assert len(fc1) == 1 and fc1[0].count == 2  # the repeated call is one case seen twice
    assert {c.first["module"] for c in cases} == {"fc1", "fc2", "TwoLayer"}
    assert all(c.first["phase"] == "forward" for c in cases)
    assert sorted(c.first["index"] for c in cases) == [0, 1, 2, 6, 7, 8]


def test_inputs_are_captured_before_in_place_mutation(tmp_path):
    carve(model_ref("make_inplace"), tmp_path / "s", progress=False)
    with CaseStore.open(tmp_path / "s") as st:
        (add,) = [c for c in st.cases() if c.op == "aten.add_.Tensor"]
        call = st.load_call(add, st.samples(add.id)[0])
    assert call.args[0].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]  # before the add
    assert call.outputs.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert run_tests(str(tmp_path / "s"), "torch", progress=False).totals()["pass"] == 3


def test_a_cached_parameter_view_keeps_its_layout(tmp_path):
    """Regression: a transposed weight served from the hash cache must keep its `span` layout, or the
    second call's case replays against a scrambled weight (found on Mixtral's grouped expert matmuls)."""
    carve(model_ref("make_shared_transposed"), tmp_path / "s", progress=False)
    with CaseStore.open(tmp_path / "s") as st:
        mms = [c for c in st.cases() if c.op == "aten.mm.default"]
        assert len(mms) == 2
        weights = [st.load_call(c, st.samples(c.id)[0]).args[1] for c in mms]
    _, work = load_workload(model_ref("make_shared_transposed"))
    for w in weights:
        assert torch.equal(w, work.model.w.detach().t())
    assert run_tests(str(tmp_path / "s"), "torch", progress=False).totals()["fail"] == 0


def test_samples_per_signature_and_content_addressing_shrink_the_store(tmp_path):
    one = carve(model_ref("make_repeats"), tmp_path / "k1", progress=False, naive_bytes=True)
    many = carve(model_ref("make_repeats"), tmp_path / "k5", samples=5, progress=False, naive_bytes=True)
    with CaseStore.open(tmp_path / "k5") as st:
        (mm,) = [c for c in st.cases() if c.op == "aten.mm.default"]
        assert mm.count == 20 and mm.n_samples == 5
        weight_bytes = 256 * 256 * 4
        # 5 samples of mm share the one stored weight: far fewer bytes than 5 copies
        assert st.stats()["blob_bytes"] < 2 * weight_bytes
    # dedup + content addressing vs. saving every call's tensors
    assert one.naive_bytes > 20 * weight_bytes
    assert one.stats["blob_bytes"] * 5 < one.naive_bytes
    assert many.stats["blob_bytes"] * 5 < many.naive_bytes


def test_random_ops_replay_their_recorded_draw(tmp_path):
    carve(model_ref("make_random"), tmp_path / "s", progress=False)
    with CaseStore.open(tmp_path / "s") as st:
        random_ops = {c.op for c in st.cases() if c.random}
    assert random_ops == {"aten.randn_like.default", "aten.rand.default"}
    torch.manual_seed(123)  # replay must not depend on the current global RNG
    run = run_tests(str(tmp_path / "s"), "torch", progress=False)
    assert {r.op: r.rule for r in run.results if r.op in random_ops} == dict.fromkeys(random_ops, "seeded-replay")
    assert run.exit_code == 0


def test_user_model_that_raises_leaves_no_store(tmp_path):
    import pytest

    from tapml.errors import TapmlError

    with pytest.raises(TapmlError, match="raised ValueError.*kaboom"):
        carve(model_ref("make_raises"), tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


_SLOW = '''
import time, torch
class Slow(torch.nn.Module):
    def forward(self, x):
        for i in range(1, 100000):
            x = torch.tanh(x[: 1 + i % 300] + i) if x.shape[0] > 1 else torch.ones(300, 8)
            torch.cat([x, x]).sum()
            time.sleep(0.0005)
        return x
def make_model():
    return Slow(), (torch.randn(300, 8),)
'''


def test_sigkill_mid_carve_leaves_a_store_that_opens_and_replays(tmp_path):
    model = tmp_path / "slow.py"
    model.write_text(_SLOW)
    out = tmp_path / "s"
    env = {**os.environ, "TAPML_CARVE_FLUSH": "20"}
    proc = subprocess.Popen([sys.executable, "-m", "tapml.cli", "carve", f"{model}:make_model", "--out", str(out),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    committed = 0
    while time.time() < deadline and committed < 100:
        time.sleep(0.2)
        if (out / "cases.sqlite").exists():
            try:
                with sqlite3.connect(out / "cases.sqlite", timeout=1) as db:
                    committed = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
            except sqlite3.OperationalError:
                pass
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert committed >= 100
    with CaseStore.open(out) as st:
        assert st.runs()[0]["status"] == "interrupted"
        assert st.stats()["samples"] >= committed
    run = run_tests(str(out), "torch", progress=False)
    assert run.totals()["pass"] == run.totals()["cases"] >= 100


def test_model_file_contract_errors(tmp_path):
    import pytest

    from tapml.errors import TapmlError

    with pytest.raises(TapmlError, match="must return"):
        carve(model_ref("make_bad_return"), tmp_path / "a", progress=False)
    with pytest.raises(TapmlError, match="has no function"):
        carve(model_ref("no_such_fn"), tmp_path / "b", progress=False)
    with pytest.raises(TapmlError, match="no such model file"):
        carve(f"{MODELS / 'missing.py'}:make_model", tmp_path / "c", progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")

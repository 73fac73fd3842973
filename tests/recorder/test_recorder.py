"""Carving: op kinds and counts, inputs before mutation, sampling, dedup/content addressing, RNG, SIGKILL."""

import importlib.util
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from conftest import MODELS, model_ref

from tapml.errors import TapmlError
from tapml.recorder import carve
from tapml.replay import run_tests
from tapml.store import CaseStore
from tapml.workload import load_workload


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


def test_a_weight_and_its_transposed_view_are_one_blob(tmp_path):
    """Blobs are addressed by values, not shape: w ([6, 4], input of aten.t) and w.t() (its memory span, input
    of aten.mm) are the same 96 bytes, stored once."""
    carve(model_ref("make_shared_transposed"), tmp_path / "s", progress=False)
    db = sqlite3.connect(tmp_path / "s" / "cases.sqlite")
    assert db.execute("SELECT COUNT(*) FROM blobs WHERE nbytes = 96").fetchone()[0] == 1
    db.close()


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("flush", ["1", "512"])
def test_recorded_tensors_written_later_keep_their_recorded_values(tmp_path, monkeypatch, native, flush):
    """Large tensors are recorded by reference; in-place writes after the recording (by an op, through .data,
    into an output), with the blob still pending (flush 512) or already with the writer (flush 1), must not
    reach the store."""
    if native == "1":
        _native_or_skip()
    monkeypatch.setenv("TAPML_CARVE_NATIVE", native)
    monkeypatch.setenv("TAPML_CARVE_FLUSH", flush)
    carve(model_ref("make_late_writes"), tmp_path / "s", progress=False)
    model, (x,) = _fresh("make_late_writes")
    with CaseStore.open(tmp_path / "s") as st:
        (mm,) = [c for c in st.cases() if c.op == "aten.mm.default"]
        call = st.load_call(mm, st.samples(mm.id)[0])
        (tanh,) = [c for c in st.cases() if c.op == "aten.tanh.default"]
        a = st.load_call(tanh, st.samples(tanh.id)[0]).args[0]
    assert torch.equal(call.args[0], x) and torch.equal(call.args[1], model.w.detach())
    assert torch.equal(call.outputs, x @ model.w.detach()) and torch.equal(a, call.outputs)
    assert run_tests(str(tmp_path / "s"), "torch", progress=False).totals()["fail"] == 0


def test_a_write_no_op_announces_fails_the_carve_loudly(tmp_path):
    """A recorded tensor overwritten through numpy cannot be saved as recorded: the carve fails, no store."""
    with pytest.raises(TapmlError, match="overwritten during the carve"):
        carve(model_ref("make_numpy_write"), tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def _fresh(fn: str):
    """A fresh (model, inputs) from tests/models/tiny.py, as the carve got them before its run."""
    spec = importlib.util.spec_from_file_location("tiny_models", MODELS / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, fn)()


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


def _native_or_skip():
    import pytest

    from tapml import _native

    if os.environ.get("TAPML_CARVE_NATIVE") == "0":
        pytest.skip("TAPML_CARVE_NATIVE=0: the native carving hook is switched off")
    try:
        return _native.carve_hook()
    except RuntimeError as e:  # `make setup` builds it; a machine where it cannot be built is a failure here
        pytest.fail(f"native carving hook unavailable: {e}")


def test_native_hook_sees_exactly_the_calls_the_python_mode_sees():
    """The correctness gate of the C++ hook: the op stream of a zoo Llama generate is identical to the one a
    Python TorchDispatchMode (the fallback recorder) sees: same ops, same decompositions, same order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hook = _native_or_skip()

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    class Unreached(TorchDispatchMode):  # pushed as the Recorder does; the hook switches its Python key off
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            raise AssertionError(f"the Python mode was called for {func}")

    _, work = load_workload("llama", None, 4)
    with torch.no_grad(), Names() as mode:
        work.run()
    with torch.no_grad(), Unreached():
        hook.enable(lambda *a: None, lambda *a: False, lambda *a: None)
        hook.set_trace(True)
        try:
            work.run()
        finally:
            native = hook.take_trace()
            hook.disable()
    assert len(mode.names) > 1000
    assert native == mode.names


def _carve_summary(path, monkeypatch, native: str, **kw):
    monkeypatch.setenv("TAPML_CARVE_NATIVE", native)
    _, work = load_workload("llama", None, 4)
    r = carve("llama", path, workload=work, max_new_tokens=4, progress=False, **kw)
    with CaseStore.open(path) as st:
        cases = sorted((c.signature, c.op, c.count, c.n_samples, repr(c.first), c.metas,
                        [(x.provenance.index, x.chosen) for x in st.samples(c.id)]) for c in st.cases())
        table = [dict(row) for row in st.op_table()]
        stats = {k: v for k, v in st.stats().items() if k != "disk_bytes"}
    return (r.calls, r.cases, r.samples), cases, table, stats


def test_native_and_python_recorders_write_the_same_store(tmp_path, monkeypatch):
    """Call counts, per-case occurrences, exact layouts, samples (which calls, and why: diverse ones with K > 1) and
    provenance do not depend on which recorder ran."""
    _native_or_skip()
    for samples in (1, 3):
        py = _carve_summary(tmp_path / f"py{samples}", monkeypatch, "0", samples=samples)
        nat = _carve_summary(tmp_path / f"nat{samples}", monkeypatch, "1", samples=samples)
        assert py[0][0] > 1000 and py[0] == nat[0]
        assert py[1] == nat[1]
        assert py[2] == nat[2]
        assert py[3] == nat[3]


def test_python_recorder_still_passes_the_tiny_model_checks(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("TAPML_CARVE_NATIVE", "0")
    test_tiny_model_yields_expected_op_kinds_and_counts(tmp_path, tiny)
    for sub, test in (("m", test_inputs_are_captured_before_in_place_mutation),
                      ("r", test_random_ops_replay_their_recorded_draw)):
        (tmp_path / sub).mkdir()
        test(tmp_path / sub)


def test_without_the_native_hook_carving_warns_once_and_uses_the_python_mode(tmp_path, monkeypatch, capsys, tiny):
    import tapml.recorder as carve_mod
    from tapml import _native

    def unavailable():
        raise RuntimeError("no compiler")

    monkeypatch.delenv("TAPML_CARVE_NATIVE", raising=False)
    monkeypatch.setattr(_native, "carve_hook", unavailable)
    monkeypatch.setattr(carve_mod, "_warned", False)
    r = carve(tiny, tmp_path / "s", progress=False)
    carve(tiny, tmp_path / "t", progress=False)
    assert r.calls == 9
    err = capsys.readouterr().err
    assert err.count("native carving hook unavailable (no compiler)") == 1


def test_the_heap_before_the_run_is_frozen_out_of_gc_only_while_recording(tmp_path):
    """Full collections over the model's heap stalled carves; the pre-run heap is frozen during the run, then
    unfrozen, and a process that froze objects itself is left as it was."""
    import gc

    from tapml.workload import Workload

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(gc.get_freeze_count())
            return x + 1

    model = Probe()
    work = Workload(model, lambda: model(torch.ones(3)), False, "probe")
    assert gc.get_freeze_count() == 0
    carve("probe", tmp_path / "a", workload=work, progress=False)
    assert seen[-1] > 1000 and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        carve("probe", tmp_path / "b", workload=work, progress=False)
        assert seen[-1] == mine and gc.get_freeze_count() == mine
    finally:
        gc.unfreeze()


def _snapshot(path):
    """What a store holds, for before/after comparisons: runs, counts, and its files."""
    with CaseStore.open(path) as st:
        runs = [(r["id"], r["model"], r["status"], r["calls"]) for r in st.runs()]
        stats = {k: v for k, v in st.stats().items() if k != "disk_bytes"}
    return runs, stats, sorted(p.name for p in (path / "blobs").iterdir())


@pytest.mark.parametrize("native", ["1", "0"])
def test_a_timeout_stops_the_run_and_discards_it(tmp_path, monkeypatch, native, tiny):
    """An endless model is stopped at the limit (with commits landing meanwhile: flush 1); the run is discarded as
    any failed one: a store the carve created is gone, an existing store is left as it was."""
    if native == "1":
        _native_or_skip()
    monkeypatch.setenv("TAPML_CARVE_NATIVE", native)
    monkeypatch.setenv("TAPML_CARVE_FLUSH", "1")
    handler = signal.getsignal(signal.SIGALRM)
    t = time.monotonic()
    with pytest.raises(TapmlError, match=r"exceeded its time limit of 0.5 s") as e:
        carve(model_ref("make_endless"), tmp_path / "new", progress=False, timeout=0.5)
    assert time.monotonic() - t < 20 and "\n" not in str(e.value)
    assert not (tmp_path / "new").exists()
    carve(tiny, tmp_path / "s", progress=False)
    before = _snapshot(tmp_path / "s")
    with pytest.raises(TapmlError, match="exceeded its time limit"):
        carve(model_ref("make_endless"), tmp_path / "s", progress=False, timeout=0.5)
    assert _snapshot(tmp_path / "s") == before
    assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    r = carve(tiny, tmp_path / "s", progress=False, timeout=60)  # a run within its limit is kept
    assert r.calls == 9 and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_bad_timeouts_and_a_timeout_off_the_main_thread_are_refused(tmp_path, tiny):
    import threading

    for bad in (0, -1, float("nan"), float("inf"), "5", True):
        with pytest.raises(TapmlError, match="--timeout must be a finite number of seconds > 0"):
            carve(tiny, tmp_path / "s", progress=False, timeout=bad)
    errors = []

    def off_main():
        try:
            carve(tiny, tmp_path / "s", progress=False, timeout=5)
        except TapmlError as e:
            errors.append(str(e))

    th = threading.Thread(target=off_main)
    th.start()
    th.join()
    assert len(errors) == 1 and "main thread" in errors[0]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("var", "value", "says"), [
    ("TAPML_CARVE_FLUSH", "0", "a positive integer"), ("TAPML_CARVE_FLUSH", "-3", "a positive integer"),
    ("TAPML_CARVE_FLUSH", "many", "a positive integer"), ("TAPML_CARVE_FLUSH", "1.5", "a positive integer"),
    ("TAPML_CARVE_NATIVE", "yes", "0, 1, true, false or auto"),
    ("TAPML_CARVE_NATIVE", "2", "0, 1, true, false or auto")])
def test_bad_environment_values_are_one_line_errors(tmp_path, monkeypatch, tiny, var, value, says):
    monkeypatch.setenv(var, value)
    with pytest.raises(TapmlError, match=f"{var} must be {says}.*got '{value}'") as e:
        carve(tiny, tmp_path / "s", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_accepted_environment_spellings(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("TAPML_CARVE_FLUSH", " 2 ")
    for i, value in enumerate(("auto", "FALSE", "", " 0 ")):
        monkeypatch.setenv("TAPML_CARVE_NATIVE", value)
        assert carve(tiny, tmp_path / f"s{i}", progress=False).calls == 9


def test_a_load_killed_mid_way_does_not_hang_the_next_carve(tmp_path):
    """torch's extension loader leaves a `lock` file when its process dies while loading and then waits for it
    forever; a machine restart during a carve made every later carve hang until the file was found by hand."""
    import shutil

    from tapml import _native

    _native_or_skip()
    built = _native._cache_dir()
    copy = tmp_path / "native" / built.name
    shutil.copytree(built, copy)
    (copy / "lock").touch()  # what the killed process left
    code = "from tapml._native import carve_hook; carve_hook(); print('loaded')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "TAPML_NATIVE_DIR": str(tmp_path / "native")})
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr


@pytest.mark.parametrize("native", ["1", "0"])
def test_views_keep_their_live_layout_and_a_layout_fault_is_caught(tmp_path, monkeypatch, native):
    """A size-1 dim's stride and a storage offset are part of what a call saw: the case keeps them (one case per
    layout), replay hands them to the target, and a fault that shows only on such views fails those cases."""
    if native == "1":
        _native_or_skip()
    monkeypatch.setenv("TAPML_CARVE_NATIVE", native)
    carve(model_ref("make_views"), tmp_path / "s", progress=False)
    layouts = {}
    with CaseStore.open(tmp_path / "s") as st:
        for c in st.cases("aten.mul.Tensor"):
            (x,) = [t for t in st.load_call(c, st.samples(c.id)[0]).args if isinstance(t, torch.Tensor)]
            layouts[(tuple(x.shape), x.stride(), x.storage_offset())] = c.id
    assert set(layouts) == {((2, 4, 1, 32), (128, 32, 128, 1), 0), ((2, 4, 1, 32), (128, 32, 32, 1), 0),
                            ((1, 32), (32, 1), 32), ((1, 32), (32, 1), 0)}
    assert run_tests(str(tmp_path / "s"), "torch", progress=False).exit_code == 0
    run = run_tests(str(tmp_path / "s"), "torch", progress=False, inject="layout:aten.mul.Tensor")
    failed = {r.case_id for r in run.results if r.status == "fail"}
    assert failed == {layouts[((2, 4, 1, 32), (128, 32, 128, 1), 0)], layouts[((1, 32), (32, 1), 32)]}

"""Which calls a carve keeps (`--samples K`): K = 1 the first call of each signature, as always; K > 1 the first
call and the K-1 calls whose inputs differ most, held until the run ends and only those committed."""

import json
import sqlite3
import subprocess

import pytest
import torch
from conftest import TAPML, model_ref
from torch.utils._python_dispatch import TorchDispatchMode

from tapml.diverse import Pool, Summary, summarize
from tapml.ops import encode_args, op_name, signature
from tapml.recorder import carve
from tapml.replay import run_tests
from tapml.store import CaseStore
from tapml.workload import load_workload

OUTLIER, MASKED = 17, 29  # the rows of make_varied that differ (tests/models/tiny.py)


def _softmax_samples(path):
    with CaseStore.open(path) as st:
        (case,) = st.cases("aten._softmax")
        return case, [(st.load_call(case, s), s) for s in st.samples(case.id)]


def _orphans(path) -> set[str]:
    """Blobs the store holds that no sample references (a replaced sample's blobs must not be committed)."""
    db = sqlite3.connect(path / "cases.sqlite")
    held = {h for (h,) in db.execute("SELECT hash FROM blobs")}
    used = set()
    for inputs, outputs, rng in db.execute("SELECT inputs, outputs, rng FROM samples"):
        used.update(h for h, _ in json.loads(inputs))
        used.update(h for h, _ in json.loads(outputs)["tensors"])
        used.update([rng] if rng else [])
    db.close()
    return held - used


@pytest.mark.parametrize("native", ["1", "0"])
def test_three_samples_keep_the_first_call_the_outlier_and_the_masked_row(tmp_path, monkeypatch, native):
    if native == "1":
        from tapml import _native

        _native.carve_hook()
    monkeypatch.setenv("TAPML_CARVE_NATIVE", native)
    monkeypatch.setenv("TAPML_CARVE_FLUSH", "2")  # commits all along: the held samples must not go with them
    carve(model_ref("make_varied"), tmp_path / "s", samples=3, progress=False)
    case, samples = _softmax_samples(tmp_path / "s")
    assert case.count == 40 and len(samples) == 3
    rows = [call.args[0] for call, _ in samples]
    assert rows[0].isfinite().all() and rows[0].abs().max() < 10  # the first call: an ordinary row
    assert rows[1].abs().max() == 1e4  # the outlier, then the masked row, in call order
    assert torch.isneginf(rows[2]).all()
    assert [s.chosen["by"] for _, s in samples] == ["first", "distinct", "distinct"]
    assert samples[1][1].chosen["absmax"] == 1e4 and samples[2][1].chosen["masked"] == 1
    assert _orphans(tmp_path / "s") == set()
    assert run_tests(str(tmp_path / "s"), "torch", progress=False).exit_code == 0


def test_one_sample_is_each_signatures_first_call_and_nothing_else_changes(tmp_path):
    """K = 1 keeps the first call of every signature, found here independently by a plain dispatch mode, and
    stores no choice (a K = 1 store is what it always was)."""
    _, work = load_workload("llama", None, 2)

    class First(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.first, self.n = {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            spec, tensors = encode_args(args, kwargs or {})
            self.first.setdefault(signature(op_name(func), spec, tensors), self.n)
            self.n += 1
            return func(*args, **(kwargs or {}))

    mode = First()
    with torch.no_grad(), mode:
        work.run()
    carve("llama", tmp_path / "s", workload=work, max_new_tokens=2, progress=False)
    with CaseStore.open(tmp_path / "s") as st:
        kept = {c.signature: [(s.provenance.index, s.chosen) for s in st.samples(c.id)] for c in st.cases()}
        options = st.runs()[0]["options"]
    assert kept == {sig: [(i, None)] for sig, i in mode.first.items()}
    assert options == {"prompt": None, "max_new_tokens": 2, "samples": 1}


def test_more_samples_into_a_store_that_has_the_first_call(tmp_path):
    """A second carve with K = 3 adds the two most distinct calls to the first one the store holds."""
    carve(model_ref("make_varied"), tmp_path / "s", progress=False)
    carve(model_ref("make_varied"), tmp_path / "s", samples=3, progress=False)
    _, samples = _softmax_samples(tmp_path / "s")
    rows = [call.args[0] for call, _ in samples]
    assert len(rows) == 3 and samples[0][1].chosen is None  # the first run's sample, chosen in call order
    assert rows[1].abs().max() == 1e4 and torch.isneginf(rows[2]).all()
    assert _orphans(tmp_path / "s") == set()


def _point(*v):
    return Summary(tuple(float(x) for x in v), tuple(f"f{i}" for i in range(len(v))), {})


def test_the_pool_lets_go_of_the_least_distinct_and_keeps_earlier_calls_on_ties():
    pool = Pool(2, [_point(0, 0)])
    for i, p in enumerate([_point(0.1, 0), _point(0.2, 0)]):
        spot = pool.offer(i, p)
        assert spot == (i, None)
        from tapml.diverse import Kept

        pool.kept.append(Kept(i, p))
    assert pool.offer(2, _point(0.2, 0)) is None  # a tie with a kept call: the later one goes
    pos, replaced = pool.offer(3, _point(9, 0))
    assert replaced.index in (0, 1) and pool.kept[pos] is replaced
    assert not pool.settled
    empty = Pool(1, [])
    empty.kept.append(Kept(0, _point()))
    assert empty.settled  # nothing to tell calls apart: the signature stops asking


def test_summaries_see_extremes_masks_and_positions_and_skip_parameters():
    weight = torch.randn(4, 4)
    mask = torch.zeros(3, 5)
    mask[1] = torch.finfo(torch.float32).min
    x = torch.tensor([[1.0, float("nan")], [-7.0, float("inf")]])
    s = summarize([x, mask, torch.tensor([3, -900]), torch.tensor([[True, False], [False, False]]), weight],
                  {weight.untyped_storage().data_ptr()})
    assert s.stats == {"absmax": 7.0, "nan": 1, "inf": 1, "masked": 2, "intmax": 900}
    assert summarize([torch.tensor([1, 2])], set()).stats["absmax"] is None  # no floating input
    assert len(s.vector) == len(s.names) == 4 + 4 + 1 + 1 + 4 and s.vector[-4:] == (0.0,) * 4


def test_show_says_how_the_samples_were_chosen(tmp_path):
    carve(model_ref("make_varied"), tmp_path / "s", samples=3, progress=False)
    r = subprocess.run([*TAPML, "show", str(tmp_path / "s"), "--cases"], capture_output=True, text=True,
                       env={**__import__("os").environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    assert "3: the first call + the 2 most distinct" in r.stdout
    lines = [line for line in r.stdout.splitlines() if "sample: call" in line]
    assert any("first call" in line for line in lines)
    assert any("most distinct by input 0 |max|" in line and "|max| 1e+04" in line for line in lines)
    assert any("1 masked rows" in line for line in lines)

"""CaseStore: opening errors are one clear TapmlError; several runs share one store; bad runs are discarded."""

import sqlite3

import pytest
from conftest import model_ref

from tapml.errors import TapmlError
from tapml.recorder import carve
from tapml.store import CaseStore


def test_missing_and_foreign_directories_are_refused(tmp_path):
    with pytest.raises(TapmlError, match="no case store"):
        CaseStore.open(tmp_path / "nowhere")
    with pytest.raises(TapmlError, match="not a TapML case store"):
        CaseStore.open(tmp_path)
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(TapmlError, match="not a TapML case store"):
        CaseStore.create(tmp_path)


def test_corrupt_and_foreign_sqlite_are_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cases.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(TapmlError, match="corrupt or not a TapML store"):
        CaseStore.open(bad)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    db = sqlite3.connect(foreign / "cases.sqlite")
    db.execute("CREATE TABLE meta(key TEXT, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('format', 'something-else')")
    db.commit()
    db.close()
    with pytest.raises(TapmlError, match="foreign"):
        CaseStore.open(foreign)


def test_one_store_holds_several_models_runs(tmp_path, tiny):
    out = tmp_path / "s"
    r1 = carve(tiny, out, progress=False)
    r2 = carve(model_ref("make_inplace"), out, progress=False)
    with CaseStore.open(out) as st:
        runs = st.runs()
        assert [r["status"] for r in runs] == ["complete", "complete"]
        assert {r["model"] for r in runs} == {r1.model, r2.model}
        assert st.stats()["calls"] == r1.calls + r2.calls
    r3 = carve(tiny, out, progress=False)  # the same model again: no new cases, counts add up
    assert r3.new_cases == 0
    with CaseStore.open(out) as st:
        assert st.stats()["calls"] == 2 * r1.calls + r2.calls


def test_failed_run_is_discarded_from_an_existing_store(tmp_path, tiny):
    out = tmp_path / "s"
    carve(tiny, out, progress=False)
    with CaseStore.open(out) as st:
        before = st.stats()
    with pytest.raises(TapmlError, match="kaboom"):
        carve(model_ref("make_raises"), out, progress=False)
    with CaseStore.open(out) as st:
        after = st.stats()
        assert len(st.runs()) == 1
    assert {k: after[k] for k in ("cases", "samples", "calls")} == {k: before[k] for k in ("cases", "samples", "calls")}


def test_a_name_too_long_is_a_one_line_error_not_an_oserror(tmp_path):
    long = tmp_path / ("x" * 300)
    with pytest.raises(TapmlError, match="longer than the file system allows"):
        CaseStore.open(long)
    with pytest.raises(TapmlError, match="File name too long.*choose another --out"):
        CaseStore.create(long)

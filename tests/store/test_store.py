"""CaseStore: opening errors are one clear TapmlError; several runs share one store; bad runs are discarded."""

import sqlite3

import pytest
from conftest import model_ref

from tapml.errors import TapmlError
from tapml.ops import default_strides, signature_parts
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


def _as_an_older_tapml_wrote_it(path):
    """Rewrite a store as an older tapml wrote it: no strides for tensors torch calls contiguous (a size-1 dim's
    stride), signatures over those metas, so calls that differ only there are one case (the first one's)."""
    import json

    def old(meta):
        if meta.get("offset") == 0 and "storage" not in meta and "span" not in meta and all(
                s == d for n, s, d in zip(meta["shape"], meta["stride"], default_strides(meta["shape"])) if n != 1):
            return {k: v for k, v in meta.items() if k not in ("stride", "offset")}
        return meta

    db = sqlite3.connect(path / "cases.sqlite")
    seen, rewritten = set(), 0
    with db:
        db.execute("UPDATE cases SET signature = 'old-' || id")  # (a new signature may be another row's old one)
        for i, op, spec, live in db.execute("SELECT id, op, spec, metas FROM cases ORDER BY id").fetchall():
            metas = [old(m) for m in json.loads(live)]
            sig = signature_parts(op, json.loads(spec), metas)[0]
            if sig in seen:  # an older tapml had folded this case into an earlier one
                for table in ("samples", "occurrences"):
                    db.execute(f"DELETE FROM {table} WHERE case_id=?", (i,))
                db.execute("DELETE FROM cases WHERE id=?", (i,))
                continue
            seen.add(sig)
            rewritten += metas != json.loads(live)
            db.execute("UPDATE cases SET metas=?, signature=? WHERE id=?", (json.dumps(metas), sig, i))
        for i, inputs, outputs in db.execute("SELECT id, inputs, outputs FROM samples").fetchall():
            outputs = json.loads(outputs)
            outputs["tensors"] = [[h, old(m)] for h, m in outputs["tensors"]]
            db.execute("UPDATE samples SET inputs=?, outputs=? WHERE id=?",
                       (json.dumps([[h, old(m)] for h, m in json.loads(inputs)]), json.dumps(outputs), i))
    db.close()
    return rewritten


def test_a_store_written_before_exact_layouts_still_loads_replays_and_extends(tmp_path):
    from tapml.replay import run_tests

    out = tmp_path / "s"
    carve(model_ref("make_views"), out, progress=False)
    rewritten = _as_an_older_tapml_wrote_it(out)
    with CaseStore.open(out) as st:
        calls = [st.load_call(c, s) for c in st.cases() for s in st.samples(c.id)]
    q = [t for call in calls if call.op == "aten.mul.Tensor" for t in call.tensors() if t.shape == (2, 4, 1, 32)]
    assert len(q) == 1 and q[0].stride() == (128, 32, 32, 1)  # the layout an older store implies
    assert run_tests(str(out), "torch", progress=False).exit_code == 0
    r = carve(model_ref("make_views"), out, progress=False)  # a new carve extends it
    assert rewritten >= 1 and r.new_cases == rewritten  # each call on such a view is a case of its own now
    with CaseStore.open(out) as st:
        strides = sorted(t.stride() for c in st.cases("aten.mul.Tensor") for s in st.samples(c.id)
                         for t in st.load_call(c, s).tensors() if t.shape == (2, 4, 1, 32))
    assert strides == [(128, 32, 32, 1), (128, 32, 128, 1)]


def test_a_store_without_the_sample_choice_column_reads_and_takes_diverse_samples(tmp_path):
    """Stores written before diverse samples have no `chosen` column: readers do without it, the next writer adds
    it."""
    from tapml.store import summarize

    out = tmp_path / "s"
    carve(model_ref("make_varied"), out, progress=False)
    db = sqlite3.connect(out / "cases.sqlite")
    with db:
        db.execute("ALTER TABLE samples DROP COLUMN chosen")
    db.close()
    with CaseStore.open(out) as st:
        assert all(s.chosen is None for c in st.cases() for s in st.samples(c.id))
    assert all(x["chosen"] is None for xs in summarize(out, cases=True).choices.values() for x in xs)
    carve(model_ref("make_varied"), out, samples=3, progress=False)
    with CaseStore.open(out) as st:
        (case,) = st.cases("aten._softmax")
        assert [s.chosen and s.chosen["by"] for s in st.samples(case.id)] == [None, "distinct", "distinct"]

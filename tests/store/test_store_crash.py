"""Store creation and ownership under real failures: SIGKILLs while stores are being created, a second carve into
a store that one is writing, and failed carves next to other carves' data."""

import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import TAPML, model_ref

from tapml.errors import TapmlError
from tapml.recorder import carve
from tapml.replay import run_tests
from tapml.store import CaseStore
from tapml.workload import Workload

# Forks children that create stores one after another, each SIGKILLed after a random delay (the parent imports
# tapml once; a fork per kill keeps the loop to milliseconds).
_KILLER = """
import os, random, signal, sys, time
from pathlib import Path
from tapml.store import CaseStore
root, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
for k in range(kills):
    pid = os.fork()
    if pid == 0:
        i = 0
        while True:
            CaseStore.create(root / f"k{k}-{i}").close()
            i += 1
    time.sleep(rng.uniform(0, 0.1))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


def test_sigkill_while_creating_stores_leaves_complete_or_recarvable_directories(tmp_path, tiny):
    """Each directory a killed creation left is a complete store, or one that `open` calls incomplete in one
    line and that a new carve takes without complaint."""
    root = tmp_path / "stores"
    root.mkdir()
    subprocess.run([sys.executable, "-c", _KILLER, str(root), "40", "7"], check=True, timeout=120)
    complete, partial = 0, []
    for d in sorted(root.iterdir()):
        try:
            CaseStore.open(d).close()
            complete += 1
        except TapmlError as e:
            assert "\n" not in str(e)
            assert "holds no complete case store" in str(e) or "not a TapML case store" in str(e), str(e)
            partial.append(d)
    assert partial, "no kill landed inside a creation: the test did not test anything"
    for d in partial:
        CaseStore.create(d).close()
        CaseStore.open(d).close()
    assert carve(tiny, partial[0], progress=False).calls == 9
    with CaseStore.open(partial[0]) as st:
        assert [r["status"] for r in st.runs()] == ["complete"]


def _blocking(fail: bool) -> tuple[Workload, threading.Event, threading.Event]:
    """A workload that runs a few ops, then waits to be let go (then raises when `fail`)."""
    started, go = threading.Event(), threading.Event()
    lin = torch.nn.Linear(4, 4)

    def run():
        lin(torch.ones(2, 4))
        started.set()
        assert go.wait(60)
        if fail:
            raise ValueError("boom after waiting")

    return Workload(lin, run, False, "blocks until let go"), started, go


def _carve_in_thread(out, work) -> tuple[threading.Thread, list]:
    result: list = []

    def target():
        try:
            result.append(carve("blocking", out, workload=work, progress=False))
        except BaseException as e:  # reported to the test
            result.append(e)

    th = threading.Thread(target=target)
    th.start()
    return th, result


@pytest.mark.parametrize("first_fails", [False, True])
def test_a_second_carve_into_a_store_being_written_is_refused(tmp_path, tiny, first_fails):
    """While a carve writes a new store, `tapml carve` into it (another process) is refused in one line; the first
    carve then ends as it would alone: kept when it succeeds, and when it fails it removes the store it made —
    there is nothing of anyone else's in it."""
    out = tmp_path / "s"
    work, started, go = _blocking(first_fails)
    th, result = _carve_in_thread(out, work)
    try:
        assert started.wait(60)
        r = subprocess.run([*TAPML, "carve", tiny, "--out", str(out), "--no-progress"], capture_output=True,
                           text=True, timeout=300)
    finally:
        go.set()
        th.join(60)
    if r.returncode == 0 and first_fails:  # what the refusal prevents: the failing carve deleting its success
        assert (out / "cases.sqlite").exists(), "the failing carve deleted the other carve's complete store"
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "being written by another carve" in r.stderr and str(out) in r.stderr and "--out" in r.stderr
    if first_fails:
        assert isinstance(result[0], TapmlError) and "boom after waiting" in str(result[0])
        assert not out.exists()
    else:
        assert result[0].calls > 0
        with CaseStore.open(out) as st:
            assert [(x["model"], x["status"]) for x in st.runs()] == [("blocking", "complete")]


def test_a_carve_is_refused_while_another_thread_carves_into_the_same_store(tmp_path, tiny):
    carve(tiny, tmp_path / "s", progress=False)
    work, started, go = _blocking(False)
    th, result = _carve_in_thread(tmp_path / "s", work)
    try:
        assert started.wait(60)
        with pytest.raises(TapmlError, match="being written by another carve"):
            CaseStore.create(tmp_path / "s")
    finally:
        go.set()
        th.join(60)
    assert result[0].calls > 0
    carve(tiny, tmp_path / "s", progress=False)  # the lock went with the carve that held it
    with CaseStore.open(tmp_path / "s") as st:
        assert [x["status"] for x in st.runs()] == ["complete"] * 3


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith("cases.sqlite")}


def test_a_failing_carve_takes_back_only_its_own_rows_and_shards(tmp_path, monkeypatch, tiny):
    """After another carve's success, a carve that commits shards (flush 1) and then fails leaves the store as it
    found it: the other run, its rows, its shard files byte for byte, and no shard of its own."""
    out = tmp_path / "s"
    carve(tiny, out, progress=False)
    with CaseStore.open(out) as st:
        runs, stats = st.runs(), st.stats()
    files = _files(out)
    monkeypatch.setenv("TAPML_CARVE_FLUSH", "1")
    with pytest.raises(TapmlError, match="kaboom"):
        carve(model_ref("make_raises"), out, progress=False)
    assert _files(out) == files
    with CaseStore.open(out) as st:
        assert st.runs() == runs
        assert {k: v for k, v in st.stats().items() if k != "disk_bytes"} == \
            {k: v for k, v in stats.items() if k != "disk_bytes"}
    assert run_tests(str(out), "torch", progress=False).totals()["pass"] == 6


def test_a_failing_carve_into_leftovers_removes_only_what_it_made(tmp_path):
    """A failed first carve into a directory an interrupted creation left removes the store it made and keeps
    the directory (it did not make it)."""
    out = tmp_path / "s"
    (out / "blobs").mkdir(parents=True)
    (out / "carve.lock").touch()
    (out / "cases.sqlite.0123.tmp").write_bytes(b"half a database")
    with pytest.raises(TapmlError, match="kaboom"):
        carve(model_ref("make_raises"), out, progress=False)
    assert out.is_dir() and not any(out.iterdir())
    assert os.listdir(tmp_path) == ["s"]


def test_open_says_an_interrupted_creation_left_no_complete_store(tmp_path):
    out = tmp_path / "s"
    (out / "blobs").mkdir(parents=True)
    (out / "carve.lock").touch()
    with pytest.raises(TapmlError, match=r"holds no complete case store.*carve again") as e:
        CaseStore.open(out)
    assert "\n" not in str(e.value)



def test_a_tableless_database_left_by_an_older_creation_is_recarvable(tmp_path, tiny):
    """Before creation was atomic, a kill left a cases.sqlite without tables (empty, or WAL mode and nothing else):
    `open` calls it incomplete in one line and a carve replaces it."""
    import sqlite3

    empty, wal_only = tmp_path / "empty", tmp_path / "wal"
    empty.mkdir()
    (empty / "cases.sqlite").touch()
    wal_only.mkdir()
    db = sqlite3.connect(wal_only / "cases.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    for d in (empty, wal_only):
        with pytest.raises(TapmlError, match="holds no complete case store") as e:
            CaseStore.open(d)
        assert "\n" not in str(e.value)
        assert carve(tiny, d, progress=False).calls == 9
        with CaseStore.open(d) as st:
            assert [r["status"] for r in st.runs()] == ["complete"]

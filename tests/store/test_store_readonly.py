"""Readers never write: a store opened for reading (show, test, export) has a connection that cannot write, and a
store on read-only media or in a directory the reader may not write opens and replays (SQLite's WAL readers need
a -shm file they cannot make there)."""

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
from conftest import TAPML

from tapml.errors import TapmlError
from tapml.recorder import carve
from tapml.replay import run_tests
from tapml.store import CaseStore


def _digest(store) -> dict:
    """The store's content: the database and the shards (not SQLite's -wal/-shm coordination files)."""
    files = [store / "cases.sqlite", *sorted((store / "blobs").iterdir())]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_a_reader_cannot_write_and_leaves_the_store_as_it_was(tmp_path, tiny):
    out = tmp_path / "s"
    carve(tiny, out, progress=False)
    before = _digest(out)
    with CaseStore.open(out) as st:
        st.stats(), st.runs(), st.op_table()
        for case in st.cases():
            for s in st.samples(case.id):
                st.load_call(case, s)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            st.db.execute("INSERT INTO meta VALUES ('x', 'y')")
        with pytest.raises(TapmlError, match="readonly"):
            st.begin_run("m", "d", {})
    assert run_tests(str(out), "torch", progress=False).exit_code == 0
    assert _digest(out) == before


_READER = """
import json, sys
from tapml.replay import run_tests
from tapml.store import CaseStore
with CaseStore.open(sys.argv[1]) as st:
    runs = [r["status"] for r in st.runs()]
print(json.dumps({"runs": runs, "totals": run_tests(sys.argv[1], "torch", progress=False).totals()}))
"""


def _unprivileged() -> list[str]:
    """A command prefix under which file permissions apply: as root, without the capabilities that override them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is missing: cannot drop CAP_DAC_OVERRIDE to make a read-only dir")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def test_a_store_in_a_directory_the_reader_cannot_write_opens_and_replays(tmp_path, tiny):
    out = tmp_path / "s"
    carve(tiny, out, progress=False)
    before = _digest(out)
    paths = [out, out / "blobs", *out.rglob("*")]
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        prefix = _unprivileged()
        probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(out / 'new')!r}, 'w')"],
                               capture_output=True, text=True)
        if probe.returncode == 0 or "Permission denied" not in probe.stderr:
            pytest.skip(f"the directory stayed writable for the reader: {probe.stderr.strip()[-200:]}")
        r = subprocess.run([*prefix, sys.executable, "-c", _READER, str(out)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["runs"] == ["complete"] and got["totals"]["pass"] == got["totals"]["cases"] == 6
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert _digest(out) == before


def tapml(*args):
    return subprocess.run([*TAPML, *map(str, args)], capture_output=True, text=True, timeout=300)


_DIES_AFTER_COMMIT = """
import os, sys
from tapml.store import CaseStore
st = CaseStore.create(sys.argv[1])
st.begin_run("killed", "a run committed to the WAL, then the process died", {})
os._exit(0)  # no close: no checkpoint; the commit stays in cases.sqlite-wal, as after a SIGKILL
"""


@pytest.fixture
def ro_mount(tmp_path):
    """A tmpfs mounted at tmp_path/mnt, and a function that remounts it read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    def read_only():
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)

    try:
        yield mnt, read_only
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_store_on_a_read_only_mount_opens_and_replays(ro_mount, tiny):
    mnt, read_only = ro_mount
    carve(tiny, mnt / "s", progress=False)
    subprocess.run([sys.executable, "-c", _DIES_AFTER_COMMIT, str(mnt / "w")], check=True, timeout=120)
    assert (mnt / "w" / "cases.sqlite-wal").stat().st_size > 0 and (mnt / "w" / "cases.sqlite-shm").exists()
    shutil.copytree(mnt / "w", mnt / "w-no-shm")
    (mnt / "w-no-shm" / "cases.sqlite-shm").unlink()
    read_only()
    assert not os.access(mnt, os.W_OK)

    r = tapml("show", mnt / "s")
    assert r.returncode == 0 and "6 cases covering 9 calls" in " ".join(r.stdout.split()), r.stderr
    r = tapml("test", mnt / "s", "--backend", "torch")
    assert r.returncode == 0 and "6 passed" in r.stdout, r.stderr
    with CaseStore.open(mnt / "w") as st:  # its -shm is there: SQLite reads the WAL through it
        assert [x["status"] for x in st.runs()] == ["interrupted"]
    with pytest.raises(TapmlError, match="cases.sqlite-wal") as e:  # immutable would miss the committed run
        CaseStore.open(mnt / "w-no-shm")
    assert "\n" not in str(e.value)
    r = tapml("carve", tiny, "--out", mnt / "s")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(TapmlError, match="Read-only file system") as e:
        CaseStore.create(mnt / "s")
    assert "\n" not in str(e.value)


def test_a_carve_still_appends_after_readers(tmp_path, tiny):
    """Readers may leave SQLite's (empty) -wal/-shm files behind; the next writer uses them as its own."""
    out = tmp_path / "s"
    carve(tiny, out, progress=False)
    CaseStore.open(out).close()
    wal = out / "cases.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    carve(tiny, out, progress=False)
    with CaseStore.open(out) as st:
        assert [x["status"] for x in st.runs()] == ["complete", "complete"]

"""A damaged store is the store's fault, never the backend's: flipped shard bytes and garbled SQLite pages end as
one line naming the store (exit 2 from the CLI), not as failed cases or tracebacks."""

import json
import shutil
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import TAPML, model_ref

from tapml.errors import StoreCorrupt, TapmlError
from tapml.recorder import carve
from tapml.replay import run_tests
from tapml.store import CaseStore


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """A store of a model with a large weight (kept by reference while carving) and small tensors."""
    out = tmp_path_factory.mktemp("damage") / "clean"
    carve(model_ref("make_repeats"), out, progress=False)
    return out


def _copy(clean, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(clean, out)
    return out


def _flip_data_byte(shard, at: float = 0.5) -> None:
    """Flip one byte inside the tensor data of a safetensors file (its header stays valid)."""
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n
    raw[start + int((len(raw) - start) * at)] ^= 0x10
    shard.write_bytes(bytes(raw))


def tapml(*args):
    return subprocess.run([*TAPML, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_the_clean_store_passes(clean):
    assert run_tests(str(clean), "torch", progress=False).exit_code == 0


def test_a_flipped_shard_byte_is_a_store_error_not_a_failed_case(clean, tmp_path):
    out = _copy(clean, tmp_path)
    (shard,) = sorted((out / "blobs").iterdir())
    _flip_data_byte(shard)
    with pytest.raises(StoreCorrupt) as e:
        run_tests(str(out), "torch", progress=False)
    msg = str(e.value)
    assert isinstance(e.value, TapmlError) and "\n" not in msg
    assert str(out) in msg and shard.name in msg and "content hash" in msg and "carve" in msg
    r = tapml("test", out, "--backend", "torch")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "content hash" in r.stderr
    assert "passed" not in r.stdout and "failed" not in r.stdout


def test_each_blob_is_hashed_once_per_open_store(clean, monkeypatch):
    import tapml.store as store_mod

    calls = []
    real = store_mod.content_hash
    monkeypatch.setattr(store_mod, "content_hash", lambda t: calls.append(1) or real(t))
    with CaseStore.open(clean) as st:
        loaded = 0
        for _ in range(2):
            for case in st.cases():
                for s in st.samples(case.id):
                    st.load_call(case, s)
                    loaded += len(s.inputs) + len(s.outputs["tensors"])
        n_blobs = st.stats()["blobs"]
    assert loaded > n_blobs and len(calls) == n_blobs


def _root_pages(db_path, *names) -> list[int]:
    db = sqlite3.connect(db_path)
    try:
        pages = [db.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (n,)).fetchone()[0] for n in names]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    return [(p, size) for p in pages]


def _garble(db_path, pages) -> None:
    raw = bytearray(db_path.read_bytes())
    for page, size in pages:
        raw[(page - 1) * size:page * size] = b"\xff" * size
    db_path.write_bytes(bytes(raw))


@pytest.mark.parametrize("what", ["samples", "all-but-header"])
def test_garbled_sqlite_pages_are_one_line_errors(clean, tmp_path, what):
    """Garbled pages of the samples table (found by later queries, not at open) or of every page but the first:
    `tapml show` and `tapml test` exit 2 with one line naming the store, and the API raises a TapmlError."""
    out = _copy(clean, tmp_path)
    db_path = out / "cases.sqlite"
    wal = out / "cases.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # everything is in the main file
    if what == "samples":
        pages = _root_pages(db_path, "samples", "samples_case")
    else:
        size = _root_pages(db_path, "meta")[0][1]
        pages = [(p, size) for p in range(2, db_path.stat().st_size // size + 1)]
    _garble(db_path, pages)
    for args in (("show", out), ("show", out, "--cases"), ("test", out, "--backend", "torch")):
        r = tapml(*args)
        assert r.returncode == 2, (args, r.stdout + r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tapml: error:") and str(out) in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    with pytest.raises(TapmlError, match=str(out)):
        run_tests(str(out), "torch", progress=False)


def test_a_garbled_row_is_a_store_error(clean, tmp_path):
    """SQLite pages carry no checksums: a flipped byte inside a row's JSON reads back as text that does not
    parse; that too is the store's damage, in one line."""
    out = _copy(clean, tmp_path)
    db = sqlite3.connect(out / "cases.sqlite")
    (sid, inputs) = db.execute("SELECT id, inputs FROM samples LIMIT 1").fetchone()
    json.loads(inputs)
    db.execute("UPDATE samples SET inputs=? WHERE id=?", (inputs[:-2], sid))
    db.commit()
    db.close()
    with pytest.raises(StoreCorrupt, match="is damaged"):
        run_tests(str(out), "torch", progress=False)

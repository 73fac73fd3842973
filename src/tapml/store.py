"""CaseStore: a directory of carved op cases — `cases.sqlite` (runs, cases, samples, blobs) + safetensors shards.

Crash safety: a shard is written to a temp file, fsynced and renamed before the transaction that points at it
commits, so every committed row can be read after a SIGKILL. Nothing outside this module knows the layout.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import safetensors
import torch

from tapml.errors import TapmlError
from tapml.ops import OpCall, Provenance, canonical_json, decode_args, decode_value, rebuild

FORMAT = "tapml-casestore"
VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs(
    id INTEGER PRIMARY KEY, model TEXT NOT NULL, description TEXT, options TEXT, torch TEXT,
    started REAL, finished REAL, status TEXT NOT NULL, calls INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS cases(
    id INTEGER PRIMARY KEY, signature TEXT UNIQUE NOT NULL, op TEXT NOT NULL, spec TEXT NOT NULL,
    metas TEXT NOT NULL, replayable INTEGER NOT NULL, reason TEXT, random INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS occurrences(
    case_id INTEGER NOT NULL, run_id INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY(case_id, run_id));
CREATE TABLE IF NOT EXISTS samples(
    id INTEGER PRIMARY KEY, case_id INTEGER NOT NULL, run_id INTEGER NOT NULL, module TEXT, phase TEXT,
    call_index INTEGER, inputs TEXT NOT NULL, outputs TEXT NOT NULL, rng TEXT);
CREATE TABLE IF NOT EXISTS blobs(
    hash TEXT PRIMARY KEY, shard TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    nbytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS samples_case ON samples(case_id);
"""

# safetensors cannot hold these dtypes; their bytes are stored as uint8 and viewed back on load.
_RAW_DTYPES = {torch.complex64, torch.complex128, torch.uint16, torch.uint32, torch.uint64}


@dataclass
class Case:
    """One deduplicated signature: op, argument spec, tensor metadata, how often it ran, its samples."""

    id: int
    signature: str
    op: str
    spec: Any
    metas: list[dict]
    count: int
    replayable: bool
    reason: str | None
    random: bool
    n_samples: int = 0
    first: dict = field(default_factory=dict)  # provenance of the first sample

    @property
    def kind(self) -> str:
        return self.op.rsplit(".", 1)[0]


@dataclass
class Sample:
    id: int
    case_id: int
    provenance: Provenance
    inputs: list  # [[hash, meta], ...]
    outputs: dict  # {"spec": json, "tensors": [[hash, meta], ...]}
    rng: str | None


@dataclass
class PendingSample:
    """A sample the Recorder has captured but not yet committed; blobs are referenced by hash."""

    signature: str
    op: str
    spec: Any
    metas: list[dict]
    replayable: bool
    reason: str | None
    random: bool
    provenance: Provenance
    inputs: list
    outputs: dict
    rng: str | None


class Batch:
    """One commit, prepared in the thread that records: blobs laid out for safetensors and every row encoded as
    one JSON array per table, which SQLite unpacks itself (json_each). The writer thread's `commit_batch` is
    then file and SQLite I/O that takes the GIL a handful of times, not once per row: on a busy interpreter each
    hand-over of the GIL costs the recording thread a thread switch.

    `cases`: [signature, op, spec JSON, metas JSON, replayable, reason, random] for each case the store may not
    hold yet; `counts`: [signature, calls since the last commit]; `samples`: [signature, module, phase,
    call index, inputs, outputs, rng hash].
    """

    def __init__(self, blobs: dict[str, torch.Tensor], cases: list[list], counts: list[list],
                 samples: list[list]):
        self.blobs = blobs
        self.n_counts, self.n_samples = len(counts), len(samples)
        # The specs point into the (contiguous) tensors' memory, flat; no torch op runs here, since a Recorder
        # builds batches while it records.
        self.specs: dict[str, Any] = {}
        rows = []
        for h, t in blobs.items():
            if not t.is_contiguous():
                raise ValueError(f"blob {h} is not contiguous")
            n, nbytes = t.numel(), t.numel() * t.element_size()
            dtype = str(t.dtype).removeprefix("torch.")
            rows.append([h, dtype, f"[{n}]", nbytes])
            raw = t.dtype in _RAW_DTYPES  # stored as bytes
            self.specs[h] = safetensors.TensorSpec(dtype="uint8" if raw else dtype, shape=[nbytes if raw else n],
                                                   data_ptr=t.data_ptr(), data_len=nbytes)
        self.blobs_json = json.dumps(rows)
        self.cases_json = json.dumps(cases) if cases else None
        self.counts_json = json.dumps(counts)
        self.samples_json = json.dumps(samples)

    @classmethod
    def encode(cls, blobs: dict[str, torch.Tensor], samples: list[PendingSample],
               counts: dict[str, tuple[str, Any, list, bool, str | None, bool, int]]) -> Batch:
        """From captured samples and `counts` (signature -> (op, spec, metas, replayable, reason, random, n))."""
        enc = canonical_json  # as the Recorder stores them (the halves of the signature's text)
        cases = {sig: [sig, op, enc(spec), enc(metas), replayable, reason, random]
                 for sig, (op, spec, metas, replayable, reason, random, _) in counts.items()}
        for x in samples:
            if x.signature not in cases:
                cases[x.signature] = [x.signature, x.op, enc(x.spec), enc(x.metas), x.replayable, x.reason,
                                      x.random]
        rows = [[x.signature, x.provenance.module, x.provenance.phase, x.provenance.index, x.inputs, x.outputs,
                 x.rng] for x in samples]
        return cls(blobs, list(cases.values()), [[sig, v[6]] for sig, v in counts.items()], rows)


def _fsync(path: Path) -> None:
    """fsync a file or (for a rename to be durable) a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CaseStore:
    """Verbs: `begin_run`, `commit`, `finish_run`, `discard_run`, `cases`, `samples`, `load_call`, `runs`, `stats`."""

    def __init__(self, path: Path, db: sqlite3.Connection):
        self.path = path
        self.db = db
        self._shards: OrderedDict[str, Any] = OrderedDict()

    # --- opening ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike) -> CaseStore:
        """Open the store at `path`, creating it (and the directory) when absent."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise TapmlError(f"{p} exists and is not a directory; choose another --out")
        if p.is_dir() and any(p.iterdir()) and not (p / "cases.sqlite").exists():
            raise TapmlError(f"{p} is a non-empty directory that is not a TapML case store; choose another --out")
        (p / "blobs").mkdir(parents=True, exist_ok=True)
        fresh = not (p / "cases.sqlite").exists()
        store = cls._connect(p)
        if fresh:
            # One transaction (one sync), not one per statement as executescript would run them.
            store.db.executescript(f"BEGIN;{_SCHEMA}INSERT INTO meta VALUES ('format', '{FORMAT}'),"
                                   f" ('version', '{VERSION}');COMMIT;")
        else:
            store._check()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> CaseStore:
        p = Path(path)
        if not p.exists():
            raise TapmlError(f"no case store at {p}: carve one first with `tapml carve MODEL --out {p}`")
        if not (p / "cases.sqlite").is_file():
            raise TapmlError(f"{p} is not a TapML case store (no cases.sqlite); point at a `tapml carve` --out dir")
        store = cls._connect(p)
        store._check()
        return store

    @classmethod
    def _connect(cls, p: Path) -> CaseStore:
        try:
            db = sqlite3.connect(p / "cases.sqlite", timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as e:
            raise TapmlError(f"{p}/cases.sqlite is corrupt or not a TapML store ({e})") from None
        return cls(p, db)

    def _check(self) -> None:
        try:
            rows = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise TapmlError(f"{self.path}/cases.sqlite is corrupt or not a TapML store ({e})") from None
        if rows.get("format") != FORMAT:
            raise TapmlError(f"{self.path} is not a TapML case store (foreign cases.sqlite)")
        if int(rows.get("version", 0)) > VERSION:
            raise TapmlError(f"{self.path} was written by a newer tapml (store version {rows['version']}); "
                             "upgrade tapml")

    def close(self) -> None:
        self._shards.clear()
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ---------------------------------------------------------------------------------------
    def begin_run(self, model: str, description: str, options: dict) -> int:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO runs(model, description, options, torch, started, status) VALUES (?,?,?,?,?,?)",
                (model, description, json.dumps(options), torch.__version__, time.time(), "running"))
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, calls: int) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET finished=?, status='complete', calls=? WHERE id=?",
                            (time.time(), calls, run_id))

    def known_blobs(self) -> set[str]:
        return {h for (h,) in self.db.execute("SELECT hash FROM blobs")}

    def sample_counts(self) -> dict[str, int]:
        """signature -> samples already held (the Recorder keeps at most K per signature across runs)."""
        rows = self.db.execute(
            "SELECT c.signature, COUNT(s.id) FROM cases c LEFT JOIN samples s ON s.case_id = c.id GROUP BY c.id")
        return dict(rows.fetchall())

    def commit(self, run_id: int, blobs: dict[str, torch.Tensor], samples: list[PendingSample],
               counts: dict[str, tuple[str, Any, list, bool, str | None, bool, int]], calls: int) -> None:
        """Write new blobs to one shard (durably), then commit rows for samples and occurrence counts.

        `counts` maps signature -> (op, spec, metas, replayable, reason, random, n) for calls seen since the
        last commit, so cases that ran but were not sampled are still counted. See `commit_batch`.
        """
        self.commit_batch(run_id, Batch.encode(blobs, samples, counts), calls)

    def commit_batch(self, run_id: int, batch: Batch, calls: int, verify: Callable[[], None] | None = None) -> None:
        """Write the batch's blobs to one shard (durably), then commit its rows in one transaction.

        Blobs are stored flat (their values; every reader lays them out from the sample's tensor meta).
        `verify`, when given, runs after the shard is written and before any row commits; if it raises, the
        shard is removed and nothing commits.
        """
        shard = self._write_shard(batch, verify) if batch.blobs else None
        x = self.db.execute
        with self.db:
            if shard is not None:
                x("INSERT OR IGNORE INTO blobs(hash, shard, dtype, shape, nbytes) SELECT json_extract(value, '$[0]'),"
                  " ?, json_extract(value, '$[1]'), json_extract(value, '$[2]'), json_extract(value, '$[3]')"
                  " FROM json_each(?)", (shard, batch.blobs_json))
            if batch.cases_json is not None:
                x("INSERT OR IGNORE INTO cases(signature, op, spec, metas, replayable, reason, random)"
                  " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),"
                  " json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),"
                  " json_extract(value, '$[6]') FROM json_each(?)", (batch.cases_json,))
            n = x("INSERT INTO occurrences(case_id, run_id, count) SELECT c.id, ?, json_extract(j.value, '$[1]')"
                  " FROM json_each(?) j JOIN cases c ON c.signature = json_extract(j.value, '$[0]') WHERE true"
                  " ON CONFLICT(case_id, run_id) DO UPDATE SET count = count + excluded.count",
                  (run_id, batch.counts_json)).rowcount
            m = x("INSERT INTO samples(case_id, run_id, module, phase, call_index, inputs, outputs, rng)"
                  " SELECT c.id, ?, json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),"
                  " json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]'),"
                  " json_extract(j.value, '$[6]') FROM json_each(?) j"
                  " JOIN cases c ON c.signature = json_extract(j.value, '$[0]') ORDER BY j.key",
                  (run_id, batch.samples_json)).rowcount
            if (n, m) != (batch.n_counts, batch.n_samples):  # rolls the transaction back
                raise TapmlError(f"{self.path}: cases vanished from the store while carving into it; carve again")
            x("UPDATE runs SET calls=? WHERE id=?", (calls, run_id))

    def _write_shard(self, batch: Batch, verify: Callable[[], None] | None = None) -> str:
        name = f"{uuid.uuid4().hex}.safetensors"
        final = self.path / "blobs" / name
        tmp = final.with_suffix(".tmp")
        try:
            # Straight from the tensors' memory, without the GIL (the Recorder passes views of live tensors,
            # several of which may share one storage: safetensors' save_file would refuse those).
            safetensors.serialize_file(batch.specs, str(tmp))
            if verify is not None:
                verify()
            _fsync(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)
        _fsync(final.parent)
        return name

    def discard_run(self, run_id: int) -> None:
        """Remove a failed run's rows; cases no other run saw go with it (their blobs become garbage)."""
        with self.db:
            self.db.execute("DELETE FROM samples WHERE run_id=?", (run_id,))
            self.db.execute("DELETE FROM occurrences WHERE run_id=?", (run_id,))
            self.db.execute("DELETE FROM cases WHERE id NOT IN (SELECT case_id FROM occurrences)")
            self.db.execute("DELETE FROM runs WHERE id=?", (run_id,))
            referenced: set[str] = set()
            for inputs, outputs, rng in self.db.execute("SELECT inputs, outputs, rng FROM samples"):
                referenced.update(h for h, _ in json.loads(inputs))
                referenced.update(h for h, _ in json.loads(outputs)["tensors"])
                if rng:
                    referenced.add(rng)
            dead = [(h,) for (h,) in self.db.execute("SELECT hash FROM blobs") if h not in referenced]
            self.db.executemany("DELETE FROM blobs WHERE hash=?", dead)

    @staticmethod
    def remove(path: str | os.PathLike) -> None:
        """Delete a store directory this process created (used when its first carve fails)."""
        shutil.rmtree(path, ignore_errors=True)

    # --- reading ---------------------------------------------------------------------------------------
    def cases(self, pattern: str | None = None) -> list[Case]:
        """All cases, optionally only those whose op contains `pattern` (like pytest's -k)."""
        rows = self.db.execute(
            "SELECT c.id, c.signature, c.op, c.spec, c.metas, c.replayable, c.reason, c.random,"
            " (SELECT SUM(count) FROM occurrences o WHERE o.case_id = c.id),"
            " (SELECT COUNT(*) FROM samples s WHERE s.case_id = c.id),"
            " (SELECT json_object('run', run_id, 'module', module, 'phase', phase, 'index', call_index)"
            "    FROM samples s WHERE s.case_id = c.id ORDER BY s.id LIMIT 1)"
            " FROM cases c ORDER BY c.id").fetchall()
        out = []
        for r in rows:
            case = Case(r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4]), r[8] or 0, bool(r[5]), r[6],
                        bool(r[7]), r[9], json.loads(r[10]) if r[10] else {})
            if pattern is None or _matches(pattern, case):
                out.append(case)
        return out

    def samples(self, case_id: int) -> list[Sample]:
        rows = self.db.execute(
            "SELECT id, case_id, run_id, module, phase, call_index, inputs, outputs, rng FROM samples "
            "WHERE case_id=? ORDER BY id", (case_id,)).fetchall()
        return [Sample(r[0], r[1], Provenance(r[2], r[3], r[4], r[5]), json.loads(r[6]), json.loads(r[7]), r[8])
                for r in rows]

    def blob(self, h: str) -> torch.Tensor:
        row = self.db.execute("SELECT shard, dtype, shape FROM blobs WHERE hash=?", (h,)).fetchone()
        if row is None:
            raise TapmlError(f"{self.path}: blob {h} is missing; the store is damaged — carve it again")
        shard, dtype, shape = row
        handle = self._shards.get(shard)
        if handle is None:
            try:
                handle = safetensors.safe_open(str(self.path / "blobs" / shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise TapmlError(f"{self.path}/blobs/{shard} is unreadable ({e}); carve the store again") from None
            self._shards[shard] = handle
            if len(self._shards) > 64:
                self._shards.popitem(last=False)
        t = handle.get_tensor(h)
        want = getattr(torch, dtype)
        if t.dtype != want:  # stored raw
            t = t.view(want).reshape(json.loads(shape))
        return t

    def _tensor(self, ref: list) -> torch.Tensor:
        h, meta = ref
        values = self.blob(h)
        if "storage" in meta:  # whole storage kept for as_strided-style ops
            return torch.as_strided(values.clone(), meta["shape"], meta["stride"], meta["offset"])
        return rebuild(values, meta)

    def load_call(self, case: Case, sample: Sample) -> OpCall:
        """Materialize a sample as an OpCall with real CPU tensors (fresh copies, safe to mutate)."""
        tensors = [self._tensor(ref) for ref in sample.inputs]
        args, kwargs = decode_args(case.spec, tensors)
        out_tensors = [self._tensor(ref) for ref in sample.outputs["tensors"]]
        outputs = decode_value(sample.outputs["spec"], out_tensors)
        rng = self.blob(sample.rng) if sample.rng else None
        return OpCall(case.op, args, kwargs, outputs, sample.provenance, rng)

    def iter_calls(self, pattern: str | None = None) -> Iterator[tuple[Case, Sample, OpCall]]:
        for case in self.cases(pattern):
            if not case.replayable:
                continue
            for s in self.samples(case.id):
                yield case, s, self.load_call(case, s)

    def runs(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT id, model, description, options, torch, started, finished, status, calls FROM runs "
            "ORDER BY id").fetchall()
        keys = ("id", "model", "description", "options", "torch", "started", "finished", "status", "calls")
        out = []
        for r in rows:
            d = dict(zip(keys, r))
            d["options"] = json.loads(d["options"] or "{}")
            if d["status"] == "running":
                d["status"] = "interrupted"  # a finished carve marks itself complete
            out.append(d)
        return out

    def stats(self) -> dict[str, Any]:
        q = self.db.execute
        cases = q("SELECT COUNT(*) FROM cases").fetchone()[0]
        samples = q("SELECT COUNT(*) FROM samples").fetchone()[0]
        calls = q("SELECT COALESCE(SUM(count), 0) FROM occurrences").fetchone()[0]
        kinds = q("SELECT COUNT(DISTINCT op) FROM cases").fetchone()[0]
        blob_bytes = q("SELECT COALESCE(SUM(nbytes), 0), COUNT(*) FROM blobs").fetchone()
        disk = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return {"cases": cases, "samples": samples, "calls": calls, "overloads": kinds,
                "blobs": blob_bytes[1], "blob_bytes": blob_bytes[0], "disk_bytes": disk,
                "runs": len(self.runs())}

    def op_table(self) -> list[dict[str, Any]]:
        """Per overload: cases, calls covered."""
        rows = self.db.execute(
            "SELECT c.op, COUNT(DISTINCT c.id), COALESCE(SUM(o.count), 0) FROM cases c "
            "LEFT JOIN occurrences o ON o.case_id = c.id GROUP BY c.op ORDER BY 3 DESC").fetchall()
        return [{"op": r[0], "cases": r[1], "calls": r[2]} for r in rows]


def _matches(pattern: str, case: Case) -> bool:
    """-k PATTERN: substring of the op (`mm`), or `not X`, or alternatives `a or b`."""
    pattern = pattern.strip()
    if " or " in pattern:
        return any(_matches(p, case) for p in pattern.split(" or "))
    if pattern.startswith("not "):
        return not _matches(pattern[4:], case)
    return pattern in case.op or pattern == case.signature

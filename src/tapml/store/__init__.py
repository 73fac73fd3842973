"""CaseStore: a directory of carved op cases — `cases.sqlite` (runs, cases, samples, blobs) + safetensors shards.

Crash safety: a shard is written to a temp file, fsynced and renamed before the transaction that points at it
commits, so every committed row can be read after a SIGKILL; `cases.sqlite` itself is built under a temp name and
renamed into place, so a half-made store never shows. One writer at a time: `create` takes a non-blocking flock
on `carve.lock` and refuses a second writer. A failed run takes back only its own rows and shards. Readers
(`open`) get a connection that cannot write (read-only media included). Every blob is checked against its content
hash when loaded. Nothing outside this module knows the layout; it must not delete what another carve wrote.
"""

from __future__ import annotations

import functools
import json
import os
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

from tapml.errors import StoreCorrupt, TapmlError
from tapml.ops import OpCall, Provenance, content_hash, decode_args, decode_value, op_kind, rebuild
from tapml.paths import check_path
from tapml.store import _files
from tapml.store._batch import Batch, CaseSpec, PendingSample
from tapml.store._files import FORMAT, VERSION
from tapml.store._recording import Recording

__all__ = ["FORMAT", "VERSION", "Batch", "Case", "CaseSpec", "CaseStore", "PendingSample", "Recording", "Sample",
           "StoreSummary", "summarize"]


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
        return op_kind(self.op)


@dataclass
class Sample:
    id: int
    case_id: int
    provenance: Provenance
    inputs: list  # [[hash, meta], ...]
    outputs: dict  # {"spec": json, "tensors": [[hash, meta], ...]}
    rng: str | None
    chosen: dict | None = None  # how the carve chose it (`tapml.diverse.describe`); None: in call order


def _sql(method: Callable) -> Callable:
    """A SQLite failure at any query (a garbled page, a lock timeout) becomes one line naming the store."""

    @functools.wraps(method)
    def guarded(self: CaseStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
            if isinstance(e, (sqlite3.ProgrammingError, sqlite3.IntegrityError)):
                raise  # our bug, not the file's
            raise self._db_error(e) from None

    return guarded


class CaseStore:
    """Verbs: `begin_run`, `commit`, `finish_run`, `discard_run`, `abandon`, `cases`, `samples`, `load_call`, `runs`,
    `stats`. `create` opens for writing (holding the store's lock until `close`), `open` for reading."""

    def __init__(self, path: Path, db: sqlite3.Connection, lock: int | None = None, created: bool = False,
                 made_dir: bool = False):
        self.path = path
        self.db = db
        self.created = created  # this handle made cases.sqlite (and `made_dir`: the directory too)
        self._lock, self._made_dir = lock, made_dir
        self._closed = False
        self._shards: OrderedDict[str, Any] = OrderedDict()
        self._verified: set[str] = set()  # blobs whose content hash was checked since opening
        self._written: dict[int, list[str]] = {}  # run -> shards this handle wrote for it
        self._columns: dict[tuple[str, str], bool] = {}

    # --- opening ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike) -> CaseStore:
        """Open the store at `path` for writing, creating it (and the directory) when absent. Takes the store's
        lock until `close`: a second writer is refused at once with a TapmlError, not queued."""
        p = Path(path)
        try:  # (a name too long, a folder that cannot be read: OSError from the first look)
            if p.exists() and not p.is_dir():
                raise TapmlError(f"{p} exists and is not a directory; choose another --out")
            if p.is_dir() and not (p / _files.DB).exists() and not _files.leftover(p):
                raise TapmlError(f"{p} is a non-empty directory that is not a TapML case store; choose another "
                                 "--out")
            made_dir = not p.exists()
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TapmlError(f"cannot create a case store at {p} ({e.strerror}); choose another --out") from None
        lock = _files.lock(p)
        store = None
        try:
            (p / "blobs").mkdir(exist_ok=True)
            if (p / _files.DB).exists():
                store = cls(p, cls._connect(p), lock, False, made_dir)
            if store is None or store._tableless():  # an older tapml's creation, killed before its schema
                if store is not None:
                    store.db.close()
                _files.create_db(p)
                store = cls(p, cls._connect(p), lock, True, made_dir)
            store._check()
            _files.upgrade(store.db)
            return store
        except BaseException:
            if store is not None:
                store.db.close()
            if made_dir:  # nothing but what this call made is in it
                _files.remove_files(p, lock, True)
            else:
                os.close(lock)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike) -> CaseStore:
        """Open the store at `path` for reading; nothing done through it writes to the store."""
        p = check_path(path, "STORE")
        try:
            if not p.exists():
                raise TapmlError(f"no case store at {p}: carve one first with `tapml carve MODEL --out {p}`")
            if not (p / _files.DB).is_file():
                if p.is_dir() and any(p.iterdir()) and _files.leftover(p):
                    raise TapmlError(f"{p} holds no complete case store (a carve into it was interrupted before it "
                                     f"made one, or is making one now); carve again with --out {p}")
                raise TapmlError(f"{p} is not a TapML case store (no {_files.DB}); point at a `tapml carve` --out dir")
        except OSError as e:
            raise TapmlError(f"cannot read a case store at {p} ({e.strerror})") from None
        try:
            db = _files.read_only(p)
        except sqlite3.OperationalError as e:  # cannot open (permissions, locks): says nothing about the file
            raise TapmlError(f"{p}/{_files.DB} cannot be read ({e})") from None
        except sqlite3.DatabaseError as e:
            raise TapmlError(f"{p}/{_files.DB} is corrupt or not a TapML store ({e})") from None
        store = cls(p, db)
        try:
            store._check()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _connect(cls, p: Path) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(p / _files.DB, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as e:
            raise TapmlError(f"{p}/{_files.DB} is corrupt or not a TapML store ({e})") from None
        return db

    def _tableless(self) -> bool:
        try:
            return self.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
        except sqlite3.DatabaseError:
            return False  # _check says what is wrong

    def _check(self) -> None:
        try:
            rows = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            if self._tableless():
                raise TapmlError(f"{self.path} holds no complete case store (its creation was interrupted); "
                                 f"carve again with --out {self.path}") from None
            raise TapmlError(f"{self.path}/{_files.DB} is corrupt or not a TapML store ({e})") from None
        if rows.get("format") != FORMAT:
            raise TapmlError(f"{self.path} is not a TapML case store (foreign {_files.DB})")
        if int(rows.get("version", 0)) > VERSION:
            raise TapmlError(f"{self.path} was written by a newer tapml (store version {rows['version']}); "
                             "upgrade tapml")

    def _db_error(self, e: Exception) -> TapmlError:
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        if isinstance(e, sqlite3.OperationalError) and e.sqlite_errorname not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            return TapmlError(f"{self.path}/{_files.DB}: {msg}")  # busy, locked, I/O: not a verdict on the file
        return StoreCorrupt(f"{self.path}/{_files.DB} is damaged ({msg}); carve the store again")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._shards.clear()
        self.db.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """A writer leaving with an exception takes back what it made (see `abandon`); otherwise close."""
        if self._closed:
            return
        if exc_type is not None and self._lock is not None:
            self.abandon(None)
        else:
            self.close()

    # --- writing ---------------------------------------------------------------------------------------
    @_sql
    def begin_run(self, model: str, description: str, options: dict) -> int:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO runs(model, description, options, torch, started, status) VALUES (?,?,?,?,?,?)",
                (model, description, json.dumps(options), torch.__version__, time.time(), "running"))
        return int(cur.lastrowid)

    @_sql
    def finish_run(self, run_id: int, calls: int) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET finished=?, status='complete', calls=? WHERE id=?",
                            (time.time(), calls, run_id))

    @_sql
    def known_blobs(self) -> set[str]:
        return {h for (h,) in self.db.execute("SELECT hash FROM blobs")}

    @_sql
    def sample_counts(self) -> dict[str, int]:
        """signature -> samples already held (the Recorder keeps at most K per signature across runs)."""
        rows = self.db.execute(
            "SELECT c.signature, COUNT(s.id) FROM cases c LEFT JOIN samples s ON s.case_id = c.id GROUP BY c.id")
        return dict(rows.fetchall())

    def record(self, model: str, description: str, options: dict) -> Recording:
        """Begin a run and return its Recording: the one way cases enter a store (see `Recording`)."""
        return Recording(self, self.begin_run(model, description, options))

    @_sql
    def commit_batch(self, run_id: int, batch: Batch, calls: int, verify: Callable[[], None] | None = None) -> None:
        """Write the batch's blobs to one shard (durably), then commit its rows in one transaction.

        Blobs are stored flat (their values; every reader lays them out from the sample's tensor meta).
        `verify`, when given, runs after the shard is written and before any row commits; if it raises, the
        shard is removed and nothing commits.
        """
        shard = self._write_shard(run_id, batch, verify) if batch.blobs else None
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
            m = x("INSERT INTO samples(case_id, run_id, module, phase, call_index, inputs, outputs, rng, chosen)"
                  " SELECT c.id, ?, json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),"
                  " json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]'),"
                  " json_extract(j.value, '$[6]'), json_extract(j.value, '$[7]') FROM json_each(?) j"
                  " JOIN cases c ON c.signature = json_extract(j.value, '$[0]') ORDER BY j.key",
                  (run_id, batch.samples_json)).rowcount
            if (n, m) != (batch.n_counts, batch.n_samples):  # rolls the transaction back
                raise TapmlError(f"{self.path}: cases vanished from the store while carving into it; carve again")
            x("UPDATE runs SET calls=? WHERE id=?", (calls, run_id))

    def _write_shard(self, run_id: int, batch: Batch, verify: Callable[[], None] | None = None) -> str:
        name = f"{uuid.uuid4().hex}.safetensors"
        final = self.path / "blobs" / name
        tmp = final.with_suffix(".tmp")
        try:
            # Straight from the tensors' memory, without the GIL (the Recorder passes views of live tensors,
            # several of which may share one storage: safetensors' save_file would refuse those).
            safetensors.serialize_file(batch.specs, str(tmp))
            if verify is not None:
                verify()
            _files.fsync(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)
        self._written.setdefault(run_id, []).append(name)  # before the rows: a failed commit still removes it
        _files.fsync(final.parent)
        return name

    @_sql
    def discard_run(self, run_id: int) -> None:
        """Remove a failed run's rows (cases no other run saw, and blobs no sample references, go with them) and
        the shards this handle wrote for it, once no row points into them."""
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
        for name in self._written.pop(run_id, []):
            if self.db.execute("SELECT 1 FROM blobs WHERE shard=? LIMIT 1", (name,)).fetchone() is None:
                (self.path / "blobs" / name).unlink(missing_ok=True)

    def abandon(self, run_id: int | None) -> None:
        """A failed carve's exit: discard its run (`run_id`; None when it never began) and close. A store this
        handle created goes too when it holds nothing else; nothing another carve wrote is ever removed."""
        try:
            if run_id is not None:
                self.discard_run(run_id)
            empty = self.created and not self.db.execute("SELECT EXISTS(SELECT 1 FROM runs) OR"
                                                         " EXISTS(SELECT 1 FROM blobs)").fetchone()[0]
        except Exception:  # the failure being handled matters more; an undiscarded run shows as interrupted
            empty = False
        if not empty:
            self.close()
            return
        self._closed = True
        self._shards.clear()
        self.db.close()
        lock, self._lock = self._lock, None
        _files.remove_files(self.path, lock, self._made_dir)

    # --- reading ---------------------------------------------------------------------------------------
    @_sql
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

    @_sql
    def samples(self, case_id: int) -> list[Sample]:
        chosen = "chosen" if self._has("samples", "chosen") else "NULL"
        rows = self.db.execute(
            f"SELECT id, case_id, run_id, module, phase, call_index, inputs, outputs, rng, {chosen} FROM samples "
            "WHERE case_id=? ORDER BY id", (case_id,)).fetchall()
        return [Sample(r[0], r[1], Provenance(r[2], r[3], r[4], r[5]), json.loads(r[6]), json.loads(r[7]), r[8],
                       json.loads(r[9]) if r[9] else None) for r in rows]

    @_sql
    def sample_choices(self) -> dict[int, list[dict[str, Any]]]:
        """Per case id, its samples in order: where each ran and how it was chosen (None: in call order)."""
        chosen = "chosen" if self._has("samples", "chosen") else "NULL"
        out: dict[int, list[dict[str, Any]]] = {}
        for case_id, run, index, phase, why in self.db.execute(
                f"SELECT case_id, run_id, call_index, phase, {chosen} FROM samples ORDER BY id"):
            out.setdefault(case_id, []).append({"run": run, "index": index, "phase": phase,
                                                "chosen": json.loads(why) if why else None})
        return out

    def _has(self, table: str, column: str) -> bool:
        """Whether the store has `column` (a store an older tapml wrote, opened for reading, may lack it)."""
        key = (table, column)
        if key not in self._columns:
            self._columns[key] = column in _files.columns(self.db, table)
        return self._columns[key]

    @_sql
    def blob(self, h: str) -> torch.Tensor:
        """A blob's values (flat), checked against its content hash the first time this handle loads it: damaged
        bytes raise StoreCorrupt instead of reaching a backend as wrong inputs or expected outputs."""
        row = self.db.execute("SELECT shard, dtype, shape FROM blobs WHERE hash=?", (h,)).fetchone()
        if row is None:
            raise StoreCorrupt(f"{self.path}: blob {h} is missing; the store is damaged — carve it again")
        shard, dtype, shape = row
        where = f"{self.path}/blobs/{shard}"
        try:
            handle = self._shards.get(shard)
            if handle is None:
                handle = safetensors.safe_open(where, framework="pt")
                self._shards[shard] = handle
                if len(self._shards) > 64:
                    self._shards.popitem(last=False)
            t = handle.get_tensor(h)
        except Exception as e:  # safetensors raises its own error types
            msg = (str(e).splitlines() or [type(e).__name__])[0]
            raise StoreCorrupt(f"{where} is unreadable ({msg}); the store is damaged — carve it again") from None
        want = getattr(torch, dtype)
        if t.dtype != want:  # stored raw
            t = t.view(want).reshape(json.loads(shape))
        if h not in self._verified:
            if content_hash(t) != h:
                raise StoreCorrupt(f"{where}: blob {h} does not match its content hash (the shard is damaged); "
                                   "carve the store again")
            self._verified.add(h)
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

    @_sql
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

    @_sql
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

    @_sql
    def op_table(self) -> list[dict[str, Any]]:
        """Per overload: cases, calls covered."""
        rows = self.db.execute(
            "SELECT c.op, COUNT(DISTINCT c.id), COALESCE(SUM(o.count), 0) FROM cases c "
            "LEFT JOIN occurrences o ON o.case_id = c.id GROUP BY c.op ORDER BY 3 DESC").fetchall()
        return [{"op": r[0], "cases": r[1], "calls": r[2]} for r in rows]


@dataclass
class StoreSummary:
    """What `tapml show` prints: totals, runs, per-overload counts, and every case when asked for."""

    path: str
    stats: dict[str, Any]
    runs: list[dict]
    ops: list[dict[str, Any]]
    cases: list[Case]
    choices: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # case id -> its samples' choice


def summarize(path: str | os.PathLike, cases: bool = False) -> StoreSummary:
    """Totals, runs and op kinds of the store at `path` (and its cases, with how each sample was chosen, when
    `cases`)."""
    with CaseStore.open(path) as st:
        return StoreSummary(str(path), st.stats(), st.runs(), st.op_table(), st.cases() if cases else [],
                            st.sample_choices() if cases else {})


def _matches(pattern: str, case: Case) -> bool:
    """-k PATTERN: substring of the op (`mm`), or `not X`, or alternatives `a or b`."""
    pattern = pattern.strip()
    if " or " in pattern:
        return any(_matches(p, case) for p in pattern.split(" or "))
    if pattern.startswith("not "):
        return not _matches(pattern[4:], case)
    return pattern in case.op or pattern == case.signature

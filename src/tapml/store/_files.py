"""The case store's files: layout names, the schema, atomic creation, the writer's lock, removal of a store its
own handle made, and the read-only connection. Private to `tapml.store`; nothing else may know these names."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import uuid
from pathlib import Path
from urllib.parse import quote

from tapml.errors import TapmlError

FORMAT = "tapml-casestore"
VERSION = 1
DB = "cases.sqlite"
LOCK = "carve.lock"  # flock'ed by the one writer; stays in the store

SCHEMA = """
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
    call_index INTEGER, inputs TEXT NOT NULL, outputs TEXT NOT NULL, rng TEXT, chosen TEXT);
CREATE TABLE IF NOT EXISTS blobs(
    hash TEXT PRIMARY KEY, shard TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    nbytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS samples_case ON samples(case_id);
"""


# Columns added since version 1, each added to an older store by its next writer (`upgrade`); readers of an
# older store do without them. (table, column, type)
ADDED = (("samples", "chosen", "TEXT"),)


def upgrade(db: sqlite3.Connection) -> None:
    """Add the columns of ADDED that an older store lacks (its writer holds the lock); readers of older tapml
    name their columns, so the store stays readable to them."""
    for table, column, kind in ADDED:
        if column not in columns(db, table):
            with db:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def fsync(path: Path) -> None:
    """fsync a file or (for a rename to be durable) a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def side_file(name: str) -> bool:
    """SQLite's -wal/-shm of cases.sqlite, or a temp database of a creation (and its side files)."""
    return name in (f"{DB}-wal", f"{DB}-shm") or (name.startswith(f"{DB}.") and ".tmp" in name)


def leftover(p: Path) -> bool:
    """`p` holds at most what an unfinished creation (or the removal of a failed carve's store) leaves: the lock
    file, side files, a blobs/ folder of shards and temp shards. No complete store."""
    return all(e.name == LOCK or side_file(e.name) or (e.name == "blobs" and e.is_dir() and all(
        f.suffix in (".safetensors", ".tmp") for f in e.iterdir())) for e in p.iterdir())


def lock(p: Path) -> int:
    """Take the store's writer lock without waiting; its file descriptor (closing it releases the lock)."""
    path = p / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise TapmlError(f"cannot write to {p} ({e.strerror}); choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TapmlError(f"{p} is being written by another carve (it holds {path}); wait for it to finish "
                             "or choose another --out") from None
        except OSError as e:
            os.close(fd)
            raise TapmlError(f"cannot lock {path} ({e.strerror}); choose another --out") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)  # a failed carve removed the file after we opened it: lock the one there now


def create_db(p: Path) -> None:
    """Build cases.sqlite (schema, meta rows, WAL mode) under a temp name and rename it into place: a SIGKILL at
    any point leaves either no cases.sqlite or a complete one. Called with the lock held."""
    for f in p.iterdir():  # dead writers' files: an earlier creation's temp database, a removed store's -wal/-shm
        if side_file(f.name):
            f.unlink(missing_ok=True)  # (a stale -wal would be replayed into the new database)
    tmp = p / f"{DB}.{uuid.uuid4().hex}.tmp"
    try:
        db = sqlite3.connect(tmp)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # kept in the file's header
            db.executescript(f"BEGIN;{SCHEMA}INSERT INTO meta VALUES ('format', '{FORMAT}'),"
                             f" ('version', '{VERSION}');COMMIT;")
        finally:
            db.close()  # the only connection: checkpoints and removes the temp -wal
        fsync(tmp)
        os.replace(tmp, p / DB)
        fsync(p)
    except (OSError, sqlite3.Error) as e:
        raise TapmlError(f"cannot create a case store in {p} ({e}); choose another --out") from None
    finally:
        for side in ("", "-journal", "-wal", "-shm"):
            Path(f"{tmp}{side}").unlink(missing_ok=True)


def remove_files(p: Path, lock: int, made_dir: bool) -> None:
    """Remove a store that its own handle created and that holds nothing else: cases.sqlite first (the store is
    gone at once; a SIGKILL later leaves only leftovers a new carve accepts), SQLite's side files, the empty
    blobs/, the lock file (then the lock), and the directory when that handle made it and it is empty."""
    for name in (DB, f"{DB}-wal", f"{DB}-shm"):
        (p / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (p / "blobs").rmdir()
    (p / LOCK).unlink(missing_ok=True)
    os.close(lock)
    if made_dir:
        with contextlib.suppress(OSError):
            p.rmdir()


def read_only(p: Path) -> sqlite3.Connection:
    """A connection that cannot write. `mode=ro` keeps SQLite's locking, so a store can be read while a carve
    appends to it (SQLite may leave its empty -wal/-shm coordination files); where the directory cannot be written
    (read-only media, another user's store) SQLite cannot make the -shm file WAL readers need, and the database is
    opened `immutable` instead: the reader takes no part in locking there, so it must not overlap a carve into the
    store (one by a user who can write there would be read half-done)."""
    uri = "file:" + quote(str((p / DB).absolute()))
    db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=30, check_same_thread=False)
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.DatabaseError as e:
        db.close()
        if not isinstance(e, sqlite3.OperationalError) or os.access(p, os.W_OK):
            raise
    wal = p / f"{DB}-wal"
    if wal.exists() and wal.stat().st_size > 0:  # committed rows an immutable open would not see
        raise TapmlError(f"{p} is read-only and its last commits are still in {wal.name}, which SQLite cannot "
                         "read there without its -shm file: copy the store somewhere writable and open it once")
    return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, check_same_thread=False)



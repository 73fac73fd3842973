"""`Recording`: one run being written into a store — the only way cases enter one. Batches go to a writer thread
(shard, then one SQLite transaction), so storage I/O overlaps the run that produces them; leaving the recording
marks the run complete, or, on an exception, takes back exactly what it wrote. It must not capture tensors.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from typing import TYPE_CHECKING, Self

import torch

from tapml.errors import TapmlError
from tapml.ops import content_hash
from tapml.store._batch import Batch, CaseSpec, PendingSample

if TYPE_CHECKING:
    from tapml.store import CaseStore


class Recording:
    """A run of `store` (`run_id`) being written. Use as a context manager (`CaseStore.record`):

        with store.record(model, description, options) as rec:
            rec.submit(batch)            # or rec.put(blobs, samples, cases)
            rec.calls = n                # the run's op calls, stored when it completes

    Batches commit in order on a writer thread and are numbered; `done` is the last one finished (written or
    failed), `wait(n)` blocks until batch `n` is. A writer failure is raised in the recording thread at the next
    `submit` or at the end. On normal exit the run is marked complete; on an exception it is discarded with the
    shards it wrote, and the store itself goes when its handle created it and it holds nothing else.
    """

    def __init__(self, store: CaseStore, run_id: int):
        self.store, self.run_id = store, run_id
        self.calls = 0
        self.error: BaseException | None = None
        self.seq = 0
        self.done = 0
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="tapml-store-writer", daemon=True)
        self._thread.start()

    # --- the recording thread -----------------------------------------------------------------------------
    def submit(self, batch: Batch, refs: set[str] = frozenset(), calls: int | None = None) -> int:
        """Queue a batch (`refs`: hashes of its blobs that are views of live tensors, re-hashed after they are
        written; `calls`: the run's op calls so far); returns its number. Blocks only when two batches are
        already queued."""
        self._check()
        if calls is not None:
            self.calls = calls
        self.seq += 1
        self._queue.put((self.seq, batch, refs, self.calls))
        return self.seq

    def put(self, blobs: dict[str, torch.Tensor], samples: list[PendingSample], cases: dict[str, CaseSpec]) -> int:
        """Commit captured samples and per-signature counts that need no bookkeeping of what the store holds."""
        return self.submit(Batch.of(blobs, samples, cases))

    def wait(self, seq: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.done >= seq or not self._thread.is_alive())

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _close_writer(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def finish(self) -> None:
        """Wait until everything handed over is durable, then mark the run complete."""
        self._close_writer()
        self._check()
        self.store.finish_run(self.run_id, self.calls)

    def discard(self) -> None:
        """Stop the writer and take the run back (see `CaseStore.abandon`); closes the store."""
        with contextlib.suppress(BaseException):  # the run is being discarded anyway
            self._close_writer()
        self.store.abandon(self.run_id)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            try:
                self.finish()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()

    # --- the writer thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            seq, batch, refs, calls = item
            if self.error is None:
                try:
                    self.store.commit_batch(self.run_id, batch, calls,
                                            verify=functools.partial(_verify, batch.blobs, refs) if refs else None)
                except BaseException as e:  # surfaced in the recording thread
                    self.error = e
            del item, batch, refs  # drop the references before saying the batch is done
            with self._cond:
                self.done = seq
                self._cond.notify_all()


def _verify(blobs: dict[str, torch.Tensor], refs: set[str]) -> None:
    """After a shard is written: the blobs written from live tensors still hold what was recorded."""
    changed = [h for h in refs if content_hash(blobs[h]) != h]
    if changed:
        raise TapmlError(f"{len(changed)} recorded tensor(s) were overwritten during the carve by a write that no "
                         "PyTorch operator made (through .numpy() or a C extension, say); the recording would be "
                         "wrong: carve again without writing into tensors outside PyTorch ops")

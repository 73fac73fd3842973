"""Carving: run a real model under the Recorder (a TorchDispatchMode) and write every ATen call to a CaseStore.

It decides what a case keeps (inputs before mutation, outputs, provenance, RNG state) and when to sample, and
bounds the run (`timeout`); the on-disk layout, the store's lock and what a failed run takes back belong to
`store.py`, and model construction to `tapml.zoo` / `load_workload`. It must not touch store files itself.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tapml.errors import TapmlError
from tapml.ops import (
    Unserializable,
    compact,
    content_hash,
    encode_args,
    encode_value,
    is_seeded_random,
    mutated_args,
    op_name,
    signature_parts,
    tensor_meta,
    written_args,
)
from tapml.store import Batch, CaseStore

# Ops that may read storage outside their input view: the whole storage is kept for them.
_WHOLE_STORAGE = {"aten.as_strided.default", "aten.as_strided_.default", "aten.as_strided_scatter.default"}
# Flush a batch to disk after this many samples or bytes (bounds memory and what a crash can lose).
_FLUSH_SAMPLES = 512
_FLUSH_BYTES = 64 << 20
# Tensors at least this large are kept by reference until written (copying them costs more than watching them);
# smaller ones are copied. The writer re-hashes referenced blobs without the GIL (xxhash releases it above ~100 KiB).
_REF_BYTES = 128 << 10


@dataclass
class Workload:
    """A model and the job to run on it (what the zoo's ModelSpec.prepare and user files produce)."""

    model: torch.nn.Module
    run: Callable[[], Any]
    generates: bool
    description: str


def load_workload(model: str, prompt: str | None = None, max_new_tokens: int = 8) -> tuple[str, Any]:
    """Resolve MODEL: a zoo name (`llama`, `zoo:llama`) or `path/to/file.py:make_model`.

    Returns (canonical name, workload). `make_model()` must return `(model, inputs)`; the run is
    `model(*inputs)` under torch.no_grad().
    """
    if ".py:" in model or model.endswith(".py"):
        return model, _load_user_model(model)
    from tapml import zoo

    spec = zoo.get(model)
    try:
        return spec.name, spec.prepare(prompt=prompt, max_new_tokens=max_new_tokens)
    except TapmlError:
        raise
    except Exception as e:
        raise TapmlError(f"zoo model {spec.name} failed to build: {type(e).__name__}: {e}") from None


def _load_user_model(ref: str) -> Workload:
    path_s, _, fn_name = ref.rpartition(":") if ".py:" in ref else (ref, ":", "")
    path = Path(path_s)
    if not fn_name:
        raise TapmlError(f"{ref}: name the factory function, e.g. {ref}:make_model")
    if not path.is_file():
        raise TapmlError(f"{path}: no such model file; expected path/to/file.py:make_model")
    mod_name = f"tapml_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise TapmlError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise TapmlError(f"{path}: importing it raised {type(e).__name__}: {e}") from None
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise TapmlError(f"{path} has no function {fn_name}(); it must return (model, inputs)")
    try:
        made = factory()
    except Exception as e:
        raise TapmlError(f"{ref}() raised {type(e).__name__}: {e}") from None
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise TapmlError(f"{ref}() must return (model: torch.nn.Module, inputs: tuple); got {type(made).__name__}")
    model, inputs = made
    inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    model.eval()
    return Workload(model, lambda: model(*inputs), False, f"{fn_name}() from {path.name}: model(*inputs)")


class Recorder(TorchDispatchMode):
    """Records every ATen call of a run; keeps up to `samples` samples per signature, counts all calls."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Recording never runs under torch.compile; the dynamo-disabling wrapper would cost ~5 µs per call.
        return False

    def __init__(self, store: CaseStore, run_id: int, samples: int = 1, params: list[torch.Tensor] = (),
                 naive_bytes: bool = False, flush_samples: int = _FLUSH_SAMPLES, native: bool | None = None):
        super().__init__()
        # The C++ hook when available (TAPML_CARVE_NATIVE=0 forces the Python dispatch mode, =1 requires the
        # hook); the naive-bytes measurement needs every call's tensors, so it always takes the Python mode.
        self._native = None if naive_bytes else _native_hook(native)
        self._slots: dict[int, list] = {}  # native key slot -> entry
        self.store, self.run_id, self.k = store, run_id, samples
        self.calls = 0
        # Bytes a naive recorder (every call's inputs and outputs saved) would write; measured only on request.
        self.naive_bytes = 0 if naive_bytes else None
        self.flush_samples = flush_samples
        self.module = "<none>"
        self.phase = "forward"
        self._sampled = store.sample_counts()
        self._known = store.known_blobs()
        self._pending_blobs: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        # Recorded tensors are kept by reference, not copied, until the writer has them on disk. Their storages
        # (by data pointer) are watched: before an op writes into one, `_on_write` copies what is still pending
        # and waits for the writer to finish batches that reference it. The writer re-hashes the referenced
        # blobs after writing, so a write no op announced (through .numpy(), say) fails loudly, never silently.
        self._refs: dict[int, list[str]] = {}  # storage ptr -> hashes of pending blobs that are views of it
        self._inflight: dict[int, int] = {}  # storage ptr -> the last submitted batch referencing it
        self._watched: set[int] = set()
        self._pending_samples: list[list] = []  # sample rows, as Batch takes them
        self._stored = set(self._sampled)  # signatures the store holds (at the start, and committed since)
        self._counts: dict[str, list] = {}  # signature -> entry (see _entry)
        self._by_key: dict[tuple, list] = {}  # fast call key -> the same entry
        # Hash cache for parameters/buffers only: their storage outlives the run, so a pointer can't be reused.
        # Keyed by the recorded memory span, so a weight and its transposed view are hashed once.
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params} - {0}
        self._param_hash: dict[tuple, str] = {}
        self._writer = _Writer(store, run_id)

    # --- the dispatch hook ------------------------------------------------------------------------------
    def __enter__(self):
        out = super().__enter__()
        if self._native is not None:
            self._native.enable(self._native_before, self._native_after, self._on_write)
        for ptr in self._param_ptrs:  # the hash cache has no version in its key: it must hear of every write
            self._watch(ptr)
        return out

    def __exit__(self, *exc):
        if self._native is not None:
            self._native.disable()
            self._sync()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._native is not None:  # only for tensors that carry the Python key; the native hook records
            return func(*args, **kwargs)
        if self._watched and func._schema.is_mutable:
            self._guard_writes(func, args, kwargs)
        index = self.calls
        self.calls += 1
        # Fast path: a hashable key of the call's shapes/dtypes/strides/scalars finds its entry without
        # building the JSON signature; that is computed once per new key.
        try:
            key = (func, _key(args), _key((kwargs,)) if kwargs else None)
            entry = self._by_key.get(key)
        except TypeError:  # an unhashable argument: take the slow path every time
            key, entry = None, None
        tensors = None
        if entry is None:
            entry, tensors = self._entry(func, args, kwargs)
            if key is not None:
                self._by_key[key] = entry
        entry[6] += 1
        sig = entry[7]
        if not entry[3] or self._sampled.get(sig, 0) >= self.k:
            out = func(*args, **kwargs)
            if self.naive_bytes is not None:
                self.naive_bytes += _nbytes(pytree.tree_leaves((args, kwargs))) + _nbytes(pytree.tree_leaves(out))
            return out
        pending = self._begin(entry, func, args, kwargs, index, tensors)
        out = func(*args, **kwargs)
        self._finish(pending, out)
        return out

    # The native hook (tapml/_native/carve_hook.cpp) counts every call in C++ and calls these two only for a
    # call key it has not seen or one whose signature may still need a sample; it runs the op in between.
    def _native_before(self, func, args, kwargs, index, slot, is_new):
        tensors = None
        if slot < 0:  # a call the native key does not cover: resolved every time, counted here
            entry, tensors = self._entry(func, args, kwargs)
            entry[6] += 1
        elif is_new:
            entry, tensors = self._entry(func, args, kwargs)
            self._slots[slot] = entry
        else:
            entry = self._slots[slot]
        if not entry[3] or self._sampled.get(entry[7], 0) >= self.k:
            return None  # never sampled again: the native side only counts this key from now on
        return self._begin(entry, func, args, kwargs, index, tensors)

    def _native_after(self, pending, out) -> bool:
        entry = pending[0]
        self._finish(pending, out)
        return self._sampled.get(entry[7], 0) >= self.k

    def _guard_writes(self, func, args: tuple, kwargs: dict) -> None:
        """Python mode: what the native hook does before a writing op (see `_on_write`)."""
        for i, name in written_args(func):
            v = args[i] if i < len(args) else kwargs.get(name)
            for t in v if isinstance(v, (list, tuple)) else (v,):
                if isinstance(t, torch.Tensor):
                    ptr = t.untyped_storage().data_ptr()
                    if ptr in self._watched:
                        self._on_write(ptr)

    def _watch(self, ptr: int) -> None:
        if ptr not in self._watched:
            self._watched.add(ptr)
            if self._native is not None:
                self._native.watch(ptr)

    def _on_write(self, ptr: int) -> None:
        """An op is about to write into storage `ptr`: secure every recorded blob that is a view of it."""
        self._watched.discard(ptr)  # the native side has already dropped it
        for h in self._refs.pop(ptr, ()):
            v = self._pending_blobs.get(h)
            if v is not None and v.untyped_storage().data_ptr() == ptr:
                self._pending_blobs[h] = v.clone()
        seq = self._inflight.pop(ptr, None)
        if seq is not None:
            self._writer.wait(seq)
        if ptr in self._param_ptrs:
            self._param_hash = {k: h for k, h in self._param_hash.items() if k[0] != ptr}
            self._watch(ptr)

    def _sync(self) -> None:
        """Fold the native side's call counts into the entries and `calls`."""
        if self._native is None:
            return
        for slot, n in self._native.take_counts():
            self._slots[slot][6] += n
        self.calls = self._native.calls()

    def _begin(self, entry, func, args, kwargs, index, tensors=None) -> tuple:
        """Before running a sampled call: RNG state and, for mutating ops, the inputs."""
        if tensors is None:
            _, tensors = encode_args(args, kwargs)
        whole = entry[0] in _WHOLE_STORAGE
        rng = None
        if entry[5]:
            gen = kwargs.get("generator")
            state = gen.get_state() if isinstance(gen, torch.Generator) else torch.get_rng_state()
            rng = self._put(state.clone())
        # A mutating op's inputs are copied now: it is about to overwrite them.
        inputs = ([self._capture(t, whole, m, copy=True) for t, m in zip(tensors, entry[2])]
                  if mutated_args(func) else None)
        return entry, tensors, whole, rng, inputs, index

    def _finish(self, pending, out) -> None:
        entry, tensors, whole, rng, inputs, index = pending
        sig = entry[7]
        if inputs is None:
            inputs = [self._capture(t, whole, m) for t, m in zip(tensors, entry[2])]
        out_tensors: list[torch.Tensor] = []
        out_spec = encode_value(out, out_tensors) if not isinstance(out, torch.Tensor) else {"T": 0}
        if isinstance(out, torch.Tensor):
            out_tensors = [out]
        outputs = {"spec": out_spec, "tensors": [self._capture(t, False, tensor_meta(t)) for t in out_tensors]}
        if self.naive_bytes is not None:
            self.naive_bytes += _nbytes(tensors) + _nbytes(out_tensors)
        self._sampled[sig] = self._sampled.get(sig, 0) + 1
        self._pending_samples.append([sig, self.module, self.phase, index, inputs, outputs, rng])
        if len(self._pending_samples) >= self.flush_samples or self._pending_bytes >= _FLUSH_BYTES:
            self.flush()

    def _entry(self, func, args: tuple, kwargs: dict) -> tuple[list, list]:
        """[op, spec, metas, replayable, reason, random, calls since last commit, signature, spec JSON, metas JSON]
        for this call, and its tensor arguments."""
        name = op_name(func)
        try:
            spec, tensors = encode_args(args, kwargs)
            replayable, reason = True, None
        except Unserializable as e:
            spec = {"args": [repr(a) for a in args], "kwargs": {k: repr(v) for k, v in kwargs.items()}}
            tensors, replayable, reason = [], False, str(e)
        metas = [tensor_meta(t) for t in tensors]
        sig, spec_json, metas_json = signature_parts(name, spec, metas)
        entry = self._counts.get(sig)
        if entry is None:
            entry = self._counts[sig] = [name, spec, metas, replayable, reason,
                                         is_seeded_random(func, args, kwargs), 0, sig, spec_json, metas_json]
        return entry, tensors

    def _capture(self, t: torch.Tensor, whole: bool, meta: dict, copy: bool = False) -> list:
        """[hash, meta] of `t` (`meta`: its tensor_meta); its values join the pending blobs (by reference unless
        `copy`) when new. (Runs for every tensor of every sample: kept lean.)"""
        ptr = t.untyped_storage().data_ptr()
        if whole:
            n = t.untyped_storage().nbytes() // t.element_size()
            meta = {**meta, "stride": list(t.stride()), "offset": t.storage_offset(), "storage": n}
            values, shared = torch.as_strided(t.detach(), (n,), (1,), 0), True
        elif t.is_contiguous():
            values, shared = t.detach(), True
        else:
            values, span = compact(t)
            if span:
                meta = {**meta, "span": True}
            shared = values.untyped_storage().data_ptr() == ptr
        if ptr == 0 or (shared and copy):
            values, shared = values.clone(), False
        key = None
        if shared and ptr in self._param_ptrs:
            # A parameter span is hashed once: weights used by every step cost nothing. (No version in the key:
            # a view made by a view op has its own counter until autograd's layer, above this one, ties it to the
            # base's. Writes into parameters come through `_on_write`, which drops their entries.)
            key = (ptr, values.storage_offset(), values.numel(), values.dtype)
            h = self._param_hash.get(key)
            if h is not None:
                return [h, meta]
        h = content_hash(values)
        if h not in self._known and h not in self._pending_blobs:
            nbytes = values.numel() * values.element_size()
            if shared:
                if nbytes < _REF_BYTES:
                    values = values.clone()
                else:
                    self._refs.setdefault(ptr, []).append(h)
                    self._watch(ptr)
            self._pending_blobs[h] = values
            self._pending_bytes += nbytes
        if key is not None:
            self._param_hash[key] = h
        return [h, meta]

    def _put(self, values: torch.Tensor) -> str:
        """Content-address a private copy and keep it when new (the RNG state)."""
        h = content_hash(values)
        if h not in self._known and h not in self._pending_blobs:
            self._pending_blobs[h] = values
            self._pending_bytes += values.numel() * values.element_size()
        return h

    def flush(self) -> None:
        """Hand the pending batch to the writer thread (blocks only when two batches are already queued)."""
        self._sync()
        counts = [[sig, v[6]] for sig, v in self._counts.items() if v[6]]
        if not (self._pending_samples or counts):
            return
        cases = {}
        for sig in [sig for sig, _ in counts] + [row[0] for row in self._pending_samples]:
            if sig not in self._stored and sig not in cases:
                v = self._counts[sig]
                cases[sig] = [sig, v[0], v[8], v[9], v[3], v[4], v[5]]
        batch = Batch(self._pending_blobs, list(cases.values()), counts, self._pending_samples)
        refs = {h for hs in self._refs.values() for h in hs}
        seq = self._writer.submit(batch, refs, self.calls)
        self._stored.update(cases)
        self._known.update(self._pending_blobs)
        self._pending_blobs, self._pending_samples, self._pending_bytes = {}, [], 0
        for v in self._counts.values():
            v[6] = 0
        for ptr in self._refs:
            self._inflight[ptr] = seq
        self._refs = {}
        done = self._writer.done
        for ptr in [p for p, n in self._inflight.items() if n <= done]:  # on disk: no longer at risk
            del self._inflight[ptr]
            if ptr not in self._param_ptrs:
                self._watched.discard(ptr)
                if self._native is not None:
                    self._native.unwatch(ptr)

    def close(self) -> None:
        """Wait until everything handed over is durable; re-raise a writer failure."""
        self._writer.close()


class _Writer:
    """Writes batches (shard + SQLite commit) on a thread so storage I/O overlaps the model run.

    Batches commit in order and are numbered; `done` is the last one finished (written or failed) and `wait`
    blocks until a given one is. A failure is re-raised in the recording thread at the next submit or close.
    """

    def __init__(self, store: CaseStore, run_id: int):
        self.store, self.run_id = store, run_id
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.seq = 0
        self.done = 0
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="tapml-store-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
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
            with self.cond:
                self.done = seq
                self.cond.notify_all()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, batch: Batch, refs: set, calls: int) -> int:
        """Queue a batch (`refs`: the hashes of its blobs that are views of live tensors); returns its number."""
        self._check()
        self.seq += 1
        self.queue.put((self.seq, batch, refs, calls))
        return self.seq

    def wait(self, seq: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.done >= seq or not self.thread.is_alive())

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self._check()


def _verify(blobs: dict[str, torch.Tensor], refs: set[str]) -> None:
    """After a shard is written: the blobs written from live tensors still hold what was recorded."""
    changed = [h for h in refs if content_hash(blobs[h]) != h]
    if changed:
        raise TapmlError(f"{len(changed)} recorded tensor(s) were overwritten during the carve by a write that no "
                         "PyTorch operator made (through .numpy() or a C extension, say); the recording would be "
                         "wrong: carve again without writing into tensors outside PyTorch ops")


_Tensor = torch.Tensor
_warned = False


def _native_hook(native: bool | None):
    """The native carving hook module, or None for the Python dispatch mode (warned once when unavailable)."""
    global _warned
    if native is None:
        native = _env_native()
    if native is False:
        return None
    from tapml import _native

    try:
        return _native.carve_hook()
    except RuntimeError as e:
        if native:
            raise TapmlError(f"TAPML_CARVE_NATIVE=1 but the native carving hook is unavailable: {e}") from None
        if not _warned:
            _warned = True
            print(f"tapml: native carving hook unavailable ({e}); using the slower Python dispatch mode",
                  file=sys.stderr)
        return None


def _env_native() -> bool | None:
    """TAPML_CARVE_NATIVE: 1/true requires the native hook, 0/false the Python mode, auto (or unset) either."""
    raw = os.environ.get("TAPML_CARVE_NATIVE", "")
    choice = {"0": False, "false": False, "1": True, "true": True, "auto": None, "": None}
    if raw.strip().lower() not in choice:
        raise TapmlError(f"TAPML_CARVE_NATIVE must be 0, 1, true, false or auto (or unset); got {raw!r}")
    return choice[raw.strip().lower()]


def _env_flush() -> int:
    """TAPML_CARVE_FLUSH: samples per commit (tests lower it); a positive integer, the default when unset."""
    raw = os.environ.get("TAPML_CARVE_FLUSH", "")
    if not raw.strip():
        return _FLUSH_SAMPLES
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise TapmlError(f"TAPML_CARVE_FLUSH must be a positive integer (samples per commit); got {raw!r}")
    return n


def _key(args, _T=_Tensor) -> tuple:
    """A hashable key at least as fine as the JSON signature (types of scalars kept: 1, 1.0 and True differ).

    Raises TypeError for arguments it does not know; those calls take the full signature path.
    """
    out = []
    add = out.append
    for x in args:
        if isinstance(x, _T):
            off = x.storage_offset()
            add((x.shape, x.dtype, x.stride(), off) if off or not x.is_contiguous() else (x.shape, x.dtype))
            continue
        t = type(x)
        if t is int or t is str or x is None:
            add(x)
        elif t is float or t is bool:
            add((t, x))
        elif t is list or t is tuple:
            add((t, _key(x)))
        elif t is dict:
            add(tuple((k, _key((v,))) for k, v in x.items()))
        elif isinstance(x, (torch.dtype, torch.layout, torch.memory_format, torch.device)):
            add(x)
        else:
            raise TypeError
    return tuple(out)


def _nbytes(xs: list) -> int:
    return sum(t.numel() * t.element_size() for t in xs if isinstance(t, torch.Tensor))


@dataclass
class CarveResult:
    store: str
    run_id: int
    model: str
    description: str
    calls: int
    cases: int  # distinct signatures seen in this run
    new_cases: int
    samples: int
    seconds: float
    stats: dict
    naive_bytes: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def carve(model: str, out: str | Path, *, prompt: str | None = None, max_new_tokens: int = 8,
          samples: int = 1, progress: bool = True, workload: Workload | None = None,
          naive_bytes: bool = False, timeout: float | None = None) -> CarveResult:
    """Carve MODEL into the store at `out`; a carve into a store another carve is writing is refused.

    `timeout`: seconds the model run may take. It is a SIGALRM, so a carve with one must run in the main thread,
    and it stops the run at its next Python step (one long op in C++ finishes first). On any failure, the time
    limit included, the run is discarded and the store is left as it was before the call (one the call created
    is removed).
    """
    if samples < 1:
        raise TapmlError(f"--samples must be ≥ 1 (got {samples})")
    if max_new_tokens < 1:
        raise TapmlError(f"--max-new-tokens must be ≥ 1 (got {max_new_tokens})")
    _check_timeout(timeout)
    flush, native = _env_flush(), _env_native()  # bad values fail before anything is written
    if workload is None:
        name, workload = load_workload(model, prompt, max_new_tokens)
    else:
        name = model
    out = Path(out)
    store = CaseStore.create(out)
    run_id = rec = None
    limit = _TimeLimit(timeout)
    try:
        before = {c.signature for c in store.cases()}
        options = {"prompt": prompt, "max_new_tokens": max_new_tokens, "samples": samples}
        run_id = store.begin_run(name, workload.description, options)
        params = list(workload.model.parameters()) + list(workload.model.buffers())
        rec = Recorder(store, run_id, samples, params, naive_bytes=naive_bytes, flush_samples=flush, native=native)
        start = time.perf_counter()
        with ExitStack() as stack:
            steps = max_new_tokens if workload.generates else None
            bar = stack.enter_context(_progress(progress, name, steps))
            attach_provenance(stack, workload, rec, bar)
            stack.enter_context(_frozen_heap())
            stack.enter_context(torch.no_grad())
            stack.enter_context(rec)
            with limit:  # innermost: the limit covers the model run, not the final commit
                workload.run()
        rec.flush()
        rec.close()
        store.finish_run(run_id, rec.calls)
    except BaseException as e:
        if rec is not None:
            with contextlib.suppress(BaseException):  # the run is being discarded anyway
                rec.close()
        store.abandon(run_id)
        if limit.expired:  # whatever the expiry surfaced as on its way out of the model
            raise TapmlError(f"the carve of {name} exceeded its time limit of {timeout:g} s and was stopped; its "
                             "run was discarded (raise --timeout or carve a smaller workload)") from None
        if isinstance(e, (TapmlError, KeyboardInterrupt)):
            raise
        raise TapmlError(f"model {name} raised {type(e).__name__} while running: {e}") from None
    seconds = time.perf_counter() - start
    seen = set(rec._counts)
    stats = store.stats()
    store.close()
    return CarveResult(str(out), run_id, name, workload.description, rec.calls, len(seen),
                       len(seen - before), stats["samples"], seconds, stats, rec.naive_bytes)


def _check_timeout(timeout: float | None) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise TapmlError(f"--timeout must be a finite number of seconds > 0 (got {timeout!r})")
    if threading.current_thread() is not threading.main_thread():
        raise TapmlError("a carve with a time limit (--timeout) must run in the main thread: the limit is a "
                         "SIGALRM, which Python handles there only")


class _Expired(BaseException):
    """The time limit is up (a BaseException, as KeyboardInterrupt: a model's `except Exception` must not eat it)."""


class _TimeLimit:
    """SIGALRM after `seconds` raises _Expired in the main thread, wherever the run is in Python code; a timer of
    another part of the process that was armed is given back what is left of it."""

    def __init__(self, seconds: float | None):
        self.seconds, self.armed, self.expired = seconds, False, False

    def _fire(self, signum: int, frame: Any) -> None:
        if self.armed:  # a signal delivered just as the limit was lifted is ignored
            self.expired = True
            raise _Expired

    def __enter__(self) -> None:
        if self.seconds is None:
            return
        self.old_handler = signal.signal(signal.SIGALRM, self._fire)
        self.armed, self.started = True, time.monotonic()
        self.old_timer = signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 1e-6))

    def __exit__(self, *exc: object) -> None:
        if self.seconds is None:
            return
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old_handler)
        delay, interval = self.old_timer
        if delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - self.started), 1e-6), interval)
        if self.expired and exc[0] is None:  # the model caught the expiry and went on: it still ran too long
            raise _Expired


@contextlib.contextmanager
def _frozen_heap():
    """Keep the objects that exist before the run (the model, torch, transformers: hundreds of thousands) out of
    the garbage collector's passes while recording, as `gc.freeze` does for forked servers. The samples the
    Recorder keeps are long-lived objects too; with the whole heap in the oldest generation they trigger full
    collections that stall the run for 100-200 ms each. Left alone when the process has frozen objects itself."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def attach_provenance(stack: ExitStack, workload: Workload, rec: Recorder, bar: Any) -> None:
    """Module path from forward hooks on every submodule; phase from the top module's forward count."""
    names = {id(m): n for n, m in workload.model.named_modules()}
    stack_names: list[str] = []
    top = workload.model
    step = [0]

    def phase_of(i: int) -> str:
        if not workload.generates:
            return "forward"
        return "prefill" if i == 0 else f"decode:{i - 1}"

    rec.phase = phase_of(0)

    def pre(mod, _args):
        stack_names.append(rec.module)
        rec.module = names.get(id(mod), "") or type(mod).__name__

    def post(mod, _args, _out):
        rec.module = stack_names.pop() if stack_names else "<none>"
        if mod is top:
            step[0] += 1
            rec.phase = phase_of(step[0])
            bar.advance()

    for m in workload.model.modules():
        stack.callback(m.register_forward_pre_hook(pre).remove)
        stack.callback(m.register_forward_hook(post).remove)


class _Bar:
    def __init__(self, progress: Any, task: Any):
        self.progress, self.task = progress, task

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)


class _progress:
    """A rich progress bar over forward steps (prefill + decode steps) on stderr; silent when disabled."""

    def __init__(self, enabled: bool, name: str, steps: int | None):
        self.enabled, self.name, self.steps = enabled, name, steps
        self.progress = None

    def __enter__(self) -> _Bar:
        if not self.enabled:
            return _Bar(None, None)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), "[bold]carve[/] {task.description}", BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                                 transient=False)
        self.progress.__enter__()
        task = self.progress.add_task(f"{self.name} (forward steps)", total=self.steps)
        return _Bar(self.progress, task)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

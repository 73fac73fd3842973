"""Carving: `carve()` runs a real model under the Recorder (a TorchDispatchMode, or the native hook below it) and
writes every ATen call into a CaseStore through one Recording.

It decides what a case keeps (inputs before mutation, outputs, provenance, RNG state) and when to sample, and
bounds the run (`timeout`); the layout, the writer thread and what a failed run takes back belong to
`tapml.store`, model loading and provenance to `tapml.workload`. It must not touch store files itself.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tapml.diverse import Kept, Pool, summarize
from tapml.errors import TapmlError
from tapml.ops import (
    WHOLE_STORAGE,
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
from tapml.paths import check_output_dir
from tapml.progress import Bar
from tapml.results import CarveResult
from tapml.runguard import TimeLimit, check_timeout, frozen_heap
from tapml.store import Batch, CaseSpec, CaseStore, PendingSample, Recording
from tapml.workload import Location, Workload, check_precision, load_workload, track

# Flush a batch to disk after this many samples or bytes (bounds memory and what a crash can lose).
_FLUSH_SAMPLES = 512
_FLUSH_BYTES = 64 << 20
# Tensors at least this large are kept by reference until written (copying them costs more than watching them);
# smaller ones are copied. The writer re-hashes referenced blobs without the GIL (xxhash releases it above ~100 KiB).
_REF_BYTES = 128 << 10


class Recorder(TorchDispatchMode):
    """Records every ATen call of a run; keeps up to `samples` samples per signature, counts all calls."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Recording never runs under torch.compile; the dynamo-disabling wrapper would cost ~5 µs per call.
        return False

    def __init__(self, recording: Recording, samples: int = 1, params: list[torch.Tensor] = (),
                 naive_bytes: bool = False, flush_samples: int = _FLUSH_SAMPLES, native: bool | None = None):
        super().__init__()
        # The C++ hook when available (TAPML_CARVE_NATIVE=0 forces the Python dispatch mode, =1 requires the
        # hook); the naive-bytes measurement needs every call's tensors, so it always takes the Python mode.
        self._native = None if naive_bytes else _native_hook(native)
        self._slots: dict[int, list] = {}  # native key slot -> entry
        self._recording, self.k = recording, samples
        store = recording.store
        self.calls = 0
        # Bytes a naive recorder (every call's inputs and outputs saved) would write; measured only on request.
        self.naive_bytes = 0 if naive_bytes else None
        self.flush_samples = flush_samples
        self.where = Location()  # carve() replaces it with the one its forward hooks keep up to date
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
        # K > 1 (`tapml.diverse`): per signature, the calls held beyond its first; their blobs, kept apart and
        # counted by reference until the run ends (only the survivors' are committed); parameter storage ->
        # hashes of held blobs that are views of it.
        self._pools: dict[str, Pool] = {}
        self._held: dict[str, list] = {}
        self._held_refs: dict[int, list[str]] = {}

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
        if exc[0] is None:
            self._commit_kept()
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
        entry.calls += 1
        sig = entry.signature
        pending = None
        if entry.replayable and (self._sampled.get(sig, 0) < self.k or sig in self._pools):
            pending = self._consider(entry, func, args, kwargs, index, tensors)
        if not pending:
            out = func(*args, **kwargs)
            if self.naive_bytes is not None:
                self.naive_bytes += _nbytes(pytree.tree_leaves((args, kwargs))) + _nbytes(pytree.tree_leaves(out))
            return out
        out = func(*args, **kwargs)
        self._finish(pending, out)
        return out

    # The native hook (tapml/_native/carve_hook.cpp) counts every call in C++ and calls these two only for a
    # call key it has not seen or one whose signature may still need a sample; it runs the op in between.
    # `_native_before` returns None (never again: the key is only counted from now on), False (not this call)
    # or the pending sample that `_native_after` completes.
    def _native_before(self, func, args, kwargs, index, slot, is_new):
        tensors = None
        if slot < 0:  # a call the native key does not cover: resolved every time, counted here
            entry, tensors = self._entry(func, args, kwargs)
            entry.calls += 1
        elif is_new:
            entry, tensors = self._entry(func, args, kwargs)
            self._slots[slot] = entry
        else:
            entry = self._slots[slot]
        if not entry.replayable:
            return None
        return self._consider(entry, func, args, kwargs, index, tensors)

    def _native_after(self, pending, out) -> bool:
        entry = pending[0]
        self._finish(pending, out)
        pool = self._pools.get(entry.signature)
        return pool.settled if pool is not None else self._sampled.get(entry.signature, 0) >= self.k

    def _consider(self, entry, func, args, kwargs, index, tensors=None):
        """Whether to sample this call: None (the signature needs no more samples), False (not this call) or the
        pending sample (`_begin`). K = 1: the first call of each signature, nothing else computed. K > 1: the first
        call, then calls whose input summaries are more distinct than those held (`tapml.diverse`); those are
        held until the run ends and only the survivors are committed."""
        sig = entry.signature
        n = self._sampled.get(sig, 0)
        pool = self._pools.get(sig)
        if pool is None and (self.k == 1 or n >= self.k):
            return None if n >= self.k else self._begin(entry, func, args, kwargs, index, tensors)
        if tensors is None:
            _, tensors = encode_args(args, kwargs)
        summary = summarize(tensors, self._param_ptrs)
        if pool is None:
            # The signature's first call in this run: its first sample unless the store has one, and in any case
            # the ordinary call the others must differ from (a store's samples from earlier runs have no summary).
            first = n == 0
            pool = self._pools[sig] = Pool(self.k - n - first, [summary])
            if first:
                return self._begin(entry, func, args, kwargs, index, tensors, chosen={"by": "first"})
            return False
        if pool.settled:
            return None
        spot = pool.offer(index, summary)
        if spot is None:
            return False
        return self._begin(entry, func, args, kwargs, index, tensors, held=(pool, spot, Kept(index, summary)))

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
        for h in self._held_refs.pop(ptr, ()):
            held = self._held.get(h)
            if held is not None and held[0].untyped_storage().data_ptr() == ptr:
                held[0] = held[0].clone()
        seq = self._inflight.pop(ptr, None)
        if seq is not None:
            self._recording.wait(seq)
        if ptr in self._param_ptrs:
            self._param_hash = {k: h for k, h in self._param_hash.items() if k[0] != ptr}
            self._watch(ptr)

    def _sync(self) -> None:
        """Fold the native side's call counts into the entries and `calls`."""
        if self._native is None:
            return
        for slot, n in self._native.take_counts():
            self._slots[slot].calls += n
        self.calls = self._native.calls()

    def _begin(self, entry, func, args, kwargs, index, tensors=None, chosen=None, held=None) -> tuple:
        """Before running a sampled call: RNG state and, for mutating ops, the inputs. `held`: (pool, spot, Kept)
        for a call kept until the run ends, whose blobs are held apart (`_hold`) and committed only if it stays."""
        if tensors is None:
            _, tensors = encode_args(args, kwargs)
        whole = entry.op in WHOLE_STORAGE
        hold = None if held is None else held[2].blobs
        rng = None
        if entry.random:
            gen = kwargs.get("generator")
            state = gen.get_state() if isinstance(gen, torch.Generator) else torch.get_rng_state()
            rng = self._put(state.clone(), hold)
        # A mutating op's inputs are copied now: it is about to overwrite them.
        inputs = ([self._capture(t, whole, m, copy=True, hold=hold) for t, m in zip(tensors, entry.metas)]
                  if mutated_args(func) else None)
        return entry, tensors, whole, rng, inputs, index, chosen, held

    def _finish(self, pending, out) -> None:
        entry, tensors, whole, rng, inputs, index, chosen, held = pending
        sig = entry.signature
        hold = None if held is None else held[2].blobs
        if inputs is None:
            inputs = [self._capture(t, whole, m, hold=hold) for t, m in zip(tensors, entry.metas)]
        out_tensors: list[torch.Tensor] = []
        out_spec = encode_value(out, out_tensors) if not isinstance(out, torch.Tensor) else {"T": 0}
        if isinstance(out, torch.Tensor):
            out_tensors = [out]
        outputs = {"spec": out_spec, "tensors": [self._capture(t, False, tensor_meta(t), hold=hold)
                                                 for t in out_tensors]}
        if self.naive_bytes is not None:
            self.naive_bytes += _nbytes(tensors) + _nbytes(out_tensors)
        where = self.where
        sample = PendingSample(sig, where.module, where.phase, index, inputs, outputs, rng, chosen)
        if held is not None:
            pool, (pos, replaced), kept = held
            kept.sample = sample
            if replaced is not None:
                self._unhold(replaced.blobs)
            if pos < len(pool.kept):
                pool.kept[pos] = kept
            else:
                pool.kept.append(kept)
            return
        self._sampled[sig] = self._sampled.get(sig, 0) + 1
        self._pending_samples.append(sample)
        if len(self._pending_samples) >= self.flush_samples or self._pending_bytes >= _FLUSH_BYTES:
            self.flush()

    # --- samples held until the run ends (K > 1) -------------------------------------------------------
    def _hold(self, h: str, values: torch.Tensor, ptr: int) -> None:
        """Keep a held sample's blob apart from the pending ones, counted by reference: a parameter's values by
        reference (watched; `_on_write` copies them before a write), anything else live as a copy, so that a held
        sample never pins an activation's storage for the rest of the run."""
        entry = self._held.get(h)
        if entry is not None:
            entry[1] += 1
            return
        if ptr in self._param_ptrs:
            self._held_refs.setdefault(ptr, []).append(h)
        elif ptr:
            values = values.clone()
        self._held[h] = [values, 1]

    def _unhold(self, hashes: list[str]) -> None:
        """A held sample was replaced: its blobs go unless another held sample uses them (never committed)."""
        for h in hashes:
            entry = self._held.get(h)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._held[h]

    def _commit_kept(self) -> None:
        """At the end of a run: the held samples that stayed join the pending ones, with their blobs."""
        for sig, pool in self._pools.items():
            for kept in sorted(pool.kept, key=lambda k: k.index):
                kept.sample.chosen = pool.why(kept)
                self._sampled[sig] = self._sampled.get(sig, 0) + 1
                self._pending_samples.append(kept.sample)
        for h, (values, _) in self._held.items():
            if h not in self._known and h not in self._pending_blobs:
                self._pending_blobs[h] = values
                self._pending_bytes += values.numel() * values.element_size()
                ptr = values.untyped_storage().data_ptr()
                if ptr in self._param_ptrs:  # by reference: the writer re-hashes it
                    self._refs.setdefault(ptr, []).append(h)
        self._pools, self._held, self._held_refs = {}, {}, {}

    def _entry(self, func, args: tuple, kwargs: dict) -> tuple[CaseSpec, list]:
        """The CaseSpec of this call's signature (made once per signature; it counts calls between commits), and
        the call's tensor arguments."""
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
            entry = self._counts[sig] = CaseSpec(sig, name, spec, metas, replayable, reason,
                                                 is_seeded_random(func, args, kwargs), spec_json, metas_json)
        return entry, tensors

    def _capture(self, t: torch.Tensor, whole: bool, meta: dict, copy: bool = False,
                 hold: list[str] | None = None) -> list:
        """[hash, meta] of `t` (`meta`: its tensor_meta); its values join the pending blobs (by reference unless
        `copy`) when new, or with `hold` (a held sample's blob list) the held ones. (Runs for every tensor of
        every sample: kept lean.)"""
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
            if hold is not None:  # no hash-cache entry: the cache may only name blobs that will be committed
                self._hold(h, values, ptr if shared else 0)
                hold.append(h)
                return [h, meta]
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

    def _put(self, values: torch.Tensor, hold: list[str] | None = None) -> str:
        """Content-address a private copy and keep it when new (the RNG state); `hold` as for `_capture`."""
        h = content_hash(values)
        if h not in self._known and h not in self._pending_blobs:
            if hold is not None:
                self._hold(h, values, 0)
                hold.append(h)
                return h
            self._pending_blobs[h] = values
            self._pending_bytes += values.numel() * values.element_size()
        return h

    def flush(self) -> None:
        """Hand the pending batch to the writer thread (blocks only when two batches are already queued)."""
        self._sync()
        counts = [c for c in self._counts.values() if c.calls]
        if not (self._pending_samples or counts):
            return
        cases: dict[str, CaseSpec] = {}
        for sig in [c.signature for c in counts] + [x.signature for x in self._pending_samples]:
            if sig not in self._stored and sig not in cases:
                cases[sig] = self._counts[sig]
        batch = Batch(self._pending_blobs, list(cases.values()), counts, self._pending_samples)
        refs = {h for hs in self._refs.values() for h in hs}
        seq = self._recording.submit(batch, refs, self.calls)
        self._stored.update(cases)
        self._known.update(self._pending_blobs)
        self._pending_blobs, self._pending_samples, self._pending_bytes = {}, [], 0
        for c in counts:
            c.calls = 0
        for ptr in self._refs:
            self._inflight[ptr] = seq
        self._refs = {}
        done = self._recording.done
        for ptr in [p for p, n in self._inflight.items() if n <= done]:  # on disk: no longer at risk
            del self._inflight[ptr]
            if ptr not in self._param_ptrs:
                self._watched.discard(ptr)
                if self._native is not None:
                    self._native.unwatch(ptr)

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
        if isinstance(x, _T):  # the exact layout: a size-1 dim's stride or an offset makes another signature
            add((x.shape, x.dtype, x.stride(), x.storage_offset()))
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


def carve(model: str, out: str | os.PathLike, *, prompt: str | None = None, max_new_tokens: int = 8,
          samples: int = 1, progress: bool = True, workload: Workload | None = None, frontend: str = "torch",
          naive_bytes: bool = False, timeout: float | None = None, dtype: str | None = None,
          weights: str = "float") -> CarveResult:
    """Carve MODEL (a zoo name or path/to/file.py:make_model) into the case store at `out` (created or extended;
    a store another carve is writing is refused).

    frontend: `torch` records every ATen call of the run (LLMs: greedy generate() of `max_new_tokens` with the
    KV cache; `prompt` instead of the shipped prompts); `tvm` records the TIR kernel calls of the model's forward
    in TVM's Relax VM (see `tapml.frontends.tvm`). samples: samples kept per signature: its first call, and with
    K > 1 the K-1 further calls whose inputs differ most (`tapml.diverse`; the tvm frontend keeps the first K).
    dtype / weights: the precision the model runs in (`tapml.workload.set_precision`: float32, float16 or
    bfloat16, None for as built; weights `float` or `q4_0`), recorded with the run. workload: run this
    instead of building MODEL (it carries its own precision). timeout: seconds the model run may take (torch frontend); it is a SIGALRM, so a
    carve with one must run in the main thread, and it stops the run at its next Python step. On any failure,
    the time limit included, the run is discarded and the store is left as it was before the call (one the call
    created is removed).
    """
    check_output_dir(out, "--out")
    check_precision(dtype, weights)
    if workload is not None and (dtype is not None or weights != "float"):
        raise TapmlError("a prepared workload carries its own precision: build it with the dtype and weights "
                         "instead of passing them to carve()")
    if frontend == "tvm":
        if dtype is not None or weights != "float":
            raise TapmlError("--dtype and --weights apply to --frontend torch (the tvm frontend compiles the "
                             "float32 model)")
        if timeout is not None or workload is not None:
            raise TapmlError("--timeout and a prepared workload apply to --frontend torch (the tvm frontend runs one "
                             "compiled forward)")
        from tapml.frontends.tvm import carve_tvm

        return carve_tvm(model, str(out), prompt=prompt, samples=samples)
    if frontend != "torch":
        raise TapmlError(f"unknown --frontend {frontend!r}; choose torch or tvm")
    if samples < 1:
        raise TapmlError(f"--samples must be ≥ 1 (got {samples})")
    if max_new_tokens < 1:
        raise TapmlError(f"--max-new-tokens must be ≥ 1 (got {max_new_tokens})")
    check_timeout(timeout)
    flush, native = _env_flush(), _env_native()  # bad values fail before anything is written
    if workload is None:
        name, workload = load_workload(model, prompt, max_new_tokens, dtype, weights)
    else:
        name = model
    limit = TimeLimit(timeout)
    try:
        with CaseStore.create(Path(out)) as store:  # a failure takes back what this call wrote, nothing else
            before = {c.signature for c in store.cases()}
            options = {"prompt": prompt, "max_new_tokens": max_new_tokens, "samples": samples,
                       **workload.precision}  # dtype / weights when not the default: a float32 run's row is as it was
            if samples > 1:  # how they were chosen (`tapml show`); a K = 1 run's row is what it always was
                options["sampling"] = "diverse"
            with store.record(name, workload.description, options) as recording:
                params = list(workload.model.parameters()) + list(workload.model.buffers())
                rec = Recorder(recording, samples, params, naive_bytes=naive_bytes, flush_samples=flush,
                               native=native)
                start = time.perf_counter()
                with ExitStack() as stack:
                    steps = max_new_tokens if workload.generates else None
                    bar = stack.enter_context(Bar(progress, "carve", f"{name} (forward steps)", steps))
                    rec.where = track(stack, workload, bar.advance)
                    stack.enter_context(frozen_heap())
                    stack.enter_context(torch.no_grad())
                    stack.enter_context(rec)
                    with limit:  # innermost: the limit covers the model run, not the final commit
                        workload.run()
                rec.flush()
                recording.calls = rec.calls
            seconds = time.perf_counter() - start
            stats = store.stats()
    except BaseException as e:
        if limit.expired:  # whatever the expiry surfaced as on its way out of the model
            raise TapmlError(f"the carve of {name} exceeded its time limit of {timeout:g} s and was stopped; its "
                             "run was discarded (raise --timeout or carve a smaller workload)") from None
        if isinstance(e, (TapmlError, KeyboardInterrupt)):
            raise
        raise TapmlError(f"model {name} raised {type(e).__name__} while running: {e}") from None
    seen = set(rec._counts)
    return CarveResult(str(out), recording.run_id, name, workload.description, rec.calls, len(seen),
                       len(seen - before), stats["samples"], seconds, stats, rec.naive_bytes)

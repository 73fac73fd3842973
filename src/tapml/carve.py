"""Carving: run a real model under the Recorder (a TorchDispatchMode) and write every ATen call to a CaseStore.

It decides what a case keeps (inputs before mutation, outputs, provenance, RNG state) and when to sample; the
on-disk layout belongs to `store.py`, and model construction to `tapml.zoo` / `load_workload`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import shutil
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
    Provenance,
    Unserializable,
    compact,
    content_hash,
    encode_args,
    encode_value,
    is_seeded_random,
    mutated_args,
    op_name,
    signature,
    tensor_meta,
)
from tapml.store import CaseStore, PendingSample

# Ops that may read storage outside their input view: the whole storage is kept for them.
_WHOLE_STORAGE = {"aten.as_strided.default", "aten.as_strided_.default", "aten.as_strided_scatter.default"}
# Flush a batch to disk after this many samples or bytes (bounds memory and what a crash can lose).
_FLUSH_SAMPLES = 512
_FLUSH_BYTES = 64 << 20


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
        self._pending_samples: list[PendingSample] = []
        self._counts: dict[str, list] = {}  # signature -> entry (see _entry)
        self._by_key: dict[tuple, list] = {}  # fast call key -> the same entry
        # Hash cache for parameters/buffers only: their storage outlives the run, so a pointer can't be reused.
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self._param_hash: dict[tuple, tuple[str, dict]] = {}
        self._writer = _Writer(store, run_id)

    # --- the dispatch hook ------------------------------------------------------------------------------
    def __enter__(self):
        out = super().__enter__()
        if self._native is not None:
            self._native.enable(self._native_before, self._native_after)
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
        index = self.calls
        self.calls += 1
        # Fast path: a hashable key of the call's shapes/dtypes/strides/scalars finds its entry without
        # building the JSON signature; that is computed once per new key.
        try:
            key = (func, _key(args), _key((kwargs,)) if kwargs else None)
            entry = self._by_key.get(key)
        except TypeError:  # an unhashable argument: take the slow path every time
            key, entry = None, None
        if entry is None:
            entry = self._entry(func, args, kwargs)
            if key is not None:
                self._by_key[key] = entry
        entry[6] += 1
        sig = entry[7]
        if not entry[3] or self._sampled.get(sig, 0) >= self.k:
            out = func(*args, **kwargs)
            if self.naive_bytes is not None:
                self.naive_bytes += _nbytes(pytree.tree_leaves((args, kwargs))) + _nbytes(pytree.tree_leaves(out))
            return out
        pending = self._begin(entry, func, args, kwargs, index)
        out = func(*args, **kwargs)
        self._finish(pending, out)
        return out

    # The native hook (tapml/_native/carve_hook.cpp) counts every call in C++ and calls these two only for a
    # call key it has not seen or one whose signature may still need a sample; it runs the op in between.
    def _native_before(self, func, args, kwargs, index, slot, is_new):
        if slot < 0:  # a call the native key does not cover: resolved every time, counted here
            entry = self._entry(func, args, kwargs)
            entry[6] += 1
        elif is_new:
            entry = self._slots[slot] = self._entry(func, args, kwargs)
        else:
            entry = self._slots[slot]
        if not entry[3] or self._sampled.get(entry[7], 0) >= self.k:
            return None  # never sampled again: the native side only counts this key from now on
        return self._begin(entry, func, args, kwargs, index)

    def _native_after(self, pending, out) -> bool:
        entry = pending[0]
        self._finish(pending, out)
        return self._sampled.get(entry[7], 0) >= self.k

    def _sync(self) -> None:
        """Fold the native side's call counts into the entries and `calls`."""
        if self._native is None:
            return
        for slot, n in self._native.take_counts():
            self._slots[slot][6] += n
        self.calls = self._native.calls()

    def _begin(self, entry, func, args, kwargs, index) -> tuple:
        """Before running a sampled call: RNG state and, for mutating ops, the inputs."""
        _, tensors = encode_args(args, kwargs)
        whole = entry[0] in _WHOLE_STORAGE
        rng = None
        if entry[5]:
            gen = kwargs.get("generator")
            state = gen.get_state() if isinstance(gen, torch.Generator) else torch.get_rng_state()
            rng = self._put(state.clone(), owned=True)
        inputs = [self._capture(t, whole) for t in tensors] if mutated_args(func) else None
        return entry, tensors, whole, rng, inputs, index

    def _finish(self, pending, out) -> None:
        entry, tensors, whole, rng, inputs, index = pending
        sig, name, spec = entry[7], entry[0], entry[1]
        if inputs is None:
            inputs = [self._capture(t, whole) for t in tensors]
        out_tensors: list[torch.Tensor] = []
        out_spec = encode_value(out, out_tensors) if not isinstance(out, torch.Tensor) else {"T": 0}
        if isinstance(out, torch.Tensor):
            out_tensors = [out]
        outputs = {"spec": out_spec, "tensors": [self._capture(t, False) for t in out_tensors]}
        if self.naive_bytes is not None:
            self.naive_bytes += _nbytes(tensors) + _nbytes(out_tensors)
        self._sampled[sig] = self._sampled.get(sig, 0) + 1
        self._pending_samples.append(PendingSample(
            sig, name, spec, entry[2], True, None, entry[5],
            Provenance(self.run_id, self.module, self.phase, index), inputs, outputs, rng))
        if len(self._pending_samples) >= self.flush_samples or self._pending_bytes >= _FLUSH_BYTES:
            self.flush()

    def _entry(self, func, args: tuple, kwargs: dict) -> list:
        """[op, spec, metas, replayable, reason, random, calls since last commit, signature] for this call."""
        name = op_name(func)
        try:
            spec, tensors = encode_args(args, kwargs)
            replayable, reason = True, None
        except Unserializable as e:
            spec = {"args": [repr(a) for a in args], "kwargs": {k: repr(v) for k, v in kwargs.items()}}
            tensors, replayable, reason = [], False, str(e)
        sig = signature(name, spec, tensors)
        entry = self._counts.get(sig)
        if entry is None:
            entry = self._counts[sig] = [name, spec, [tensor_meta(t) for t in tensors], replayable, reason,
                                         is_seeded_random(func, args, kwargs), 0, sig]
        return entry

    def _capture(self, t: torch.Tensor, whole: bool) -> list:
        meta = tensor_meta(t)
        if whole:
            n = t.untyped_storage().nbytes() // t.element_size()
            meta = {**meta, "stride": list(t.stride()), "offset": t.storage_offset(), "storage": n}
        key = None
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._param_ptrs:
            # A parameter view is hashed once per (view, version): weights used by every step cost nothing.
            key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version, whole)
            hit = self._param_hash.get(key)
            if hit is not None:
                return [hit[0], hit[1]]  # the meta too: it says how the blob was laid out (span)
        if whole:
            values = torch.as_strided(t, (meta["storage"],), (1,), 0)
        else:
            values, span = compact(t)
            if span:
                meta = {**meta, "span": True}
        h = self._put(values, owned=values.untyped_storage().data_ptr() != ptr)
        if key is not None:
            self._param_hash[key] = (h, meta)
        return [h, meta]

    def _put(self, values: torch.Tensor, owned: bool = False) -> str:
        """Content-address `values`; keep a private copy when new (`owned`: already a fresh copy)."""
        values = values.detach()
        if not values.is_contiguous():
            values, owned = values.contiguous(), True
        h = content_hash(values)
        if h not in self._known and h not in self._pending_blobs:
            # The original may be a view of a larger tensor or be mutated later: keep our own copy.
            self._pending_blobs[h] = values if owned else values.clone()
            self._pending_bytes += values.numel() * values.element_size()
        return h

    def flush(self) -> None:
        """Hand the pending batch to the writer thread (blocks only when two batches are already queued)."""
        self._sync()
        counts = {sig: tuple(v[:7]) for sig, v in self._counts.items() if v[6]}
        if not (self._pending_samples or counts):
            return
        self._writer.submit(self._pending_blobs, self._pending_samples, counts, self.calls)
        self._known.update(self._pending_blobs)
        self._pending_blobs, self._pending_samples, self._pending_bytes = {}, [], 0
        for v in self._counts.values():
            v[6] = 0

    def close(self) -> None:
        """Wait until everything handed over is durable; re-raise a writer failure."""
        self._writer.close()


class _Writer:
    """Writes batches (shard + SQLite commit) on a thread so storage I/O overlaps the model run.

    Batches commit in order; a failure is re-raised in the recording thread at the next submit or close.
    """

    def __init__(self, store: CaseStore, run_id: int):
        self.store, self.run_id = store, run_id
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="tapml-store-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.store.commit(self.run_id, *item)
                except BaseException as e:  # surfaced in the recording thread
                    self.error = e

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, blobs: dict, samples: list, counts: dict, calls: int) -> None:
        self._check()
        self.queue.put((blobs, samples, counts, calls))

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self._check()


_Tensor = torch.Tensor
_warned = False


def _native_hook(native: bool | None):
    """The native carving hook module, or None for the Python dispatch mode (warned once when unavailable)."""
    global _warned
    if native is None:
        env = os.environ.get("TAPML_CARVE_NATIVE", "auto").strip().lower()
        native = {"0": False, "1": True, "false": False, "true": True}.get(env)
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
          naive_bytes: bool = False) -> CarveResult:
    """Carve MODEL into the store at `out`. On any failure the store is left as it was before the call."""
    if samples < 1:
        raise TapmlError(f"--samples must be ≥ 1 (got {samples})")
    if max_new_tokens < 1:
        raise TapmlError(f"--max-new-tokens must be ≥ 1 (got {max_new_tokens})")
    if workload is None:
        name, workload = load_workload(model, prompt, max_new_tokens)
    else:
        name = model
    out = Path(out)
    fresh = not (out / "cases.sqlite").exists()
    if fresh and out.exists() and not out.is_dir():
        raise TapmlError(f"{out} exists and is not a directory; choose another --out")
    created_dir = not out.exists()
    store = CaseStore.create(out)
    before = {c.signature for c in store.cases()}
    options = {"prompt": prompt, "max_new_tokens": max_new_tokens, "samples": samples}
    run_id = store.begin_run(name, workload.description, options)
    params = list(workload.model.parameters()) + list(workload.model.buffers())
    flush = int(os.environ.get("TAPML_CARVE_FLUSH", _FLUSH_SAMPLES))  # samples per commit (tests lower it)
    rec = Recorder(store, run_id, samples, params, naive_bytes=naive_bytes, flush_samples=max(flush, 1))
    start = time.perf_counter()
    try:
        with ExitStack() as stack:
            steps = max_new_tokens if workload.generates else None
            bar = stack.enter_context(_progress(progress, name, steps))
            attach_provenance(stack, workload, rec, bar)
            stack.enter_context(torch.no_grad())
            stack.enter_context(rec)
            workload.run()
        rec.flush()
        rec.close()
        store.finish_run(run_id, rec.calls)
    except BaseException as e:
        with contextlib.suppress(BaseException):  # the run is being discarded anyway
            rec.close()
        store.discard_run(run_id)
        store.close()
        if fresh:
            CaseStore.remove(out) if created_dir else _clear_new_store(out)
        if isinstance(e, (TapmlError, KeyboardInterrupt)):
            raise
        raise TapmlError(f"model {name} raised {type(e).__name__} while running: {e}") from None
    seconds = time.perf_counter() - start
    seen = set(rec._counts)
    stats = store.stats()
    store.close()
    return CarveResult(str(out), run_id, name, workload.description, rec.calls, len(seen),
                       len(seen - before), stats["samples"], seconds, stats, rec.naive_bytes)


def _clear_new_store(out: Path) -> None:
    for name in ("cases.sqlite", "cases.sqlite-wal", "cases.sqlite-shm"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "blobs", ignore_errors=True)


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

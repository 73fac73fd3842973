"""MixedRun: run a model with the op calls a Placement selects on a target backend and the rest on PyTorch.

Target outputs stay resident on the target (as backend handles) while their consumers run there; a host
mirror of each is also kept so the model's Python code and reference ops always see the target's values.
Crossings are counted at the logical boundary: uploads of host tensors a target op needs, and target-produced
tensors a reference op consumes. Optionally each target op is also run on the reference with the same (maybe
drifted) inputs — the local check that separates an op's own error from error its inputs brought along.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from tapml.backends import Backend
from tapml.compare import judge, rel_rmse
from tapml.migration.placement import Placement
from tapml.ops import WHOLE_STORAGE, OpCall, Provenance, clone_layout, is_seeded_random, mutated_args, op_name
from tapml.workload import Location, Workload, track


class Step(NamedTuple):
    """One call of a run as the trace keeps it: overload, its per-overload index, module path and phase."""

    op: str
    index: int
    module: str
    phase: str


@dataclass
class OpRecord:
    """One target-placed call, with its errors when the local check ran."""

    call: int
    op: str
    op_index: int
    module: str
    phase: str
    local_error: float | None = None  # rel. RMS error of target vs reference on the same inputs
    accumulated_error: float | None = None  # rel. RMS error of target vs the clean (golden) run
    local_pass: bool | None = None  # the fp64-oracle verdict on the same inputs
    local_rule: str = ""
    inputs: tuple | None = None  # (args, kwargs) host copies, kept only for the instances asked for

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "inputs"}


@dataclass
class Crossings:
    uploads: int = 0
    upload_bytes: int = 0
    downloads: int = 0
    download_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RunResult:
    output: Any  # what workload.run() returned
    logits: list[torch.Tensor]  # per forward step: last-position logits (LLMs), else []
    trace: list[Step]  # per call
    records: list[OpRecord]  # the target-placed calls
    golden: dict[int, Any] = field(default_factory=dict)  # call -> outputs, when kept
    crossings: Crossings = field(default_factory=Crossings)
    on_target: int = 0  # calls that ran on the target
    refused: dict[str, str] = field(default_factory=dict)  # op -> why the target could not run it
    seconds: float = 0.0
    placed: int = 0  # calls the placement put on the target (ran + refused)
    refused_calls: int = 0  # placed calls the target refused (they ran on PyTorch)

    @property
    def calls(self) -> int:
        return len(self.trace)

    def counts(self) -> dict[str, int]:
        """Calls placed on the target, run there, and refused by it (run on PyTorch instead)."""
        return {"placed": self.placed, "ran": self.on_target, "refused": self.refused_calls}


def _clone_out(x: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), x)


def _clone_inputs(name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Host copies of a call's inputs in their exact layouts (strides of size-1 dims, storage offsets): the
    culprit's repro store and the local check must see what the target saw, and a clone drops the offset."""
    whole = name in WHOLE_STORAGE
    return pytree.tree_map_only(torch.Tensor, lambda t: clone_layout(t, whole), (args, kwargs))


def _like_reference_layout(func, args: tuple, kwargs: dict, out: Any) -> Any:
    """Give downloaded outputs the strides the reference op would have produced (from its meta kernel).

    A target returns dense tensors; torch ops may return other layouts (CPU flash attention's output is a
    permuted view of [B, S, H, D]). Layout decides what later composite ops do (`reshape` is a view of a
    contiguous tensor but a copy otherwise), so a different layout would change the op sequence of the run."""
    leaves = pytree.tree_leaves(out)
    if not any(isinstance(t, torch.Tensor) and t.dim() > 1 for t in leaves):
        return out
    try:
        meta_args, meta_kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        expect = [m for m in pytree.tree_leaves(func(*meta_args, **meta_kwargs))]
    except Exception:  # no meta kernel: keep the target's layout
        return out
    if len(expect) != len(leaves):
        return out

    def fix(t: Any, m: Any) -> Any:
        if (isinstance(t, torch.Tensor) and isinstance(m, torch.Tensor) and t.shape == m.shape
                and t.stride() != m.stride() and t.numel() > 1):
            dense = torch.empty_strided(m.shape, m.stride(), dtype=t.dtype)
            dense.copy_(t)
            return dense
        return t

    fixed = iter([fix(t, m) for t, m in zip(leaves, expect)])
    return pytree.tree_unflatten([next(fixed) for _ in leaves], pytree.tree_structure(out))


class _Residency:
    """Host tensor -> its copy on the target, keyed by storage and view geometry.

    Python tensor objects are not stable across C++ composite ops (linear's `t` then `mm` re-wrap the same
    tensor), so identity cannot be the key. Each entry holds the host storage alive so its address cannot be
    reused by another tensor while the entry exists; the version counter detects host-side mutation. Entries
    beyond `limit` bytes of held storage are evicted oldest first (a later consumer just uploads again).
    """

    def __init__(self, limit: int = 2 << 30):
        self._d: OrderedDict[tuple, tuple[Any, int, Any, int]] = OrderedDict()
        self.limit, self.held = limit, 0

    @staticmethod
    def key(t: torch.Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    def get(self, t: torch.Tensor) -> tuple[bool, Any]:
        k = self.key(t)
        hit = self._d.get(k)
        if hit is None or hit[1] != t._version:
            return False, None
        self._d.move_to_end(k)
        return True, hit[0]

    def put(self, t: torch.Tensor, handle: Any, version: int | None = None) -> None:
        k = self.key(t)
        storage = t.untyped_storage()
        old = self._d.pop(k, None)
        if old is not None:
            self.held -= old[3]
        n = storage.nbytes()
        self._d[k] = (handle, t._version if version is None else version, storage, n)
        self.held += n
        while self.held > self.limit and len(self._d) > 1:
            _, (_, _, _, m) = self._d.popitem(last=False)
            self.held -= m


class MixedRun(TorchDispatchMode):
    """The dispatch mode behind `run_mixed`; one instance per model run."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self, target: Backend | None, placement: Placement, local_check: Placement | None = None,
                 keep_inputs: frozenset[int] = frozenset(), keep_outputs: bool = False,
                 golden: dict[int, Any] | None = None):
        super().__init__()
        self.target, self.placement = target, placement
        self.local_check = local_check
        self.keep_inputs, self.keep_outputs = keep_inputs, keep_outputs
        self.golden_in = golden or {}
        self.where = Location()  # run_mixed replaces it with the one its forward hooks keep up to date
        self.trace: list[Step] = []
        self.records: list[OpRecord] = []
        self.golden_out: dict[int, Any] = {}
        self.crossings = Crossings()
        self.refused: dict[str, str] = {}
        self.placed = self.refused_calls = 0
        self._op_counts: dict[str, int] = {}
        self._names: dict[Any, str] = {}
        self._resident = _Residency()
        # host mirrors of target outputs a reference op has not consumed yet (for crossing counts)
        self._mirrors: dict[tuple, int] = {}
        self._oracle = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = op_name(func)
        i = len(self.trace)
        k = self._op_counts.get(name, 0)
        self._op_counts[name] = k + 1
        module, phase = self.where.module, self.where.phase
        self.trace.append(Step(name, k, module, phase))
        on = (self.target is not None and self.placement.selects(name, module, phase, i, k)
              and not is_seeded_random(func, args, kwargs))
        if on:
            self.placed += 1
            call = OpCall(name, args, kwargs, None, Provenance(0, module, phase, i, k))
            reason = self.target.supports(call)
            if reason is not None:
                self.refused.setdefault(name, reason)
                self.refused_calls += 1
                on = False
        if not on:
            self._count_downloads(args, kwargs)
            out = func(*args, **kwargs)
        else:
            out = self._on_target(func, name, i, k, args, kwargs)
        if self.keep_outputs:
            self.golden_out[i] = _clone_out(out)
        return out

    # --- crossings ----------------------------------------------------------------------------------------
    def _count_downloads(self, args: tuple, kwargs: dict) -> None:
        if not self._mirrors:
            return
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and self._mirrors.pop(_Residency.key(t), None) is not None:
                self.crossings.downloads += 1
                self.crossings.download_bytes += t.numel() * t.element_size()

    def _handle(self, t: torch.Tensor) -> Any:
        found, h = self._resident.get(t)
        if found:
            return t if h is None else h
        h = self.target.upload(t)
        self.crossings.uploads += 1
        self.crossings.upload_bytes += t.numel() * t.element_size()
        self._keep(t, h)
        return h

    def _keep(self, host: torch.Tensor, h: Any, version: int | None = None) -> None:
        # When the handle is the host tensor itself (a CPU target), hold no reference to it: PyTorch would
        # otherwise detach the op's output on return, adding calls that shift every later call index.
        self._resident.put(host, None if h is host else h, version)

    # --- a call on the target ---------------------------------------------------------------------------
    def _on_target(self, func, name: str, i: int, k: int, args: tuple, kwargs: dict) -> Any:
        target = self.target
        module, phase = self.where.module, self.where.phase
        check = self.local_check is not None and self.local_check.selects(name, module, phase, i, k)
        mutated = mutated_args(func)
        keep = i in self.keep_inputs
        before = _clone_inputs(name, args, kwargs) if (check or keep) else None
        hargs, hkwargs = pytree.tree_map_only(torch.Tensor, self._handle, (args, kwargs))
        hout = target.run(OpCall(name, hargs, hkwargs, None, Provenance(0, module, phase, i, k)))
        schema = func._schema
        aliases = [r.alias_info is not None for r in schema.returns]
        if mutated:
            # Write the target's result into the host tensors the op mutates, so aliasing holds on the host.
            hosts = _mutated_hosts(schema, args, kwargs)
            outs = hout if isinstance(hout, (tuple, list)) else (hout,)
            for host, h in zip(hosts, outs):
                host.copy_(target.download(h))
                self._keep(host, h)
            out = func_result_for_mutation(schema, args, kwargs, hosts)
        elif any(aliases):
            # A view: the host keeps a true alias (in-place ops on the base must show through it);
            # the target keeps its own view so target consumers stay resident.
            out = func(*args, **kwargs)
            # Below autograd a fresh view has its own version counter; on return it takes its base's.
            base = next((a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)), None)
            version = base._version if base is not None else None
            for host, h in zip(pytree.tree_leaves(out), pytree.tree_leaves(hout, is_leaf=target.is_handle)):
                if isinstance(host, torch.Tensor) and target.is_handle(h):
                    self._keep(host, h, version)
        else:
            out = pytree.tree_map(lambda h: target.download(h) if target.is_handle(h) else h, hout,
                                  is_leaf=target.is_handle)
            out = _like_reference_layout(func, args, kwargs, out)
            for host, h in zip(pytree.tree_leaves(out), pytree.tree_leaves(hout, is_leaf=target.is_handle)):
                if isinstance(host, torch.Tensor) and target.is_handle(h):
                    self._keep(host, h)
                    self._mirrors[_Residency.key(host)] = 1
        rec = OpRecord(i, name, k, module, phase)
        if keep:
            rec.inputs = before
        if check:
            self._local_check(func, name, rec, before, out)
        self.records.append(rec)
        return out

    def _local_check(self, func, name: str, rec: OpRecord, before: tuple, out: Any) -> None:
        from tapml.backends.reference import oracle

        a, kw = _clone_inputs(name, *before)
        ref = func(*a, **kw)
        got = _clone_out(out)
        rec.local_error = rel_rmse(got, ref)
        if self._oracle is None:
            self._oracle = oracle()
        try:
            oracle = self._oracle.execute(OpCall(name, *_clone_inputs(name, *before)))
        except Exception:
            oracle = None
        v = judge(name, before[0], got, ref, oracle, kwargs=before[1])
        rec.local_pass, rec.local_rule = v.passed, v.rule
        golden = self.golden_in.get(rec.call)
        if golden is not None:
            rec.accumulated_error = rel_rmse(got, golden)


def _mutated_hosts(schema, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    hosts = []
    for pos, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = kwargs.get(a.name) if a.kwarg_only or pos >= len(args) else args[pos]
            if isinstance(v, torch.Tensor):
                hosts.append(v)
    return hosts


def func_result_for_mutation(schema, args: tuple, kwargs: dict, hosts: list[torch.Tensor]) -> Any:
    """What an in-place / out= op returns: the mutated host tensors themselves (or None)."""
    if not schema.returns:
        return None
    return hosts[0] if len(schema.returns) == 1 else tuple(hosts[: len(schema.returns)])


def run_mixed(workload: Workload, target: Backend | None, placement: Placement,
              local_check: Placement | None = None, keep_inputs: frozenset[int] = frozenset(),
              keep_outputs: bool = False, golden: dict[int, Any] | None = None) -> RunResult:
    """Run the workload once with `placement` on `target` (None: a pure reference run)."""
    mode = MixedRun(target, placement, local_check, keep_inputs, keep_outputs, golden)
    logits: list[torch.Tensor] = []
    start = time.perf_counter()
    with ExitStack() as stack:
        mode.where = track(stack, workload)
        if workload.generates:
            stack.callback(workload.model.register_forward_hook(
                lambda m, a, o: logits.append(_last_logits(o))).remove)
        stack.enter_context(torch.no_grad())
        stack.enter_context(mode)
        output = workload.run()
    output = _clone_out(output)
    return RunResult(output, [x for x in logits if x is not None], mode.trace, mode.records, mode.golden_out,
                     mode.crossings, len(mode.records), mode.refused, time.perf_counter() - start, mode.placed,
                     mode.refused_calls)


def _last_logits(out: Any) -> torch.Tensor | None:
    with _disable_current_modes():  # reading the logits is not part of the run
        return _read_logits(out)


def _read_logits(out: Any) -> torch.Tensor | None:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if not isinstance(logits, torch.Tensor):
        return None
    return logits[:, -1, :].detach().float().clone() if logits.dim() == 3 else logits.detach().float().clone()


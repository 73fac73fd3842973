"""Kernel-level carving through TVM: import a model into Relax (`from_exported_program` of its forward), build it
for llvm, run it in the Relax VM with an instrument, and record every TIR kernel call — kernel, real arguments,
written arguments after the call — into a CaseStore, deduplicated, with provenance.

A kernel case's op is `tvm.<kernel>.k<source hash>`; its args are the PrimFunc's arguments before the call, its
kwargs the kernel's TVMScript (as a uint8 tensor, content-addressed like any blob) and the indices of the
arguments it writes; its outputs are those arguments after the call. Which arguments are written is found from
the PrimFunc's buffer stores and confirmed by comparing each argument's contents before and after the call.
Only the tvm backend runs these cases. It must not replay anything itself.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

import torch

from tapml.errors import TapmlError, first_line
from tapml.frontends import forward_program
from tapml.ops import compact, content_hash, encode_args, signature, tensor_meta
from tapml.results import CarveResult
from tapml.store import CaseSpec, CaseStore, PendingSample


def _static_writes(func: Any) -> set[int]:
    """Parameters the PrimFunc stores to (from its TVMScript: `name[...] = ...`)."""
    text = func.script()
    out = set()
    for i, p in enumerate(func.params):
        if re.search(rf"^\s*{re.escape(p.name)}\[[^\n]*\]\s*=(?!=)", text, re.MULTILINE):
            out.add(i)
    return out


def _tensor(x: Any) -> torch.Tensor:
    from tapml.backends.compilers import torch_of

    return torch_of(x.numpy()).clone()


def carve_tvm(model: str, out: str, *, prompt: str | None = None, samples: int = 1, target: str = "llvm",
              progress: bool = False) -> CarveResult:
    """Carve MODEL's TIR kernel calls into the store at `out` (created or extended)."""
    try:
        import tvm
        from tvm import relax
        from tvm.relax.backend.cpu_generic import pipeline as cpu
        from tvm.relax.frontend.torch import from_exported_program
    except ImportError:
        raise TapmlError("--frontend tvm needs Apache TVM: pip install 'tapml[tvm]'") from None
    if samples < 1:
        raise TapmlError(f"--samples must be ≥ 1 (got {samples})")
    prog = forward_program(model, prompt)
    program = prog.export()
    tgt = tvm.target.Target(target)
    if tgt.kind.name != "llvm":
        raise TapmlError(f"--frontend tvm carves on the CPU (llvm targets); got {target!r}")
    try:
        mod = from_exported_program(program)
        with tgt:
            mod = tvm.transform.Sequential(cpu.library_dispatch_passes(tgt) + cpu.legalize_passes(tgt))(mod)
        kernels = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
        ex = tvm.compile(mod, target=tgt, relax_pipeline=tvm.transform.Sequential(
            cpu.dataflow_lower_passes(tgt) + cpu.finalize_passes(tgt)))
    except Exception as e:
        msg = first_line(e)
        raise TapmlError(f"TVM cannot import or build {prog.name}: {msg}") from None
    sources = {n: f.script() for n, f in kernels.items()}
    writes = {n: _static_writes(f) for n, f in kernels.items()}
    hashes = {n: content_hash(torch.frombuffer(bytearray(s.encode()), dtype=torch.uint8)) for n, s in sources.items()}

    model_name, description = f"tvm:{prog.name}", f"TVM Relax VM (llvm) kernels of {prog.description}"
    store = CaseStore.create(out)
    with contextlib.ExitStack() as guard:
        guard.enter_context(store)  # a failure before the recording begins takes back the store if this made it
        sampled = store.sample_counts()
        before_sigs = set(sampled)
        known = store.known_blobs()
        recording = store.record(model_name, description, {"frontend": "tvm", "target": target,
                                                           "samples": samples, "prompt": prompt})
        guard.pop_all()
    blobs: dict[str, torch.Tensor] = {}
    pending: list[PendingSample] = []
    cases: dict[str, CaseSpec] = {}
    state = {"calls": 0, "before": None}

    def put(t: torch.Tensor) -> list:
        values, span = compact(t)
        h = content_hash(values)
        if h not in known and h not in blobs:
            blobs[h] = values.clone()
        meta = tensor_meta(t)
        return [h, {**meta, "span": True} if span else meta]

    def instrument(func: Any, name: str, before: bool, ret: Any, *args: Any) -> int:
        if name not in kernels:
            return 0
        if before:
            state["before"] = [_tensor(a) if isinstance(a, tvm.runtime.Tensor) else a for a in args]
            return 0
        index = state["calls"]
        state["calls"] += 1
        pre = state["before"]
        post = [_tensor(a) if isinstance(a, tvm.runtime.Tensor) else a for a in args]
        changed = {i for i, (a, b) in enumerate(zip(pre, post))
                   if isinstance(a, torch.Tensor) and not torch.equal(a, b)}
        written = sorted(writes[name] | changed)
        src = torch.frombuffer(bytearray(sources[name].encode()), dtype=torch.uint8)
        op = f"tvm.{name}.k{hashes[name][:10]}"
        spec, tensors = encode_args(tuple(pre), {"source": src, "writes": written})
        sig = signature(op, spec, tensors)
        case = cases.get(sig)
        if case is None:
            case = cases[sig] = CaseSpec(sig, op, spec, [tensor_meta(t) for t in tensors])
        case.calls += 1
        if sampled.get(sig, 0) < samples:
            sampled[sig] = sampled.get(sig, 0) + 1
            outs = [post[i] for i in written]
            pending.append(PendingSample(
                sig, f"relax:main/{name}", prog.phase, index, [put(t) for t in tensors],
                {"spec": {"tuple": [{"T": i} for i in range(len(outs))]}, "tensors": [put(t) for t in outs]}))
        return 0

    start = time.perf_counter()
    try:
        with recording:  # the run completes on success; on any failure it is taken back (and the store, if new)
            vm = relax.VirtualMachine(ex, tvm.cpu())
            vm.set_instrument(instrument)
            vm["main"](*[tvm.runtime.tensor(t.detach().contiguous().numpy()) for t in prog.inputs()])
            recording.calls = state["calls"]
            recording.put(blobs, pending, cases)
    except BaseException as e:
        if isinstance(e, (TapmlError, KeyboardInterrupt)):
            raise
        raise TapmlError(f"the TVM VM run of {prog.name} failed: {type(e).__name__}: {e}") from None
    run_id = recording.run_id
    seconds = time.perf_counter() - start
    stats = store.stats()
    store.close()
    new = len(set(cases) - before_sigs)
    return CarveResult(str(out), run_id, model_name, description, state["calls"], len(cases), new, stats["samples"],
                       seconds, stats)


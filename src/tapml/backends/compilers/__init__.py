"""Third-party compilers as targets: what every compiler backend shares.

An ATen call becomes a one-op graph (`capture`: torch.export of a tiny module that calls the overload with the
call's non-tensor arguments baked in); a `CompilerBackend` compiles it with its stack, keeps the artifact on
disk by signature and library versions (`ArtifactCache`, negative results too) and runs it. The same backends
compile a whole exported model (`compile_program`). Nothing here falls back to running the op in PyTorch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.backends import Backend
from tapml.errors import TapmlError, first_line
from tapml.ops import OpCall, Unserializable, decode_value, encode_args, encode_value, mutated_args

# Ops whose result depends on the input's storage layout, which the dense arrays a compiled graph sees lack.
_LAYOUT_OPS = {"aten.as_strided", "aten.as_strided_", "aten.as_strided_scatter", "aten.set_"}
# Namespace of kernel cases carved from a TVM Relax VM (see tapml.frontends.tvm); only the tvm backend runs them.
KERNEL_NAMESPACE = "tvm"

Runner = Callable[[list[Any]], list[Any]]
# Part of every cache key: bump it when what an artifact means changes, so stale entries are not reused.
CACHE_FORMAT = 2


class Unlowerable(Exception):
    """The stack cannot compile this graph; the message is the one-line reason reported as `unsupported`."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' and compilers' chatter (prints, warnings, INFO logs) around one compile."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript", "torch.onnx", "torch._inductor")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# --- the on-disk artifact cache --------------------------------------------------------------------------

def cache_root() -> Path:
    """`$TAPML_CACHE_DIR`, else `~/.cache/tapml`; a TAPML_CACHE_DIR that cannot be a directory is a one-line
    TapmlError naming it, raised when the backend opens, before anything is compiled."""
    from tapml.paths import check_output_dir

    env = os.environ.get("TAPML_CACHE_DIR")
    return check_output_dir(env, "TAPML_CACHE_DIR") if env else Path.home() / ".cache" / "tapml"


class ArtifactCache:
    """Compiled artifacts of one backend, one directory per key: `<root>/<backend>/<key>/meta.json` + files.

    A failed compile is cached too (meta `ok: false` with its reason), so an unsupported op is tried once per
    signature and library versions. Entries are written to a temp dir and renamed into place.
    """

    def __init__(self, backend: str, root: Path | None = None):
        from tapml.paths import check_output_dir

        self.dir = check_output_dir((root or cache_root()) / backend, "the compile cache")

    def get(self, key: str) -> tuple[dict, Path] | None:
        path = self.dir / key
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return meta, path

    def put(self, key: str, build: Callable[[Path], dict]) -> tuple[dict, Path]:
        """Run `build(tmpdir) -> meta` and publish the directory under `key`."""
        tmp = self.dir / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as e:  # full disk, permissions changed since the backend opened
            raise TapmlError(f"cannot write the compile cache {self.dir} ({e.strerror or e}); set "
                             "TAPML_CACHE_DIR to a writable directory") from None
        try:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta))
            final = self.dir / key
            try:
                os.replace(tmp, final)
            except OSError:  # another process published the same key first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
            return meta, final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# --- one-op graphs ---------------------------------------------------------------------------------------

@dataclass
class Capture:
    """A call as a one-op graph: the exported program, its tensor inputs and how outputs map back."""

    program: torch.export.ExportedProgram
    inputs: list[torch.Tensor]
    out_spec: Any  # the op's return value as JSON with {"T": i} for the graph's i-th output
    out_dtypes: list[str]
    whole: bool = False  # a whole model (weights inside) rather than one op


class _OneOp(torch.nn.Module):
    """Calls one OpOverload; tensor arguments come in as inputs, everything else is baked in."""

    def __init__(self, func: torch._ops.OpOverload, spec: Any, mutated: set[int], box: dict):
        super().__init__()
        self.func, self.spec, self.mutated = func, spec, mutated
        self.box = box  # export restores module attributes it sees assigned: results go into this dict

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # An argument the op writes to is cloned first, so the graph is functional and returns the result.
        ts = [t.clone() if i in self.mutated else t for i, t in enumerate(tensors)]
        args = tuple(decode_value(a, ts) for a in self.spec["args"])
        kwargs = {k: decode_value(v, ts) for k, v in self.spec["kwargs"].items()}
        out = self.func(*args, **kwargs)
        leaves: list[torch.Tensor] = []
        try:
            self.box["out_spec"] = encode_value(out, leaves)
        except Unserializable as e:  # a symbolic scalar: no graph can return it
            self.box["error"] = str(e)
            return ()
        return tuple(leaves)


def call_key_material(call: OpCall) -> tuple[str, Any, list]:
    """(op, non-tensor argument spec, input shapes/dtypes): what a compiled one-op graph depends on."""
    spec, tensors = encode_args(call.args, call.kwargs)
    return call.op, spec, [[list(t.shape), str(t.dtype)] for t in tensors]


def precheck(call: OpCall) -> str | None:
    """Reasons known before trying: kernel cases, layout-dependent ops."""
    if call.op.startswith(KERNEL_NAMESPACE + "."):
        return "a TIR kernel carved from a TVM Relax VM: only the tvm backend runs it"
    if call.kind in _LAYOUT_OPS:
        return f"{call.kind} reads the input's storage layout, which a compiled graph's dense tensors lack"
    try:
        returns = call.func()._schema.returns
    except Exception as e:
        return first_line(e)
    if not any("Tensor" in str(r.type) for r in returns):
        kinds = ", ".join(str(r.type) for r in returns) or "nothing"
        return f"{call.kind} returns {kinds}, not a tensor; a compiled graph returns tensors only"
    return None


def capture(call: OpCall) -> Capture:
    """Export `call` as a one-op graph; raises Unlowerable with the reason when torch.export cannot."""
    func = call.func()
    try:
        spec, tensors = encode_args(call.args, call.kwargs)
    except Unserializable as e:
        raise Unlowerable(f"argument cannot be baked into a graph: {e}") from None
    mutated: set[int] = set()
    written = set(mutated_args(func))
    if written:
        vals = [call.kwargs.get(a.name) if a.kwarg_only or i >= len(call.args) else call.args[i]
                for i, a in enumerate(func._schema.arguments) if a.name in written]
        ids = {id(v) for v in pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)}
        mutated = {i for i, t in enumerate(tensors) if id(t) in ids}
    box: dict[str, Any] = {}
    module = _OneOp(func, spec, mutated, box)
    inputs = [t.detach().contiguous() for t in tensors]
    try:
        with quiet():
            program = torch.export.export(module, tuple(inputs), strict=False)
    except Exception as e:
        raise Unlowerable(f"torch.export cannot capture {call.op}: {first_line(e)}") from None
    if "error" in box:
        raise Unlowerable(f"{call.op} returns a {box['error']}; a compiled graph returns tensors only")
    outs = next(n for n in program.graph.nodes if n.op == "output").args[0]
    if not outs:
        raise Unlowerable(f"{call.op} returns no tensor (a Python scalar or nothing); a compiled graph returns "
                          "tensors only")
    dtypes = [str(o.meta["val"].dtype).removeprefix("torch.") for o in outs]
    return Capture(program, inputs, box["out_spec"], dtypes)


def is_core(program: torch.export.ExportedProgram) -> bool:
    """True when every op is functional core ATen: `run_decompositions()` (~0.5 s) would leave it as it is."""
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        if isinstance(t, torch._ops.OpOverload):
            if t._schema.is_mutable or torch.Tag.core not in t.tags:
                return False
        elif getattr(t, "__module__", "") != "_operator":  # operator.getitem is fine; anything else decomposes
            return False
    return True


def rebuild_outputs(out_spec: Any, outs: list[torch.Tensor]) -> Any:
    return decode_value(out_spec, outs)


# --- the backend base -----------------------------------------------------------------------------------

@dataclass
class Compiled:
    """A loaded artifact (or the reason there is none)."""

    ok: bool
    reason: str = ""
    runner: Runner | None = None
    meta: dict | None = None


class CompilerBackend(Backend):
    """A Backend that compiles each op (or a whole model) with a third-party stack and caches the artifact.

    Subclasses set `name` and implement `_versions`, `_compile(capture_or_program, dir) -> dict` (write the
    artifact into `dir`, raise Unlowerable with a reason when the stack cannot) and `_load(dir, meta)`; they may
    refine residency (`upload`, `download`, `is_handle`) and `_supports_kernel`/`_kernel` for extra namespaces.
    """

    # Counters a test can read: compiles done by this process, artifacts loaded from disk.
    compiles = 0
    disk_hits = 0

    def __init__(self, cache_dir: str | None = None):
        self.cache = ArtifactCache(self.name, Path(cache_dir) if cache_dir else None)
        self._memo: dict[str, Compiled] = {}
        self.compiles = 0
        self.disk_hits = 0

    # subclasses -------------------------------------------------------------------------------------------
    def _versions(self) -> dict[str, str]:
        raise NotImplementedError

    def _target(self) -> str:
        """What else the artifact depends on (target, driver, options)."""
        return ""

    def _compile(self, cap: Capture, out: Path) -> dict:
        raise NotImplementedError

    def _load(self, path: Path, meta: dict) -> Runner:
        raise NotImplementedError

    def to_native(self, t: torch.Tensor) -> Any:
        return t

    def from_native(self, x: Any) -> torch.Tensor:
        return x

    # Backend ----------------------------------------------------------------------------------------------
    def upload(self, t: torch.Tensor) -> Any:
        return self.to_native(t.detach().contiguous())

    def download(self, h: Any) -> torch.Tensor:
        return self.from_native(h)

    def supports(self, call: OpCall) -> str | None:
        reason = precheck(call)
        if reason:
            return reason
        compiled = self._compiled(call)
        return None if compiled.ok else compiled.reason

    def handle_meta(self, h: Any) -> tuple[list[int], torch.dtype]:
        """Shape and dtype of a device handle (what a compiled graph's key depends on)."""
        t = self.from_native(h)
        return list(t.shape), t.dtype

    def run(self, call: OpCall) -> Any:
        """Run a call whose tensor leaves are handles (see `upload`); returns handles."""
        def placeholder(x: Any) -> Any:
            if isinstance(x, torch.Tensor) or not self.is_handle(x):
                return x
            shape, dtype = self.handle_meta(x)
            return torch.zeros(shape, dtype=dtype)

        args, kwargs = pytree.tree_map(placeholder, (call.args, call.kwargs))
        compiled = self._compiled(OpCall(call.op, args, kwargs, None, call.provenance))
        if not compiled.ok:
            raise TapmlError(f"{self.name} cannot run {call.op}: {compiled.reason}")
        handles = [x if self.is_handle(x) else self.upload(x)
                   for x in pytree.tree_leaves((call.args, call.kwargs))
                   if self.is_handle(x) or isinstance(x, torch.Tensor)]
        outs = compiled.runner(handles)
        return rebuild_outputs((compiled.meta or {})["out_spec"], list(outs))

    # caching ----------------------------------------------------------------------------------------------
    def key(self, material: Any) -> str:
        return digest(CACHE_FORMAT, self.name, self._target(), self._versions(), material)

    def _compiled(self, call: OpCall) -> Compiled:
        try:
            material = call_key_material(call)
        except Unserializable as e:
            return Compiled(False, f"argument cannot be baked into a graph: {e}")
        key = self.key(material)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self._obtain(key, lambda: capture(call))
        return hit

    def _obtain(self, key: str, make: Callable[[], Any]) -> Compiled:
        """Load `key` from disk, or build it with `make()` (a Capture) and this stack's compiler."""
        found = self.cache.get(key)
        if found is None:
            def build(tmp: Path) -> dict:
                start = time.perf_counter()
                self.compiles += 1
                type(self).compiles += 1
                try:
                    cap = make()
                    meta = self._compile(cap, tmp)
                    meta.update(out_spec=cap.out_spec, out_dtypes=cap.out_dtypes)
                    meta["ok"] = True
                except Unlowerable as e:
                    meta = {"ok": False, "reason": str(e)}
                meta["seconds"] = round(time.perf_counter() - start, 3)
                return meta

            meta, path = self.cache.put(key, build)
        else:
            meta, path = found
            self.disk_hits += 1
            type(self).disk_hits += 1
        if not meta.get("ok"):
            return Compiled(False, meta.get("reason", "compile failed"), meta=meta)
        try:
            runner = self._load(path, meta)
        except Exception as e:  # a damaged or foreign cache entry: report, do not crash the run
            return Compiled(False, f"cached artifact {path} cannot be loaded ({first_line(e)}); delete it",
                            meta=meta)
        return Compiled(True, runner=runner, meta=meta)

    # whole graphs -----------------------------------------------------------------------------------------
    def compile_program(self, program: torch.export.ExportedProgram, inputs: list[torch.Tensor],
                        key: str | None = None) -> Callable[..., list[torch.Tensor]]:
        """Compile a whole exported model; returns f(*tensors) -> list of output tensors (CPU).

        `key` names the cache entry (default: a digest of the graph, the weights and the input shapes).
        Raises TapmlError with the stack's reason when it cannot compile the model.
        """
        key = key or self.key(["program", program_digest(program, inputs)])
        outs = next(n for n in program.graph.nodes if n.op == "output").args[0]
        flat_outs = pytree.tree_leaves(outs)
        cap = Capture(program, list(inputs), {"tuple": [{"T": i} for i in range(len(flat_outs))]},
                      [str(o.meta["val"].dtype).removeprefix("torch.") for o in flat_outs], whole=True)
        compiled = self._memo.get(key) or self._obtain(key, lambda: cap)
        self._memo[key] = compiled
        if not compiled.ok:
            raise TapmlError(f"{self.name} cannot compile the model: {compiled.reason}")

        def run(*tensors: torch.Tensor) -> list[torch.Tensor]:
            handles = [self.upload(t) for t in tensors]
            return [self.download(h) for h in compiled.runner(handles)]

        return run


def program_digest(program: torch.export.ExportedProgram, inputs: list[torch.Tensor]) -> str:
    """Content key of a whole program: graph text, weights and input shapes/dtypes."""
    import xxhash

    h = xxhash.xxh3_128()
    h.update(str(program.graph).encode())
    for name, t in sorted(program.state_dict.items()):
        t = t.detach().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}".encode())
        if t.numel():
            flat = t.reshape(-1)
            h.update((flat.view(torch.uint8) if t.dtype != torch.bool else flat.to(torch.uint8)).numpy().data)
    for name, t in sorted(program.constants.items()):
        if isinstance(t, torch.Tensor):
            h.update(f"{name}|{t.dtype}|{list(t.shape)}".encode())
    for t in inputs:
        h.update(f"{t.dtype}|{list(t.shape)}".encode())
    return h.hexdigest()


def numpy_of(t: torch.Tensor) -> Any:
    """A contiguous numpy array of `t` (bfloat16 through ml_dtypes)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def torch_of(a: Any) -> torch.Tensor:
    import numpy as np

    a = np.asarray(a)
    if not a.flags.c_contiguous:
        a = a.copy()  # np.ascontiguousarray would turn a 0-d array into 1-d
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a.copy() if not a.flags.writeable else a)

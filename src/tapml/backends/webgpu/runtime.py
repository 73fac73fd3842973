"""The WebGPU runtime: device, tensor handles, buffer pool, pipeline and bind-group caches, batched dispatch.

It knows buffers, pipelines and dispatches; it must not know ATen ops (`ops.py`) or WGSL text (`kernels/`).
Dispatches are recorded into one open compute pass and submitted only when the host needs a result back
(a read) or writes a buffer, so a chain of ops costs one submission.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

import torch

from tapml.errors import TapmlError

# --- dtypes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DType:
    """How one logical torch dtype lives in a GPU buffer and how kernels compute with it."""

    torch: torch.dtype
    storage: str  # WGSL element type of the buffer: f32, f16, i32 or u32
    size: int  # bytes per element in the buffer
    ct: str  # compute type kernels load it as: f32, i32 or bool
    host: torch.dtype  # dtype of the bytes moved to and from the buffer
    wrap: str = ""  # WGSL function applied on store ("" when none): bf16 rounding, narrow-int wrapping

    @property
    def is_float(self) -> bool:
        return self.ct == "f32"


# The narrow table (int64 as int32): WebGPU without 64-bit integers, e.g. in a browser.
DTYPES: dict[torch.dtype, DType] = {
    torch.float32: DType(torch.float32, "f32", 4, "f32", torch.float32),
    torch.float16: DType(torch.float16, "f16", 2, "f32", torch.float16),
    # bfloat16 values are exact in f32: kept as f32, rounded to nearest-even bfloat16 on every store.
    torch.bfloat16: DType(torch.bfloat16, "f32", 4, "f32", torch.float32, "bf16r"),
    torch.int64: DType(torch.int64, "i32", 4, "i32", torch.int32),
    torch.int32: DType(torch.int32, "i32", 4, "i32", torch.int32),
    torch.int16: DType(torch.int16, "i32", 4, "i32", torch.int32, "wrap_i16"),
    torch.int8: DType(torch.int8, "i32", 4, "i32", torch.int32, "wrap_i8"),
    torch.uint8: DType(torch.uint8, "i32", 4, "i32", torch.int32, "wrap_u8"),
    torch.bool: DType(torch.bool, "u32", 4, "bool", torch.int32),
}

# With the adapter feature shader-int64, int64 lives as WGSL i64: exact, no range limit.
DTYPES_I64 = {**DTYPES, torch.int64: DType(torch.int64, "i64", 8, "i64", torch.int64)}

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def dtype_reason(dt: torch.dtype, f16: bool) -> str | None:
    """None when tensors of `dt` can live on this device, else why not."""
    if dt == torch.float64:
        return "float64 is not supported: WGSL has no 64-bit floats (the tensor would silently lose precision)"
    if dt.is_complex:
        return f"{dt} is not supported: WGSL has no complex types"
    if dt == torch.float16 and not f16:
        return "float16 needs the adapter feature shader-f16, which this adapter lacks"
    if dt not in DTYPES:
        return f"{dt} is not supported by the WebGPU backend"
    return None


# --- buffers and handles -----------------------------------------------------------------------------------

_uids = count(1)


class _Buf:
    """A GPU buffer with a process-unique id (the bind-group cache keys on ids that are never reused)."""

    __slots__ = ("gpu", "size", "uid")

    def __init__(self, gpu: Any, size: int):
        self.gpu, self.size, self.uid = gpu, size, next(_uids)


class Storage:
    """One allocation; views share it. Its buffer returns to the pool when the last handle drops it."""

    __slots__ = ("__weakref__", "buf", "nbytes", "rt")

    def __init__(self, rt: Runtime, buf: _Buf, nbytes: int):
        self.rt, self.buf, self.nbytes = rt, buf, nbytes

    def __del__(self) -> None:
        rt = getattr(self, "rt", None)
        if rt is not None and self.buf is not None:
            rt._release(self.buf)
            self.buf = None


class WGTensor:
    """A tensor on the device: storage plus shape, strides and storage offset (in elements) and its logical
    dtype (int64 lives narrowed to int32, bool as u32; `dtype` is what the host gets back)."""

    __slots__ = ("dtype", "offset", "shape", "storage", "stride")

    def __init__(self, storage: Storage, shape: Sequence[int], stride: Sequence[int], offset: int,
                 dtype: torch.dtype):
        self.storage, self.shape, self.stride = storage, tuple(shape), tuple(stride)
        self.offset, self.dtype = offset, dtype

    @property
    def info(self) -> DType:
        return self.storage.rt.dtypes[self.dtype]

    @property
    def buf(self) -> _Buf:
        return self.storage.buf

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, d: int | None = None) -> Any:
        return self.shape if d is None else self.shape[d]

    def is_contiguous(self) -> bool:
        return self.stride == contiguous_strides(self.shape) or self.numel() <= 1 or all(
            s == c for n, s, c in zip(self.shape, self.stride, contiguous_strides(self.shape)) if n != 1)

    def meta(self) -> torch.Tensor:
        """An empty meta tensor with this handle's geometry (for torch's own shape/dtype/view logic)."""
        span = 1 + self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
        base = torch.empty((max(span, self.offset + 1),), dtype=self.dtype, device="meta")
        return base.as_strided(self.shape, self.stride, self.offset)

    def view_as(self, shape: Sequence[int], stride: Sequence[int], offset: int,
                dtype: torch.dtype | None = None) -> WGTensor:
        return WGTensor(self.storage, shape, stride, offset, dtype or self.dtype)

    def __repr__(self) -> str:
        return (f"WGTensor({str(self.dtype).removeprefix('torch.')}{list(self.shape)}, stride={list(self.stride)}, "
                f"offset={self.offset})")


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


# --- kernels -----------------------------------------------------------------------------------------------

PARAM_WORDS = 256  # i32 words of the uniform parameter window every kernel sees at binding `len(bindings)`
PARAM_BYTES = PARAM_WORDS * 4
_ARENA_BYTES = 1 << 20


class Kernel:
    """A compiled compute pipeline and the layout of its storage bindings ("r" read, "w" read-write)."""

    __slots__ = ("bindings", "layout", "name", "pipeline")

    def __init__(self, pipeline: Any, layout: Any, bindings: str, name: str):
        self.pipeline, self.layout, self.bindings, self.name = pipeline, layout, bindings, name


@dataclass
class Stats:
    dispatches: int = 0
    submits: int = 0
    reads: int = 0
    writes: int = 0
    compiles: int = 0
    compile_seconds: float = 0.0
    bind_hits: int = 0
    bind_misses: int = 0
    pool_hits: int = 0
    pool_misses: int = 0


def _env_flag(name: str) -> bool:
    """A yes/no environment variable: 1/true/yes or 0/false/no (or unset/empty). Anything else is refused, not
    read as yes: TAPML_WEBGPU_NO_F16=0 turning f16 off would be the opposite of what was asked."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise TapmlError(f"{name} must be 1, true, yes, 0, false or no (or unset); got {os.environ[name]!r}")


GUARD_BYTES = 256  # after every buffer allocated under Runtime.guarded()
GUARD_FILL = bytes([0xA5]) * GUARD_BYTES  # as f32 -2.9e-16, as i32 -1515870811: no kernel writes it by chance


class OutOfBounds(RuntimeError):
    """A kernel wrote past the end of a tensor (a bug of the backend's, found by a guard band)."""


class RuntimeBase:
    """What the runtimes that run these kernels share: size-bucketed reuse of device buffers, guard bands
    (`guarded`), the kernel cache and the launch-plan cache. A subclass calls `_init_caches()`, sets `who`, `stats`, `max_binding` and
    `finalize`, makes and drops buffers and compiles kernels."""

    who = "webgpu"

    def _init_caches(self) -> None:
        self._free: dict[int, list[_Buf]] = {}
        self._pooled_bytes = 0
        self._pool_cap = 1 << 30
        self._kernels: dict[Any, Kernel] = {}  # by specialization key
        self._by_source: dict[str, Kernel] = {}  # by final WGSL: keys that generate the same text share one
        # the kernel library's launch plans by operand layout (kernels.elementwise.Plan; opaque here)
        self.plans: dict[tuple, Any] = {}
        self._guards: list[tuple[Storage, int]] | None = None  # under guarded(): the buffers to check

    def _new_buffer(self, size: int) -> _Buf:
        raise NotImplementedError

    def _drop(self, buf: _Buf) -> None:
        raise NotImplementedError

    def _compile(self, src: str, bindings: str, name: str) -> Kernel:
        raise NotImplementedError

    def kernel(self, key: Any, source: Callable[[], tuple[str, str]], name: str = "") -> Kernel:
        """The pipeline for `key` (a template name plus its specialization), compiled on first use from
        `source()`: its WGSL and its storage bindings' access letters ("r" read, "w" read-write) in order."""
        k = self._kernels.get(key)
        if k is not None:
            return k
        text, bindings = source()
        src = self.finalize(text)
        k = self._by_source.get(src)
        if k is None:
            k = self._compile(src, bindings, name or str(key[0] if isinstance(key, tuple) else key))
            self._by_source[src] = k
        self._kernels[key] = k
        return k

    # --- guard bands: out-of-bounds writes made visible --------------------------------------------------------
    def alloc(self, nbytes: int) -> Storage:
        start = (nbytes + 3) & ~3
        if self._guards is None or Runtime._bucket(start + GUARD_BYTES) > self.max_binding:
            return self._alloc(nbytes)  # (a tensor at the binding limit has no room for a band)
        storage = self._alloc(start + GUARD_BYTES)
        storage.nbytes = nbytes
        self.write(storage, GUARD_FILL, start)
        self._guards.append((storage, start))
        return storage

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """While the block runs, every buffer it allocates is followed by a guard band of GUARD_BYTES holding a
        fixed pattern, checked when the block ends: a kernel that writes past the end of its tensor (an
        off-by-one tail, a wrong last-row index) raises OutOfBounds instead of landing unseen in the buffer's
        slack or being dropped by the driver's robust buffer access. The buffers stay held until the check, so
        none is reused (and its band overwritten by the next owner) inside the block."""
        if self._guards is not None:  # nested: the outer block checks
            yield
            return
        self._guards = []
        ok = False
        try:
            yield
            ok = True
        finally:
            held, self._guards = self._guards, None
            if ok:
                self._check_guards(held)

    def _check_guards(self, held: list[tuple[Storage, int]]) -> None:
        bad = []
        for storage, start in held:
            got = bytes(self.read(storage, start, GUARD_BYTES))
            if got != GUARD_FILL:
                changed = sum(a != b for a, b in zip(got, GUARD_FILL))
                first = next(i for i, (a, b) in enumerate(zip(got, GUARD_FILL)) if a != b)
                bad.append(f"{changed} of the {GUARD_BYTES} bytes after a {storage.nbytes}-byte tensor changed, "
                           f"from {first} bytes past its end")
        if bad:
            raise OutOfBounds(f"{self.who}: a kernel wrote past the end of its tensor: {'; '.join(bad[:3])}")

    def _alloc(self, nbytes: int) -> Storage:
        size = Runtime._bucket(nbytes)
        if size > self.max_binding:
            raise TapmlError(f"{self.who}: a tensor of {nbytes} bytes exceeds the largest storage binding "
                             f"({self.max_binding} bytes)")
        free = self._free.get(size)
        if free:
            self.stats.pool_hits += 1
            buf = free.pop()
            self._pooled_bytes -= size
        else:
            self.stats.pool_misses += 1
            buf = self._new_buffer(size)
        return Storage(self, buf, nbytes)

    def _release(self, buf: _Buf) -> None:
        if self._pooled_bytes + buf.size > self._pool_cap:
            self._drop(buf)
            return
        self._free.setdefault(buf.size, []).append(buf)
        self._pooled_bytes += buf.size


class Runtime(RuntimeBase):
    """One wgpu device and everything cached on it."""

    def __init__(self, power_preference: str = "high-performance", int64: str = "auto"):
        """int64: "native" (WGSL i64, needs shader-int64), "narrow" (int32 with a range check on upload) or
        "auto" (native where the adapter has shader-int64)."""
        import wgpu

        self.wgpu = wgpu
        adapter = wgpu.gpu.request_adapter_sync(power_preference=power_preference)
        if adapter is None:
            raise TapmlError("webgpu: no adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers)")
        self.adapter = adapter
        self.info = dict(adapter.info)
        feats = set(adapter.features)
        self.f16 = "shader-f16" in feats and not _env_flag("TAPML_WEBGPU_NO_F16")
        if int64 not in ("auto", "native", "narrow"):
            raise TapmlError(f"webgpu: int64 mode must be auto, native or narrow (got {int64!r})")
        if int64 == "native" and "shader-int64" not in feats:
            raise TapmlError("webgpu: int64='native' needs the adapter feature shader-int64, which it lacks")
        self.int64_native = int64 == "native" or (int64 == "auto" and "shader-int64" in feats)
        self.dtypes = DTYPES_I64 if self.int64_native else DTYPES
        wanted = [f for f in ("shader-f16", "timestamp-query") if f in feats and (f != "shader-f16" or self.f16)]
        if self.int64_native:
            wanted.append("shader-int64")
        lim = adapter.limits
        keys = ("max-storage-buffer-binding-size", "max-buffer-size", "max-compute-workgroup-storage-size",
                "max-storage-buffers-per-shader-stage", "max-compute-invocations-per-workgroup",
                "max-compute-workgroup-size-x", "max-compute-workgroup-size-y")
        self.device = adapter.request_device_sync(required_features=wanted,
                                                  required_limits={k: lim[k] for k in keys if k in lim})
        self.features = set(wanted)
        self.max_binding = int(lim["max-storage-buffer-binding-size"])
        self.max_groups = int(lim["max-compute-workgroups-per-dimension"])
        self.wg_storage = int(lim["max-compute-workgroup-storage-size"])
        self.uniform_align = max(256, int(lim["min-uniform-buffer-offset-alignment"]))
        self.is_cpu = str(self.info.get("adapter_type", "")).lower() == "cpu"
        self.queue = self.device.queue
        self.finalize: Callable[[str], str] = lambda src: src  # the kernel library's last pass over a source
        self.stats = Stats()
        self._init_caches()
        self._staging: dict[int, Any] = {}
        # every device buffer not dropped, by uid: a handle released inside a reference cycle (an exception's
        # traceback) would otherwise let the GC finalize its wgpu buffer before Storage.__del__ pools it, and
        # the next allocation of its size got a dead buffer
        self._live: dict[int, Any] = {}
        self._layouts: dict[str, tuple[Any, Any]] = {}
        self._groups: OrderedDict[tuple, Any] = OrderedDict()
        self._arena = self.device.create_buffer(size=_ARENA_BYTES, usage=wgpu.BufferUsage.UNIFORM
                                                | wgpu.BufferUsage.COPY_DST)
        self._arena_host = bytearray(_ARENA_BYTES)
        self._arena_used = 0
        self._encoder = None
        self._pass = None
        self._last_pipeline = None
        self._pending = 0
        self._fence: Storage | None = None

    # --- buffers -------------------------------------------------------------------------------------------
    @staticmethod
    def _bucket(nbytes: int) -> int:
        """Size class: 256-byte multiples below 64 KiB, then eight classes per power of two (≤12.5% waste)."""
        n = max(nbytes, 16)
        if n <= 65536:
            return (n + 255) & ~255
        step = 1 << (n.bit_length() - 4)
        return (n + step - 1) // step * step

    def _new_buffer(self, size: int) -> _Buf:
        u = self.wgpu.BufferUsage
        buf = _Buf(self.device.create_buffer(size=size, usage=u.STORAGE | u.COPY_SRC | u.COPY_DST), size)
        self._live[buf.uid] = buf.gpu
        return buf


    def _drop(self, buf: _Buf) -> None:
        self._live.pop(buf.uid, None)  # wgpu frees it once no command or bind group refers to it

    def write(self, storage: Storage, data: Any, offset: int = 0) -> None:
        """Copy host bytes into a buffer. Pending dispatches are submitted first: a queue write runs before
        any command not yet submitted, and a pooled buffer may still be read by one."""
        mv = memoryview(data).cast("B")
        if not len(mv):
            return
        if self._pending or self._encoder is not None:
            self.flush()
        if len(mv) % 4:
            mv = memoryview(bytes(mv) + bytes(4 - len(mv) % 4))
        self.stats.writes += 1
        self.queue.write_buffer(storage.buf.gpu, offset, mv)

    def read(self, storage: Storage, offset: int, nbytes: int) -> memoryview:
        """Bytes [offset, offset+nbytes) of a buffer, after every dispatch recorded so far has run."""
        if nbytes <= 0:
            return memoryview(b"")
        lo = offset & ~3
        size = (offset + nbytes - lo + 3) & ~3
        u = self.wgpu.BufferUsage
        bucket = self._bucket(size)
        staging = self._staging.pop(bucket, None) or self.device.create_buffer(
            size=bucket, usage=u.MAP_READ | u.COPY_DST)
        self._end_pass()
        self._enc().copy_buffer_to_buffer(storage.buf.gpu, lo, staging, 0, size)
        self.flush()
        self.stats.reads += 1
        staging.map_sync(self.wgpu.MapMode.READ, 0, size)
        try:
            data = staging.read_mapped(0, size)
        finally:
            staging.unmap()
        self._staging[bucket] = staging
        return memoryview(data).cast("B")[offset - lo: offset - lo + nbytes]

    # --- kernels -------------------------------------------------------------------------------------------
    def _layout(self, bindings: str) -> tuple[Any, Any]:
        got = self._layouts.get(bindings)
        if got is None:
            w = self.wgpu
            entries = [{"binding": i, "visibility": w.ShaderStage.COMPUTE,
                        "buffer": {"type": w.BufferBindingType.storage if b == "w"
                                   else w.BufferBindingType.read_only_storage}} for i, b in enumerate(bindings)]
            entries.append({"binding": len(bindings), "visibility": w.ShaderStage.COMPUTE,
                            "buffer": {"type": w.BufferBindingType.uniform, "has_dynamic_offset": True,
                                       "min_binding_size": PARAM_BYTES}})
            bgl = self.device.create_bind_group_layout(entries=entries)
            got = (bgl, self.device.create_pipeline_layout(bind_group_layouts=[bgl]))
            self._layouts[bindings] = got
        return got

    def _compile(self, src: str, bindings: str, name: str) -> Kernel:
        t0 = time.perf_counter()
        bgl, pl = self._layout(bindings)
        try:
            module = self.device.create_shader_module(label=name, code=src)
            pipe = self.device.create_compute_pipeline(layout=pl, compute={"module": module, "entry_point": "main"})
        except Exception as e:
            first = str(e).strip().splitlines()
            raise TapmlError(f"webgpu: kernel {name} failed to compile: {first[0] if first else e}") from e
        self.stats.compiles += 1
        self.stats.compile_seconds += time.perf_counter() - t0
        return Kernel(pipe, bgl, bindings, name)

    def _bind_group(self, kernel: Kernel, bufs: Sequence[_Buf]) -> Any:
        key = (kernel.bindings, tuple(b.uid for b in bufs))
        bg = self._groups.get(key)
        if bg is not None:
            self.stats.bind_hits += 1
            self._groups.move_to_end(key)
            return bg
        self.stats.bind_misses += 1
        entries = [{"binding": i, "resource": {"buffer": b.gpu, "offset": 0, "size": b.size}}
                   for i, b in enumerate(bufs)]
        entries.append({"binding": len(bufs), "resource": {"buffer": self._arena, "offset": 0,
                                                            "size": PARAM_BYTES}})
        bg = self.device.create_bind_group(layout=kernel.layout, entries=entries)
        self._groups[key] = bg
        if len(self._groups) > 8192:
            self._groups.popitem(last=False)
        return bg

    def grid(self, groups: int) -> tuple[int, int, int]:
        return grid_for(groups, self.max_groups)

    def dispatch(self, kernel: Kernel, bufs: Sequence[_Buf], params: Sequence[int] | bytes,
                 grid: tuple[int, int, int] | int) -> None:
        """Record one dispatch. `params` are i32 words (floats already bit-cast) for the uniform window."""
        checked = check_dispatch("webgpu", kernel, bufs, params, grid, self.max_groups)
        if checked is None:
            return
        grid, blob = checked
        if self._arena_used + PARAM_BYTES > _ARENA_BYTES:
            self.flush()
        off = self._arena_used
        self._arena_host[off: off + len(blob)] = blob
        self._arena_used = off + ((max(len(blob), 4) + self.uniform_align - 1) // self.uniform_align
                                  * self.uniform_align)
        bg = self._bind_group(kernel, bufs)
        p = self._begin_pass()
        if kernel.pipeline is not self._last_pipeline:
            p.set_pipeline(kernel.pipeline)
            self._last_pipeline = kernel.pipeline
        p.set_bind_group(0, bg, [off])
        p.dispatch_workgroups(*grid)
        self._pending += 1
        self.stats.dispatches += 1

    # --- the command stream --------------------------------------------------------------------------------
    def _enc(self) -> Any:
        if self._encoder is None:
            self._encoder = self.device.create_command_encoder()
        return self._encoder

    def _begin_pass(self) -> Any:
        if self._pass is None:
            self._pass = self._enc().begin_compute_pass()
            self._last_pipeline = None
        return self._pass

    def _end_pass(self) -> None:
        if self._pass is not None:
            self._pass.end()
            self._pass = None
            self._last_pipeline = None

    def flush(self) -> None:
        """Submit everything recorded (parameter arena first: the queue runs the write before the commands)."""
        if self._encoder is None:
            return
        encoder, used = self._encoder, self._arena_used
        self._encoder, self._arena_used, self._pending = None, 0, 0
        try:
            if self._pass is not None:
                self._pass.end()
        finally:
            self._pass, self._last_pipeline = None, None
        if used:
            self.queue.write_buffer(self._arena, 0, memoryview(self._arena_host)[:used])
        self.queue.submit([encoder.finish()])
        self.stats.submits += 1

    def sync(self) -> None:
        """Submit and wait until the device is idle."""
        # A mapped read completes only after all earlier submissions (the queue is ordered); wgpu-py 0.32's
        # on_submitted_work_done_sync does not work with its bundled wgpu-native.
        if self._fence is None:
            self._fence = self.alloc(4)
        self.read(self._fence, 0, 4)

    def trim(self) -> None:
        """Drop pooled buffers and cached bind groups (tests call this between models)."""
        self.flush()
        for bufs in self._free.values():
            for buf in bufs:
                self._drop(buf)
        self._free.clear()
        self._pooled_bytes = 0
        self._groups.clear()


def grid_for(groups: int, max_groups: int) -> tuple[int, int, int]:
    """A 2-D grid of at least `groups` workgroups (kernels linearize wid.x + wid.y * nwg.x)."""
    if groups <= max_groups:
        return (max(groups, 1), 1, 1)
    y = -(-groups // max_groups)
    return (-(-groups // y), y, 1)


def check_dispatch(who: str, kernel: Kernel, bufs: Sequence[_Buf], params: Sequence[int] | bytes,
                   grid: tuple[int, int, int] | int, max_groups: int) -> tuple[tuple[int, int, int], bytes] | None:
    """The grid and packed parameter bytes of a dispatch (None: an empty grid, nothing to run); a clear error
    for a wrong buffer count or too many parameters. Shared by every runtime that runs these kernels."""
    if isinstance(grid, int):
        grid = grid_for(grid, max_groups)
    if grid[0] == 0 or grid[1] == 0 or grid[2] == 0:
        return None
    if len(bufs) != len(kernel.bindings):
        raise TapmlError(f"{who}: kernel {kernel.name} takes {len(kernel.bindings)} buffers, got {len(bufs)}")
    blob = bytes(params) if isinstance(params, (bytes, bytearray)) else struct.pack(f"<{len(params)}i", *params)
    if len(blob) > PARAM_BYTES:
        raise TapmlError(f"{who}: kernel {kernel.name} needs {len(blob)} parameter bytes (> {PARAM_BYTES})")
    return grid, blob

"""The analytic model of one decode step per plan: bytes of weights and KV each device reads, the collectives
it joins (count and volume), the memory it must hold, and the step time these imply on a described device;
`advise` names the fastest plan that fits, and why.

It must stay a model: no tensors are allocated, nothing is launched. Its constants are nominal (data sheets)
unless a measurement calibrates them; every figure it prints says which.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from tapml.errors import TapmlError
from tapml.parallel.models import ModelShape

PLANS = ("single", "tp", "cp", "hybrid")  # simplest first: ties go to the earlier

GB = 1e9
GIB = 1 << 30


@dataclass(frozen=True)
class Device:
    """What one accelerator (or the CPU) offers a decode step."""

    name: str
    memory_bytes: float  # usable memory per device
    hbm_bytes_per_s: float  # peak memory bandwidth
    flops: float  # dense peak of the decode dtype
    link_bytes_per_s: float  # device-to-device, per direction
    collective_latency_s: float  # one small collective (all-reduce of a few KiB)
    bw_efficiency: float = 0.85  # fraction of peak bandwidth streaming reads reach
    host_s_per_layer: float = 2.5e-4  # eager issue time of one decoder layer (Python + kernel launches)
    host_s_per_step: float = 5e-4  # and of the rest of a step (embedding, masks, rotary tables, LM head)
    overlap: bool = True  # the host runs ahead of the device (GPU streams): step = max(host, device)
    kv_bytes_per_s: float | None = None  # the attention kernel's KV read rate, when measured apart from GEMV
    calibrated: str = "nominal"


DEVICES = {
    # H200 SXM: 141 GB HBM3e at 4.8 TB/s, ~989 TFLOP/s dense bf16, NVLink 4 at ~450 GB/s per direction.
    "h200": Device("h200", 141 * GB, 4.8e12, 989e12, 450 * GB, 2.0e-5),
    "h100": Device("h100", 80 * GB, 3.35e12, 989e12, 450 * GB, 2.0e-5),
    # A nominal CPU (gloo over loopback): `measure` and `calibrated` replace the guesses with this machine's.
    "cpu": Device("cpu", 16 * GIB, 10e9, 50e9, 5 * GB, 1.5e-4, bw_efficiency=1.0, host_s_per_layer=1e-3,
                  overlap=False),
}


def device(name: str) -> Device:
    key = name.strip().lower()
    if key not in DEVICES:
        raise TapmlError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    return DEVICES[key]


def measure(torch_device: str = "cpu", dtype: str = "float32", mib: int | None = None,
            repeat: int = 5, shape: ModelShape | None = None) -> dict[str, float]:
    """This machine's figures as a decode step sees them, best of `repeat` each: the weights' read rate from a
    matrix-vector product over `mib` MiB (1 GiB on a GPU, 64 MiB on the CPU), the KV's from `attend` over as
    many bytes of keys and values, and flops from a square matmul."""
    import torch

    dev = torch.device(torch_device)
    dt = getattr(torch, dtype)
    mib = mib or (1024 if dev.type == "cuda" else 64)
    n = int((mib * (1 << 20) / torch.finfo(dt).bits * 8) ** 0.5)
    a = torch.randn(n, n, device=dev).to(dt)
    x = torch.randn(n, device=dev).to(dt)
    m = 4096 if dev.type == "cuda" else 512
    mm = torch.randn(m, m, device=dev).to(dt)

    def best(fn) -> float:
        fn()
        out = float("inf")
        for _ in range(repeat):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            out = min(out, time.perf_counter() - t0)
        return out

    bw = a.numel() * a.element_size() / best(lambda: torch.mv(a, x))
    fl = 2 * m ** 3 / best(lambda: mm @ mm)
    a = x = mm = None  # free the probes (a GiB on a GPU) before the next one
    # the attention kernel's own KV read rate: one new token over `mib` MiB of keys and values, heads laid out
    # as in `shape` (the kernel's efficiency depends on the head size and the query heads per KV head)
    from tapml.parallel.attention import attend

    # The rate is a slope: the same read at `mib` and twice that, so a launch and the host's timing (which a
    # one-shot probe charges to the bytes: 3.2 TB/s read where a decode step's marginal KV ran at 4.3 on an
    # H200) cancel out; a slope that noise makes non-positive falls back to the larger read alone.
    heads, kv_heads, d = (shape.heads, shape.kv_heads, shape.head_dim) if shape else (32, 8, 128)
    ctx = (mib << 20) // (2 * kv_heads * d * torch.finfo(dt).bits // 8)
    q = torch.randn(1, heads, 1, d, device=dev).to(dt)
    timed = {}
    for n in (ctx, 2 * ctx):
        k = torch.randn(1, kv_heads, n, d, device=dev).to(dt)
        v = torch.randn(1, kv_heads, n, d, device=dev).to(dt)
        timed[n] = (2 * k.numel() * k.element_size(), best(lambda k=k, v=v: attend(q, k, v)))
        k = v = None
    (b1, t1), (b2, t2) = timed[ctx], timed[2 * ctx]
    kv = (b2 - b1) / (t2 - t1) if t2 > t1 else b2 / t2
    return {"hbm_bytes_per_s": bw, "flops": fl, "kv_bytes_per_s": kv}


def calibrated(base: Device, measured: dict[str, float]) -> Device:
    """`base` with what was measured on the machine put in (bandwidth as reached, so efficiency 1)."""
    # a measured 0 (no per-step floor) or False (no overlap: the static modes) is a measurement too
    keys = {k: v for k, v in measured.items() if k in Device.__dataclass_fields__ and v is not None}
    if "hbm_bytes_per_s" in keys:
        keys["bw_efficiency"] = 1.0
    return replace(base, **keys, calibrated="measured: " + ", ".join(sorted(keys)))


@dataclass
class PlanCost:
    """One plan's step on one device, and what it implies."""

    plan: str
    devices: int
    weight_bytes: float  # weights read per device per step
    kv_bytes: float  # KV read per device per step
    kv_duplication: float  # copies of each KV head over the devices (tp beyond the KV heads)
    comm_count: int  # collectives per step
    comm_bytes: float  # bytes each device sends per step
    memory_bytes: float  # what must fit per device
    fits: bool
    t_memory: float
    t_compute: float
    t_comm: float
    t_host: float
    t_device: float  # the hardware's time: memory or compute, then the collectives (no host cost)
    t_step: float  # as this package's eager driver runs it: the host's issue time included

    def time(self, eager: bool) -> float:
        return self.t_step if eager else self.t_device

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.t_step

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def _merge_comm(s: ModelShape, batch: int, n: int, form: str) -> tuple[int, float]:
    """(collectives, bytes sent per device) of one attention merge over n ranks: fp32 (out | lse) per head."""
    if n == 1:
        return 0, 0.0
    part = batch * s.heads * (s.head_dim + 1) * 4
    if form == "all-gather":
        return 1, part * (n - 1)
    # tree: all-reduce of the max LSE, then of the sums; a ring all-reduce sends 2(n-1)/n of its buffer
    return 2, 2 * (n - 1) / n * (part + batch * s.heads * 4)


def estimate(plan: str, s: ModelShape, context: int, *, batch: int = 1, devices: int = 1,
             dev: Device = DEVICES["h200"], dtype_bytes: int = 2, new_tokens: int = 0, chunk: int = 2048,
             form: str = "tree") -> PlanCost:
    """The model of one decode step of `plan` at `context` tokens on `devices` devices like `dev`."""
    if plan not in PLANS:
        raise TapmlError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    n = 1 if plan == "single" else devices
    if n < 1:
        raise TapmlError(f"--devices must be ≥ 1 (got {devices})")
    e, d, layers = s.hidden, s.head_dim, s.layers
    heads, kv = s.heads, s.kv_heads
    mlp, head_w = 3 * e * s.mlp, s.vocab * e
    kv_dev, dup, heads_dev = kv, 1.0, heads
    attn_w = e * d * (2 * heads + 2 * kv)
    if plan == "tp":
        heads_dev = heads // n if heads % n == 0 else heads / n
        kv_dev = max(kv / n, 1)
        dup = kv_dev * n / kv
        attn_w = e * d * (2 * heads_dev + 2 * kv_dev)
    mlp_dev = mlp / n if plan in ("tp", "hybrid") else mlp
    head_dev = head_w / n if plan in ("tp", "hybrid") else head_w
    weights = layers * (attn_w + mlp_dev + 2 * e) + head_dev + e + batch * e
    ctx_dev = context / n if plan in ("cp", "hybrid") else context
    kv_tok = 2 * layers * kv_dev * d * dtype_bytes
    kv_read = batch * ctx_dev * kv_tok
    # collectives: tp all-reduces after attention and after the MLP; hybrid after the MLP; both gather logits
    count, sent = 0, 0.0
    act = batch * e * dtype_bytes
    ring = 2 * (n - 1) / n if n > 1 else 0.0
    if plan == "tp" and n > 1:
        count, sent = 2 * layers, 2 * layers * ring * act
    if plan in ("cp", "hybrid") and n > 1:
        c, b = _merge_comm(s, batch, n, form)
        count, sent = layers * c, layers * b
    if plan == "hybrid" and n > 1:
        count, sent = count + layers, sent + layers * ring * act
    if plan in ("tp", "hybrid") and n > 1:
        count, sent = count + 1, sent + (n - 1) * batch * s.vocab / n * dtype_bytes
    # memory: weights, the KV of context + new tokens, and the prefill's working set (a chunk's activations,
    # its fp32 masked block of scores, its MLP intermediate)
    kv_hold = batch * ((context + new_tokens) / (n if plan in ("cp", "hybrid") else 1)) * kv_tok
    work = batch * chunk * (4 * e + 2 * s.mlp / (n if plan in ("tp", "hybrid") else 1)) * 4 \
        + batch * heads_dev * chunk * chunk / (n if plan in ("cp", "hybrid") else 1) * 4
    memory = weights * dtype_bytes + kv_hold + work
    flops = 2 * batch * weights + 4 * batch * layers * heads_dev * d * ctx_dev
    bw = dev.hbm_bytes_per_s * dev.bw_efficiency
    t_mem = weights * dtype_bytes / bw + kv_read / (dev.kv_bytes_per_s or bw)
    t_comp = flops / dev.flops
    t_comm = count * dev.collective_latency_s + sent / dev.link_bytes_per_s
    t_host = layers * dev.host_s_per_layer + dev.host_s_per_step
    t_dev = max(t_mem, t_comp) + t_comm
    t_step = max(t_host, t_dev) if dev.overlap else t_host + t_dev
    return PlanCost(plan, n, weights * dtype_bytes, kv_read, dup, count, sent, memory,
                    memory <= dev.memory_bytes, t_mem, t_comp, t_comm, t_host, t_dev, t_step)


@dataclass
class Advice:
    costs: list[PlanCost]
    best: str | None
    why: str
    eager: bool = False


def _gb(x: float) -> str:
    return f"{x / GIB:.1f} GiB" if x >= 0.1 * GIB else f"{x / (1 << 20):.1f} MiB"


def check(plan: str, s: ModelShape, world: int) -> None:
    """Refuse a plan the model's shape cannot take, with what to change."""
    if plan not in PLANS:
        raise TapmlError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    if plan == "single" and world != 1:
        raise TapmlError(f"plan single runs on one device (got {world}); use tp, cp or hybrid for more")
    if plan in ("tp", "hybrid") and (s.mlp % world or s.vocab % world):
        raise TapmlError(f"{s.name}: MLP width {s.mlp} and vocabulary {s.vocab} must divide by {world} "
                         f"devices for plan {plan}")
    if plan == "tp":
        if s.heads % world:
            raise TapmlError(f"{s.name}: {s.heads} heads do not split over {world} devices; use a divisor or cp")
        if s.kv_heads % world and world % s.kv_heads:
            raise TapmlError(f"{s.name}: {s.kv_heads} KV heads and {world} devices: one must divide the other "
                             "for tp; use cp or hybrid")


def advise(s: ModelShape, context: int, *, batch: int = 1, devices: int = 8, dev: Device = DEVICES["h200"],
           dtype_bytes: int = 2, new_tokens: int = 0, eager: bool = False) -> Advice:
    """Every plan's cost, the fastest that fits on `devices` devices, and why in one paragraph. Plans are
    ranked by the hardware's time (what an engine without host overhead, e.g. under CUDA graphs, gets), or
    with `eager` by the step of this package's eager driver, host issue time included."""
    costs = []
    for plan in PLANS:
        if plan != "single" and devices == 1:
            continue
        try:
            check(plan, s, 1 if plan == "single" else devices)
        except TapmlError:
            continue
        costs.append(estimate(plan, s, context, batch=batch, devices=devices, dev=dev, dtype_bytes=dtype_bytes,
                              new_tokens=new_tokens))
    fitting = sorted((c for c in costs if c.fits), key=lambda c: c.time(eager))
    if not fitting:
        need = min(costs, key=lambda c: c.memory_bytes)
        return Advice(costs, None, eager=eager,
                      why=f"nothing fits: the leanest plan ({need.plan}) needs {_gb(need.memory_bytes)} per "
                          f"device, {dev.name} has {_gb(dev.memory_bytes)}; add devices or cut the context")
    # within 2% of the fastest, the simpler plan (earlier in PLANS: fewer collectives) is named
    close = [c for c in fitting if c.time(eager) <= 1.02 * fitting[0].time(eager)]
    best = min(close, key=lambda c: PLANS.index(c.plan))
    fitting = [best] + [c for c in fitting if c is not best]
    parts = [f"{best.plan}: {best.time(eager) * 1e3:.2f} ms per step predicted; each device reads "
             f"{_gb(best.weight_bytes)} of weights and {_gb(best.kv_bytes)} of KV"
             + (f" and joins {best.comm_count} collectives ({best.t_comm * 1e3:.2f} ms)" if best.comm_count else "")]
    if eager and best.t_host >= best.t_device and dev.overlap:
        parts.append("the eager step is bound by the host issuing kernels, so plans differ little")
    for c in fitting[1:]:
        why = []
        if c.kv_bytes > 1.2 * best.kv_bytes:
            why.append(f"reads {c.kv_bytes / max(best.kv_bytes, 1):.1f}x the KV"
                       + (f" (each KV head held {c.kv_duplication:.0f}x)" if c.kv_duplication > 1 else ""))
        if c.weight_bytes > 1.2 * best.weight_bytes:
            why.append(f"reads {c.weight_bytes / max(best.weight_bytes, 1):.1f}x the weights")
        if c.t_comm > 1.2 * best.t_comm and c.t_comm > 0:
            why.append(f"spends {c.t_comm * 1e3:.2f} ms in {c.comm_count} collectives")
        parts.append(f"{c.plan} at {c.time(eager) * 1e3:.2f} ms" + (f", which {' and '.join(why)}" if why else ""))
    out = [c for c in costs if not c.fits]
    if out:
        parts.append("not fitting: " + ", ".join(f"{c.plan} ({_gb(c.memory_bytes)} per device)" for c in out))
    return Advice(costs, best.plan, "; ".join(parts) + ".", eager)

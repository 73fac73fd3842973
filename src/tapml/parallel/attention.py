"""Local attention of new tokens over one KV shard, returning (out, LSE) with the LSE in fp32 and natural log,
through PyTorch's own SDPA kernels that return the LSE, with a plain fallback for what they refuse.

It must not copy the cache (GQA folds query heads onto their KV head instead of repeating keys), must not hand a
kernel an empty shard or a fully masked row (the CPU flash kernel crashes on the first and reports LSE = 0 for the
second), and trusts no kernel's LSE unchecked: `check_kernels` compares each one with float64.
"""

from __future__ import annotations

import bisect
import math

import torch

from tapml.errors import TapmlError

KERNELS = ("auto", "flash", "efficient", "plain")
_PLAIN_BLOCK = 8192  # keys per block in the plain fallback, so its score matrix stays small at long contexts


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def empty_result(q: torch.Tensor, heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The result over no keys: out 0, LSE −inf (the merge's identity)."""
    b, h, lq, d = q.shape
    h = heads or h
    return (q.new_zeros(b, h, lq, d),
            torch.full((b, h, lq), -math.inf, dtype=_lse_dtype(q), device=q.device))


def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in fp32 (fp64 for fp64) with equal head counts; `mask` [Lq, S] is True where a key is visible.
    Rows with no visible key give out 0, LSE −inf. Keys are taken in blocks, merged exactly."""
    from tapml.parallel.merge import merge

    s_len = k.shape[-2]
    if s_len == 0:
        return empty_result(q)
    if s_len > _PLAIN_BLOCK:
        parts = [plain(q, k[..., i:i + _PLAIN_BLOCK, :], v[..., i:i + _PLAIN_BLOCK, :], scale,
                       None if mask is None else mask[:, i:i + _PLAIN_BLOCK])
                 for i in range(0, s_len, _PLAIN_BLOCK)]
        out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
        return out, lse
    acc = _lse_dtype(q)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    top = torch.nan_to_num(scores.amax(-1, keepdim=True), neginf=0.0)  # a row with no key: exp(−inf) = 0
    e = torch.exp(scores - top)
    total = e.sum(-1)
    # total is 0 (no visible key: out 0, LSE −inf) or ≥ 1 (the max term is exp(0) = 1)
    out = (e @ v.to(acc)) / total.clamp_min(1).unsqueeze(-1)
    return out.to(q.dtype), top.squeeze(-1) + torch.log(total)


def kernel_for(q: torch.Tensor, kernel: str = "auto") -> str:
    """Which kernel runs unmasked attention for this query: flash on the CPU (any float dtype) and for half
    precision on CUDA; the plain path for fp32/fp64 on CUDA (the efficient kernel's LSE is opt-in, see
    SYSTEMS.md: reported wrong for short sequences) and for head sizes the kernels refuse."""
    if kernel not in KERNELS:
        raise TapmlError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    d = q.shape[-1]
    if kernel != "auto":
        return kernel
    if q.device.type == "cpu":
        return "flash"
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256:
        return "flash"
    return "plain"


def unmasked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over every key (equal head counts, at least one key) → (out, LSE)."""
    which = kernel_for(q, kernel)
    if which == "plain":
        return plain(q, k, v, scale)
    if q.device.type == "cpu":
        if which != "flash":
            raise TapmlError(f"attention kernel {which!r} runs on CUDA; on the CPU use flash or plain")
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
        return out, lse
    if which == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return res[0], res[1]
    # efficient: its LSE is padded along the queries (to a multiple of 32 in some versions): keep Lq of it
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return res[0], res[1][..., :q.shape[-2]].float()


def _fold(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, Lq, D] → [B, Hkv, G·Lq, D]: the G query heads that share a KV head become more queries of it
    (exact when every query sees the same keys; no copy of the cache, and more work per key read)."""
    b, hq, lq, d = q.shape
    return q.reshape(b, kv_heads, (hq // kv_heads) * lq, d)


def _unfold(out: torch.Tensor, lse: torch.Tensor, hq: int, lq: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, _, d = out.shape
    return out.reshape(b, hq, lq, d), lse.reshape(b, hq, lq)


def _positions(pos: range, device: torch.device) -> torch.Tensor:
    return torch.arange(pos.start, pos.stop, pos.step, device=device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
           q_pos: range | None = None, k_pos: range | None = None,
           kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries q [B, Hq, Lq, D] over one shard k, v [B, Hkv, S, D] (Hq a multiple of Hkv; S may
    be 0) → (out [B, Hq, Lq, D] in q's dtype, LSE [B, Hq, Lq] fp32 natural log; fp64 for fp64).

    With `q_pos` and `k_pos` (ascending global positions, as ranges) a query sees the keys at or before its
    own position: the keys every query sees run through the kernel unmasked, the rest (at most the chunk being
    prefilled) through the plain path with a mask, and the two parts are merged exactly."""
    from tapml.parallel.merge import merge

    _b, hq, lq, d = q.shape
    hkv, s_len = k.shape[1], k.shape[-2]
    if hq % hkv:
        raise TapmlError(f"{hq} query heads do not group over {hkv} KV heads; use a head count that divides")
    scale = d ** -0.5 if scale is None else scale
    if s_len == 0 or lq == 0:
        return empty_result(q)
    if (q_pos is None) != (k_pos is None):
        raise ValueError("attend takes both q_pos and k_pos, or neither")
    if k_pos is not None and len(k_pos) != s_len:
        raise ValueError(f"k_pos has {len(k_pos)} positions for {s_len} keys")
    free = s_len if q_pos is None else bisect.bisect_right(k_pos, q_pos[0])
    parts = []
    qf = _fold(q, hkv)
    if free:
        parts.append(unmasked(qf, k[..., :free, :], v[..., :free, :], scale, kernel))
    if free < s_len:
        kp, qp = _positions(k_pos[free:], q.device), _positions(q_pos, q.device)
        mask = (kp.unsqueeze(0) <= qp.unsqueeze(1)).repeat(hq // hkv, 1)
        parts.append(plain(qf, k[..., free:, :], v[..., free:, :], scale, mask))
    out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
    return _unfold(out, lse.to(_lse_dtype(q)), hq, lq)


def check_kernels(device: str = "cpu", dtype: torch.dtype = torch.float32, *, kv_len: int = 777,
                  q_len: int = 4, heads: int = 8, kv_heads: int = 2, head_dim: int = 64,
                  seed: int = 0) -> dict[str, dict[str, float | str]]:
    """Each kernel's (out, LSE) against float64 on this device and dtype: max |ΔLSE| and max |Δout|, or why it
    could not run. The benchmark prints it before trusting a kernel; the tests assert it on the CPU."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, q_len, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, kv_heads, kv_len, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(1, kv_heads, kv_len, head_dim, generator=g, dtype=torch.float64)
    # The reference sees the same rounded inputs as the kernel: what is measured is the kernel's own error.
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    scale = head_dim ** -0.5
    ref_out, ref_lse = plain(_fold(q, kv_heads), k, v, scale)
    ref_out, ref_lse = _unfold(ref_out, ref_lse, heads, q_len)
    res: dict[str, dict[str, float | str]] = {}
    for name in ("flash", "efficient", "plain"):
        try:
            out, lse = attend(*(t.to(device, dtype) for t in (q, k, v)), scale, kernel=name)
        except (RuntimeError, TapmlError, NotImplementedError) as e:
            res[name] = {"error": str(e).splitlines()[0][:160]}
            continue
        res[name] = {"lse_err": float((lse.double().cpu() - ref_lse).abs().max()),
                     "out_err": float((out.double().cpu() - ref_out).abs().max()),
                     "lse_dtype": str(lse.dtype).removeprefix("torch.")}
    return res

"""The LSE merge and the local attention with LSE: shards of any number and size (empty ones included) merge
into exactly the attention over all keys, and every kernel's LSE matches float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tapml.errors import TapmlError
from tapml.parallel.attention import attend, check_kernels, plain
from tapml.parallel.merge import merge, merge_group, no_communication

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def _qkv(dtype, s_len, lq=3, heads=8, kv_heads=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, s_len, d, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(2, kv_heads, s_len, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _full(q, k, v):
    """Full attention in float64 by the textbook formula (GQA by repeating KV heads)."""
    g = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(g, 1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 300), min_size=0, max_size=7), dtype=st.sampled_from([torch.float64,
                                                                                            torch.float32]))
def test_merge_of_any_split_equals_full_attention(cuts, dtype):
    # 1–8 shards with arbitrary boundaries: repeated cut points make empty shards, the rest are uneven
    s_len = 300
    q, k, v = _qkv(dtype, s_len)
    bounds = [0, *sorted(cuts), s_len]
    parts = [attend(q, k[:, :, a:b], v[:, :, a:b]) for a, b in itertools.pairwise(bounds)]
    out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
    ref_out, ref_lse = _full(q, k, v)
    assert (out.double() - ref_out).abs().max() <= TOL[dtype]
    assert (lse.double() - ref_lse).abs().max() <= TOL[dtype] * 10  # LSE ~ log(S)+scores: a few ulps of ~6
    assert not torch.isnan(out).any()


def test_interleaved_shards_merge_exactly():
    q, k, v = _qkv(torch.float64, 257, seed=1)
    for n in (1, 2, 3, 5, 8):
        parts = [attend(q, k[:, :, r::n], v[:, :, r::n]) for r in range(n)]
        out, _ = merge([p[0] for p in parts], [p[1] for p in parts])
        assert (out - _full(q, k, v)[0]).abs().max() <= 1e-12


def test_all_empty_shards_give_zero_and_minus_inf_never_nan():
    q, k, v = _qkv(torch.float32, 0)
    parts = [attend(q, k, v) for _ in range(3)]
    out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    # an empty shard beside a full one changes nothing
    q, k, v = _qkv(torch.float64, 40)
    full = attend(q, k, v)
    empty = attend(q, k[:, :, :0], v[:, :, :0])
    out, lse = merge([empty[0], full[0], empty[0]], [empty[1], full[1], empty[1]])
    assert torch.equal(out, full[0]) and torch.equal(lse, full[1])


def test_causal_positions_over_shards_match_masked_attention():
    # a prefill chunk of 10 queries at positions 20..29 over keys 0..29 held in 3 interleaved or contiguous shards
    q, k, v = _qkv(torch.float64, 30, lq=10, seed=2)
    g = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(g, 1) for t in (k, v))
    s = q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.arange(30)[None, :] <= torch.arange(20, 30)[:, None]
    ref = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ vv
    qp = range(20, 30)
    for shards in ([range(r, 30, 3) for r in range(3)], [range(12), range(12, 24), range(24, 30)]):
        parts = [attend(q, k[:, :, p.start:p.stop:p.step], v[:, :, p.start:p.stop:p.step], q_pos=qp, k_pos=p)
                 for p in shards]
        out, _ = merge([p[0] for p in parts], [p[1] for p in parts])
        assert (out - ref).abs().max() <= 1e-12


def test_query_that_sees_no_key_of_a_shard_gets_minus_inf():
    # the CPU flash kernel reports LSE 0 for a fully masked row; attend must not hand it one
    q, k, v = _qkv(torch.float32, 8, lq=2)
    out, lse = attend(q, k, v, q_pos=range(2), k_pos=range(5, 13))
    assert torch.isneginf(lse).all() and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(("dtype", "lse_tol", "out_tol"), [(torch.float64, 1e-12, 1e-12),
                                                           (torch.float32, 1e-5, 1e-6),
                                                           (torch.bfloat16, 2e-2, 2e-2)])
def test_cpu_kernel_lse_is_natural_log_and_matches_float64(dtype, lse_tol, out_tol):
    res = check_kernels("cpu", dtype)
    assert "error" in res["efficient"]  # a CUDA kernel: refused here, with a reason
    for name in ("flash", "plain"):
        assert res[name]["lse_err"] <= lse_tol, (name, res[name])
        assert res[name]["out_err"] <= out_tol, (name, res[name])
        assert res[name]["lse_dtype"] == ("float64" if dtype == torch.float64 else "float32")


def test_plain_fallback_blocks_long_shards_exactly():
    q, k, v = _qkv(torch.float64, 20000, lq=1, heads=2, kv_heads=2, d=16)
    out, lse = plain(q, k, v, 0.25)
    ref = _full(q, k, v)
    assert (out - ref[0]).abs().max() <= 1e-12 and (lse - ref[1]).abs().max() <= 1e-10


def test_group_merge_is_local_without_a_group_and_skipped_without_communication():
    q, k, v = _qkv(torch.float32, 16)
    out, lse = attend(q, k, v)
    assert merge_group(out, lse, None)[0] is out
    with no_communication():
        assert merge_group(out, lse, None, "all-gather")[0] is out


def test_bad_head_grouping_is_a_user_error():
    q, k, v = _qkv(torch.float32, 4, heads=6, kv_heads=4)
    with pytest.raises(TapmlError, match="do not group"):
        attend(q, k, v)

"""The static cache and its one-call chunked attention on the CPU: the same attention as the dynamic path (fp64
to 1e-12), the same greedy tokens and logits as the eager decode, and the errors a user can cause. The CUDA-graph
replay of the same step is exercised by the benchmark on a GPU."""

from __future__ import annotations

import pytest
import torch

from tapml.errors import TapmlError
from tapml.parallel import graphs, models, plans, run
from tapml.parallel.attention import attend, plain

MODEL = "llama3-8b-small"


@pytest.mark.parametrize(("chunks", "per", "tail", "filled"), [(1, 37, 5, 3), (3, 11, 6, 0), (8, 5, 4, 4),
                                                              (5, 0, 3, 2)])
def test_one_call_chunked_attention_equals_whole_attention(chunks, per, tail, filled):
    g = torch.Generator().manual_seed(chunks)
    b, hq, hkv, d = 2, 8, 2, 16
    q = torch.randn(b, hq, 1, d, generator=g, dtype=torch.float64)
    pk = torch.randn(chunks * b, hkv, per, d, generator=g, dtype=torch.float64)
    pv = torch.randn(chunks * b, hkv, per, d, generator=g, dtype=torch.float64)
    tk = torch.randn(b, hkv, tail, d, generator=g, dtype=torch.float64)
    tv = torch.randn(b, hkv, tail, d, generator=g, dtype=torch.float64)
    visible = torch.arange(tail) < filled
    # the whole cache as one sequence: chunk 0..N-1 of each row, then the visible tail
    whole_k = torch.cat([pk.reshape(chunks, b, hkv, per, d).permute(1, 2, 0, 3, 4).reshape(b, hkv, -1, d),
                         tk[:, :, :filled]], dim=2)
    whole_v = torch.cat([pv.reshape(chunks, b, hkv, per, d).permute(1, 2, 0, 3, 4).reshape(b, hkv, -1, d),
                         tv[:, :, :filled]], dim=2)
    for merge in ("eager",):  # the compiled one is the benchmark's, on CUDA (compiling costs CI ~20 s a shape)
        out, lse = graphs.chunked_attention(q, pk, pv, chunks, tk, tv, visible, d ** -0.5,
                                            finish=graphs.finish_fn(merge))
        want_out, want_lse = attend(q, whole_k, whole_v, d ** -0.5, kernel="plain")
        assert out.shape == (b, hq, 1, d) and lse.dtype == torch.float64
        assert (out - want_out).abs().max() <= 1e-12
        if whole_k.shape[2]:
            assert (lse - want_lse).abs().max() <= 1e-12
        else:  # nothing visible: out 0, LSE −inf, no NaN
            assert torch.isneginf(lse).all() and (out == 0).all()


def test_tail_mask_hides_what_is_not_visible():
    q = torch.randn(1, 2, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])
    out, _ = plain(q, k, v, 0.3, mask.unsqueeze(0))
    keep = mask.nonzero()[:, 0]
    want, _ = plain(q, k[:, :, keep], v[:, :, keep], 0.3)
    assert (out - want).abs().max() <= 1e-12


def _eager_tokens(model, ids, steps, dtype):
    cache = plans.build("single", models.shape(MODEL), dtype=dtype).make_cache()
    with torch.no_grad():
        logits = run.forward(model, ids, cache)
        tok = logits.argmax(-1, keepdim=True)
        toks, kept = [], []
        for _ in range(steps):
            logits = run.forward(model, tok, cache)
            tok = logits.argmax(-1, keepdim=True)
            toks.append(tok[:, 0].tolist())
            kept.append(logits)
    return toks, kept


@pytest.mark.parametrize("chunks", [1, 4])
def test_static_decode_matches_the_dynamic_decode(chunks):
    """The static step (prefix in `chunks` chunks, 45 tokens: a remainder for 4 chunks lands in the tail) gives
    the eager decode's greedy tokens, and its logits within fp64 rounding of it."""
    steps = 12
    s = models.shape(MODEL)
    ids = models.context_ids(45, s.vocab)
    plan = plans.build("single", s, dtype=torch.float64)
    want, want_logits = _eager_tokens(plan.model, ids, steps, torch.float64)
    dyn = plan.make_cache()
    with torch.no_grad():
        first = run.forward(plan.model, ids, dyn).argmax(-1, keepdim=True)
        static = graphs.StaticCache.from_cache(dyn, 45, chunks=chunks, steps=steps)
        assert static.start == 45 % chunks and static.layers[0].pk.shape[0] == chunks
        dec = graphs.Decoder(plan.model, static, first, steps)
        for i in range(steps):
            dec.step()
            assert (dec.logits - want_logits[i]).abs().max() <= 1e-10, f"step {i}"
    assert dec.tokens() == want
    with pytest.raises(TapmlError, match="sized for"):
        dec.step()


def test_static_tiles_like_the_eager_fill():
    """A context longer than the prefill is filled by repeating the held tokens at the same positions as
    ShardedLayer.fill_synthetic, so both paths decode the same tokens (what the GPU benchmark compares)."""
    s = models.shape(MODEL)
    ids = models.context_ids(32, s.vocab)
    plan = plans.build("single", s, dtype=torch.float64)
    steps, context = 6, 100
    with torch.no_grad():
        dyn = plan.make_cache()
        first = run.forward(plan.model, ids, dyn).argmax(-1, keepdim=True)
        static = graphs.StaticCache.from_cache(dyn, context, chunks=3, steps=steps)
        dyn.fill_synthetic(context)
        tok, want = first, []
        for _ in range(steps):
            tok = run.forward(plan.model, tok, dyn).argmax(-1, keepdim=True)
            want.append(tok[:, 0].tolist())
        dec = graphs.Decoder(plan.model, static, first, steps)
        for _ in range(steps):
            dec.step()
    assert dec.tokens() == want


def test_static_cache_refuses_what_it_cannot_hold():
    s = models.shape(MODEL)
    plan = plans.build("single", s)
    dyn = plan.make_cache(shards=2)
    with torch.no_grad():
        run.forward(plan.model, models.context_ids(8, s.vocab), dyn)
    with pytest.raises(TapmlError, match="one shard per process"):
        graphs.StaticCache.from_cache(dyn, 8)
    with pytest.raises(TapmlError, match="unknown merge"):
        graphs.merge_fn("fast")

"""The sharded KV cache in one process: placements, transformers' generate() running unchanged over it, the
decode driver's chunked prefill, and the errors a user can cause."""

from __future__ import annotations

import pytest
import torch

from tapml.compare import compare_tensor
from tapml.errors import TapmlError
from tapml.parallel import models, plans, run
from tapml.parallel.cache import CACHE_KW, Placement, ShardedKVCache, register

MODEL = "llama3-8b-small"
GEN = dict(do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=2, temperature=None, top_p=None, top_k=None,
           return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("kind", ["interleaved", "contiguous"])
def test_placement_takes_every_token_once_in_order(kind):
    p = Placement(kind, 3, block=7)
    owners: list[int] = [-1] * 30
    for start, count in ((0, 5), (5, 1), (6, 13), (19, 11)):  # chunks of any size, as prefill then decode
        for shard in range(3):
            sl, pos = p.take(shard, start, count)
            assert list(range(start, start + count))[sl] == list(pos)
            for i in pos:
                assert owners[i] == -1
                owners[i] = shard
    assert owners == [p.owner(i) for i in range(30)]
    if kind == "contiguous":  # blocks of 7, the last shard takes the overflow
        assert owners[:21] == [0] * 7 + [1] * 7 + [2] * 7 and set(owners[21:]) == {2}
    else:
        assert owners[:6] == [0, 1, 2, 0, 1, 2]


@pytest.fixture(scope="module")
def reference():
    """The stock model (sdpa attention, DynamicCache) in fp32, and the same weights in fp64 as the oracle."""
    ids = models.context_ids(45, models.shape(MODEL).vocab)
    res = {}
    for dtype in (torch.float32, torch.float64):
        m = models.build(MODEL, dtype=dtype)
        out = m.generate(input_ids=ids, max_new_tokens=32, min_new_tokens=32, **GEN)
        res[dtype] = out
    return ids, res


def _judge(logits: list[torch.Tensor], reference) -> None:
    ref, oracle = reference[1][torch.float32], reference[1][torch.float64]
    for i, (got, want, g64) in enumerate(zip(logits, ref.logits, oracle.logits)):
        v = compare_tensor(got, want, g64)
        assert v.passed, f"step {i}: {v.reason} {v.metrics}"


@pytest.mark.parametrize(("shards", "placement", "capacity"), [(3, "interleaved", None), (4, "contiguous", 200)])
def test_generate_runs_unchanged_over_a_sharded_cache(reference, shards, placement, capacity):
    ids, _ = reference
    m = models.build(MODEL)
    m.set_attn_implementation(register())
    cache = ShardedKVCache.for_model(m, shards, placement=placement, capacity=capacity)
    out = m.generate(input_ids=ids, **{CACHE_KW: cache}, max_new_tokens=32, min_new_tokens=32, **GEN)
    assert torch.equal(out.sequences, reference[1][torch.float32].sequences)
    _judge(out.logits, reference)
    lengths = cache.all_lengths()
    assert sum(lengths) == 45 + 31  # the last token is generated, never fed back
    if placement == "contiguous":  # blocks of 50: the last two shards stay empty, the merge copes
        assert lengths == [50, 26, 0, 0]


def test_driver_chunked_prefill_then_decode_matches_generate(reference):
    # the timing loop: prefill in chunks of 16 (masked blocks across chunk edges), then single-token steps
    _ids, res = reference
    job = run.DecodeJob(MODEL, context=45, chunk=16, steps=29, warmup=2, shards=3, comm_steps=0,
                        placement="interleaved")
    r = run.run(job)
    want = res[torch.float32].sequences[0, 45:].tolist()
    assert [t[0] for t in r["tokens"]] == want
    assert len(r["step_s"]) == 29 and r["median_s"] > 0
    assert r["predicted"]["nominal"]["plan"] == "single" and r["fill"] == "prefill"


def test_synthetic_fill_grows_every_shard_to_its_share():
    job = run.DecodeJob(MODEL, context=300, chunk=64, prefill_max=64, fill="tile", steps=2, warmup=0, shards=3,
                        comm_steps=0)
    r = run.run(job)
    assert r["fill"] == "tile(64 real)"
    assert sum(r["shard_lengths"]) == 300 + 2 and max(r["shard_lengths"]) - min(r["shard_lengths"]) <= 1


@pytest.mark.parametrize("plan", ["single", "tp", "cp", "hybrid"])
def test_every_plan_on_one_process_is_the_stock_model(reference, plan):
    ids, res = reference
    p = plans.build(plan, models.shape(MODEL))
    out = p.model.generate(input_ids=ids, **{CACHE_KW: p.make_cache()}, max_new_tokens=32, min_new_tokens=32, **GEN)
    assert torch.equal(out.sequences, res[torch.float32].sequences)
    assert p.world == 1 and sum(x.numel() for x in p.model.parameters()) == models.shape(MODEL).params()


def test_user_errors_are_one_line():
    m = models.build(MODEL)
    m.set_attn_implementation(register())
    ids = models.context_ids(8, 4096, batch=2)
    with pytest.raises(TapmlError, match="ShardedKVCache"):
        m(input_ids=ids, use_cache=False)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(TapmlError, match="unpadded"):
        m(input_ids=ids, attention_mask=mask, **{CACHE_KW: ShardedKVCache.for_model(m, 2)})
    with pytest.raises(TapmlError, match="capacity"):
        ShardedKVCache(2, 2, placement="contiguous")
    with pytest.raises(TapmlError, match="placement"):
        ShardedKVCache(2, 2, placement="striped")
    with pytest.raises(TapmlError, match="merge form"):
        ShardedKVCache(2, 2, form="ring")
    with pytest.raises(TapmlError, match="must divide by 3"):
        plans.check("tp", models.shape(MODEL), 3)
    plans.check("cp", models.shape(MODEL), 3)  # cache parallelism takes any number of ranks
    odd = models.ModelShape("odd", 2, 96, 12, 4, 8, 120, 120)
    with pytest.raises(TapmlError, match="do not split"):
        plans.check("tp", odd, 5)
    with pytest.raises(TapmlError, match="one must divide"):
        plans.check("tp", odd, 6)
    with pytest.raises(TapmlError, match="token count"):
        models.parse_tokens("12q")
    assert models.parse_tokens("128k") == 131072 and models.parse_tokens("1M") == 1 << 20


def test_long_context_is_the_shipped_prompts_and_a_carried_tokenizer_gives_the_same(tmp_path, monkeypatch):
    import shutil

    from tapml.zoo import minilm_dir

    ids = models.context_ids(2000, 4096, batch=2)
    assert ids.shape == (2, 2000) and not torch.equal(ids[0], ids[1])
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / f, tmp_path / f)
    monkeypatch.setenv("TAPML_TOKENIZER_DIR", str(tmp_path))
    models._prompt_stream.cache_clear()
    try:
        assert torch.equal(models.context_ids(2000, 4096, batch=2), ids)
    finally:
        models._prompt_stream.cache_clear()


def test_zoo_entries_count_and_build():
    specs = {s.name: s for s in models.zoo_specs()}
    assert set(specs) == set(models.names())
    assert specs["llama3-8b"].count() == models.shape("llama3-8b").params()  # counted without building 8B
    m = specs[MODEL].build()
    assert sum(p.numel() for p in m.parameters()) == models.shape(MODEL).params()

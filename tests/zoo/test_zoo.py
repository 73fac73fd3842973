"""The model zoo: real architectures, real weights where promised, realistic inputs, carved runs that replay."""

import collections

import numpy as np
import pytest
import torch
from conftest import ZOO_SAMPLE, zoo_sample

from tapml import zoo
from tapml.errors import TapmlError
from tapml.recorder import carve
from tapml.replay import run_tests
from tapml.store import CaseStore

NAMES = zoo.names()


def test_catalog_covers_the_required_architectures():
    specs = zoo.catalog()
    archs = {s.architecture for s in specs}
    assert len(archs) == len(specs) >= 29
    for need in ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM",
                 "GPT2LMHeadModel", "GPTNeoXForCausalLM", "BertModel", "ViTForImageClassification",
                 "T5ForConditionalGeneration"]:
        assert need in archs
    assert {"GemmaForCausalLM", "Gemma2ForCausalLM"} & archs
    assert {"OPTForCausalLM", "FalconForCausalLM"} & archs
    assert {"StableLmForCausalLM", "OlmoForCausalLM"} & archs
    assert {"MixtralForCausalLM", "Qwen2MoeForCausalLM"} & archs
    assert {"ResNetForImageClassification", "ConvNextForImageClassification"} & archs
    assert {"DeepseekV3ForCausalLM", "Mamba2ForCausalLM", "JambaForCausalLM", "Gemma3ForCausalLM",
            "GptOssForCausalLM", "WhisperForConditionalGeneration", "CLIPModel",
            "Qwen2VLForConditionalGeneration"} <= archs
    assert {s.kind for s in specs} == set(zoo.KINDS)
    assert len(NAMES) == len(set(NAMES))
    assert all(s.parameters() > 10_000 for s in specs)


def test_get_accepts_zoo_prefix_and_rejects_unknown():
    assert zoo.get("zoo:llama") is zoo.get("llama")
    with pytest.raises(TapmlError, match="unknown zoo model 'nope'"):
        zoo.get("nope")


def test_weights_are_fixed_seed_and_build_is_repeatable():
    a, b = zoo.get("qwen2").build(), zoo.get("qwen2").build()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert not a.training


def test_prompts_are_varied_and_real():
    ps = zoo.prompts()
    texts = [p["text"] for p in ps]
    lengths = [len(zoo.token_ids([t], 32000)[0]) for t in texts]
    assert len(ps) >= 10 and max(lengths) >= 4 * min(lengths)
    assert any("def " in t for t in texts)  # code
    assert any(any(c.isdigit() for c in t) for t in texts)  # numbers
    assert any(any(ord(c) > 0x2000 for c in t) for t in texts)  # non-Latin scripts
    # A real WordPiece vocabulary: known words get their BERT ids, ids map into a model's vocabulary.
    tok = zoo.tokenizer()
    assert tok.convert_ids_to_tokens(tok("hello world", add_special_tokens=False)["input_ids"]) == ["hello", "world"]
    ids = zoo.token_ids(texts, 4096)
    assert all(4 <= i < 4096 for row in ids for i in row)


def test_minilm_has_its_real_weights():
    """Real sentence embeddings put paraphrases together; random weights would not."""
    model = zoo.get("minilm").build()
    enc = zoo.tokenizer()(["A cat is sitting on the mat.", "The cat sits on a mat.",
                           "Stock markets fell sharply on Tuesday."], padding=True, return_tensors="pt")
    with torch.no_grad():
        e = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    sim = e @ e.T
    assert sim[0, 1] > 0.8 and sim[0, 2] < 0.3


def test_vision_inputs_are_real_photos_resized_and_normalized():
    photos = zoo.photos()
    assert photos["astronaut"].shape == (3, 512, 512) and photos["astronaut"].dtype == torch.uint8
    x = zoo.image_batch(64)
    assert x.shape == (2, 3, 64, 64)
    assert -3 < float(x.min()) < -1 and 1 < float(x.max()) < 3  # ImageNet-normalized, not blank
    assert not torch.allclose(x[0], x[1])


def test_llm_workload_is_generate_with_exact_steps(tmp_path):
    w = zoo.get("gpt2").prepare(max_new_tokens=3)
    assert w.generates
    calls = []
    hook = w.model.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        out = w.run()
    hook.remove()
    assert len(calls) == 3  # prefill + 2 decode steps: the KV cache is used
    assert out.shape[0] == 2  # two prompts of different lengths, left-padded


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_phases_are_carved(tmp_path, name):
    carve(name, tmp_path / "s", max_new_tokens=3, progress=False)
    store = CaseStore.open(tmp_path / "s")
    phases = collections.Counter(smp.provenance.phase for c in store.cases() for smp in store.samples(c.id))
    assert {"prefill", "decode:0", "decode:1"} <= set(phases)
    store.close()


def test_user_prompt_replaces_the_shipped_ones():
    w = zoo.get("llama").prepare(prompt="Bonjour", max_new_tokens=1)
    assert "your prompt" in w.description and "1×" in w.description


def test_vision_model_refuses_a_prompt():
    with pytest.raises(TapmlError, match="vision model"):
        zoo.get("resnet").prepare(prompt="hi")


@pytest.mark.parametrize("name", zoo_sample())
def test_every_case_of_the_zoo_sample_passes_on_torch(zoo_stores, name):
    result = run_tests(str(zoo_stores[name]), "torch", progress=False)
    totals = result.totals()
    assert totals["cases"] > 10
    assert totals["pass"] == totals["cases"], [r.as_dict() for r in result.results if r.status != "pass"][:3]


def test_the_sample_the_suite_replays_covers_every_kind_and_the_new_families():
    sample = ZOO_SAMPLE
    assert set(sample) <= set(NAMES) and len(sample) == len(set(sample)) < len(NAMES)
    assert {zoo.get(n).kind for n in sample} == set(zoo.KINDS)
    assert {"deepseek_v3", "mamba2", "jamba", "gpt_oss", "whisper", "clip", "qwen2_vl"} <= set(sample)


def test_the_census_counts_each_architecture_once_across_the_tables():
    from tapml.zoo.census import architectures, entries

    archs = architectures()
    rows = entries()
    assert {t for t, _, _ in rows} == {"zoo", "placement", "graphpipe", "parallel"}
    assert sum(len(v) for v in archs.values()) == len(rows) > len(archs)
    # the zoo's Llama, the placement Llama and the decode shapes are one architecture; so are mmt2 and mmt4
    assert {"zoo:llama", "placement:llama", "parallel:llama3-8b"} <= set(archs["LlamaForCausalLM"])
    assert archs["MMT"] == ["graphpipe:mmt2", "graphpipe:mmt4"]
    assert set(archs["BertModel"]) == {"zoo:minilm", "placement:bert"}
    assert len(archs) >= len({s.architecture for s in zoo.catalog()}) + 8


# --- the newer architectures: each mechanism really runs on the shipped inputs -----------------------------

def test_windows_chunks_and_routing_are_smaller_than_the_prompt():
    width = zoo.get("gemma3").prepare(max_new_tokens=1).description
    assert "2×24 tokens" in width  # the longer shipped prompt
    for name in ("gemma3", "gpt_oss"):
        cfg = zoo.get(name).build().config
        assert cfg.sliding_window < 24 and set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert zoo.get("mamba2").build().config.chunk_size * 2 < 24  # the chunked scan runs over several chunks
    ds = zoo.get("deepseek_v3").build()
    assert type(ds.model.layers[0].mlp).__name__ == "DeepseekV3MLP"  # first_k_dense_replace: one dense layer
    assert type(ds.model.layers[1].mlp).__name__ == "DeepseekV3MoE"
    assert ds.config.q_lora_rank and ds.config.kv_lora_rank and ds.config.n_group > ds.config.topk_group > 1
    jamba = zoo.get("jamba").build()
    assert [type(layer).__name__ for layer in jamba.model.layers] == ["JambaMambaDecoderLayer",
                                                                     "JambaAttentionDecoderLayer"]


def test_mamba2_prefill_scans_in_chunks_and_decode_takes_the_recurrent_path():
    from torch.overrides import TorchFunctionMode

    w = zoo.get("mamba2").prepare(max_new_tokens=2)
    steps = []
    hook = w.model.register_forward_pre_hook(lambda m, a: steps.append(collections.Counter()))

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if steps:
                steps[-1][getattr(func, "__name__", "")] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        w.run()
    hook.remove()
    prefill, decode = steps
    assert prefill["cumsum"] > 0 and decode["cumsum"] == 0  # the SSD chunk scan, then the state update
    assert decode["softplus"] > 0


def test_moe_layers_route_tokens_to_several_experts():
    for name, least in (("deepseek_v3", 6), ("gpt_oss", 4), ("jamba", 4)):
        w = zoo.get(name).prepare(max_new_tokens=1)
        chosen = set()
        for m in w.model.modules():
            if type(m).__name__.endswith("Experts"):
                m.register_forward_hook(lambda mod, args, out, seen=chosen: seen.update(args[1].flatten().tolist()))
        with torch.no_grad():
            w.run()
        assert len(chosen) >= least, (name, chosen)


def test_whisper_hears_the_prompts_spoken_by_espeak_ng():
    short, story = zoo.speech(["Hello", zoo.prompt_texts(None)[0]])
    for x in (short, story):
        assert x.dtype == np.float32 and np.abs(x).max() <= 1
        assert np.sqrt(np.mean(x ** 2)) > 0.01  # speech, not silence
    assert len(story) > 3 * len(short) > zoo.SPEECH_RATE // 4  # longer text, longer speech, at 16 kHz
    assert np.array_equal(zoo.speech(["Hello"])[0], short)  # deterministic
    from tapml.zoo import emerging

    model = zoo.get("whisper").build()
    texts, audio, feats = emerging.speech_inputs(model, None)
    assert texts == zoo.prompt_texts(None) and len(audio) == 2
    assert feats.shape == (2, model.config.num_mel_bins, 2 * model.config.max_source_positions)
    voiced = (feats > feats.amin(dim=(1, 2), keepdim=True) + 0.1).float().mean(dim=(1, 2))
    assert voiced[0] > voiced[1] > 0.05  # the longer prompt fills more of the window
    assert "espeak-ng" in zoo.get("whisper").prepare(max_new_tokens=1).description


def test_speech_without_espeak_ng_says_to_run_make_setup(monkeypatch):
    from tapml.zoo import inputs

    monkeypatch.setattr(inputs.shutil, "which", lambda exe: None)
    inputs._spoken.cache_clear()
    with pytest.raises(TapmlError, match="espeak-ng is missing.*make setup") as e:
        zoo.speech(["a sentence never spoken before in this test run"])
    assert "\n" not in str(e.value)
    inputs._spoken.cache_clear()


def test_clip_compares_the_real_photos_with_their_captions():
    from tapml.zoo import emerging

    model = zoo.get("clip").build()
    x = emerging.contrastive_inputs(model, None)
    cfg = model.config.text_config
    assert x["pixel_values"].shape == (3, 3, 64, 64) and not torch.allclose(x["pixel_values"][0], x["pixel_values"][1])
    ids, mask = x["input_ids"], x["attention_mask"]
    assert (ids[:, 0] == cfg.bos_token_id).all()
    assert [int(r.tolist().index(cfg.eos_token_id)) for r in ids] == [int(m.sum()) - 1 for m in mask]
    assert ids[0, 1:-1].tolist()[:2] == zoo.token_ids([zoo.CAPTIONS["astronaut"]], cfg.vocab_size - 2)[0][:2]
    with torch.no_grad():
        assert model(**x).logits_per_image.shape == (3, 3)


def test_qwen2_vl_sees_real_photos_through_its_image_tokens():
    from tapml.zoo import emerging

    model = zoo.get("qwen2_vl").build()
    x = emerging.vlm_inputs(model, None)
    sp = emerging.qwen2vl_special(model.config.text_config.vocab_size)
    grids, merge = x["image_grid_thw"], model.config.vision_config.spatial_merge_size
    assert grids.tolist() == [[1, 8, 8], [1, 6, 8]]  # the astronaut is square, the cat photo is wider
    n_image = (x["input_ids"] == sp["image"]).sum(1)
    assert n_image.tolist() == [int(g.prod()) // merge ** 2 for g in grids]
    assert torch.equal(x["mm_token_type_ids"].bool(), x["input_ids"] == sp["image"])
    assert ((x["input_ids"] == sp["vision_start"]).sum(1) == 1).all()
    px = x["pixel_values"]  # one row per patch: channels × temporal × 14 × 14
    assert px.shape == (int(grids.prod(1).sum()), 3 * 2 * 14 * 14)
    assert px.std() > 0.5 and -2 < float(px.min()) < -1 and 1.5 < float(px.max()) < 2.5  # normalized photos
    pos, _ = model.model.get_rope_index(x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
                                        image_grid_thw=grids, attention_mask=x["attention_mask"])
    assert not torch.equal(pos[1], pos[2])  # M-RoPE: image tokens get height and width positions

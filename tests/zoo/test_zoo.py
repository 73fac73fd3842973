"""The model zoo: real architectures, real weights where promised, realistic inputs, carved runs that replay."""

import collections

import pytest
import torch

from tapml import zoo
from tapml.errors import TapmlError
from tapml.recorder import carve
from tapml.replay import run_tests
from tapml.store import CaseStore

NAMES = zoo.names()


def test_catalog_covers_the_required_architectures():
    specs = zoo.catalog()
    archs = {s.architecture for s in specs}
    assert len(archs) >= 16
    for need in ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM",
                 "GPT2LMHeadModel", "GPTNeoXForCausalLM", "BertModel", "ViTForImageClassification",
                 "T5ForConditionalGeneration"]:
        assert need in archs
    assert {"GemmaForCausalLM", "Gemma2ForCausalLM"} & archs
    assert {"OPTForCausalLM", "FalconForCausalLM"} & archs
    assert {"StableLmForCausalLM", "OlmoForCausalLM"} & archs
    assert {"MixtralForCausalLM", "Qwen2MoeForCausalLM"} & archs
    assert {"ResNetForImageClassification", "ConvNextForImageClassification"} & archs
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


@pytest.mark.parametrize("name", NAMES)
def test_every_case_of_every_zoo_model_passes_on_torch(zoo_stores, name):
    result = run_tests(str(zoo_stores[name]), "torch", progress=False)
    totals = result.totals()
    assert totals["cases"] > 10
    assert totals["pass"] == totals["cases"], [r.as_dict() for r in result.results if r.status != "pass"][:3]

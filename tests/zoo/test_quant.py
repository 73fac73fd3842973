"""GGUF Q4_0 weights (tapml.zoo.quant): llama.cpp's byte layout read back bit for bit, the zoo's LLMs quantized
close to their float selves, and a carve that holds the dequantize ops a target must run."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tapml import zoo
from tapml.errors import TapmlError
from tapml.recorder import carve
from tapml.replay import run_tests
from tapml.store import CaseStore
from tapml.zoo.inputs import left_pad, prompt_texts, token_ids
from tapml.zoo.quant import Q4_0Linear, quantize_q4_0


def _weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * 0.02
    w[0, :32] = 0.0  # an all-zero block: d = 0
    w[1, 5] = 3.0  # one outlier sets its block's scale
    w[2, 40] = -3.0  # a negative extreme: d < 0
    return w


def test_q4_0_layout_is_llama_cpps_and_dequantizes_as_gguf_does_bit_for_bit():
    w = _weight()
    layer = Q4_0Linear.from_weight(w, torch.zeros(48))
    packed = quantize(w.numpy(), GGMLQuantizationType.Q4_0)
    assert layer.blocks.dtype == torch.uint8 and tuple(layer.blocks.shape) == (48, 3, 18)
    assert np.array_equal(layer.blocks.reshape(48, -1).numpy(), packed)
    ref = torch.from_numpy(dequantize(packed, GGMLQuantizationType.Q4_0))
    assert torch.equal(layer.dequantize(), ref)
    # The format by hand: d is the block's first two bytes as float16; byte 2 + i holds weight i in its low nibble
    # and weight 16 + i in its high one; w = (q - 8) · d.
    block = layer.blocks[1, 0]
    d, byte = float(block[:2].view(torch.float16)), int(block[2 + 5])
    assert d != 0 and ref[1, 5] == ((byte & 15) - 8) * d and ref[1, 21] == ((byte >> 4) - 8) * d
    assert torch.all(ref[0, :32] == 0)
    # Half activations: the float32 weight rounded once; the forward is the matmul with it.
    assert torch.equal(layer.dequantize(torch.float16), ref.half())
    x = torch.randn(4, 96)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, ref, torch.zeros(48)))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = left_pad(token_ids(prompt_texts(None), model.config.vocab_size), model.config.pad_token_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.fixture(scope="module")
def q4_llama():
    """The zoo llama with Q4_0 weights, prefill only (one build for the tests below)."""
    return zoo.get("llama").prepare(max_new_tokens=1, weights="q4_0")


def test_q4_0_llama_is_close_to_the_float_one_yet_not_identical(q4_llama):
    f, q = zoo.get("llama").build(), q4_llama
    assert q.weights == "q4_0" and "Q4_0 weights, float32 activations" in q.description
    kinds = {n.rpartition(".")[2]: type(m).__name__ for n, m in q.model.named_modules()}
    assert {kinds[k] for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "lm_head")} \
        == {"Q4_0Linear"}
    # down_proj reads 688 features (not a multiple of 32): it stays float, as do embeddings and norms.
    assert kinds["down_proj"] == "Linear" and kinds["embed_tokens"] == "Embedding" and kinds["norm"] != "Q4_0Linear"
    a, b = _logits(f), _logits(q.model)
    rel = float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt())
    # Q4_0 keeps ~8.6% RMS error per weight of these Gaussian (random-init) weights; 25 quantized layers in 4
    # blocks compound it to 0.25 on the logits: bounded, and far from the noise of a float rounding.
    assert 0.01 < rel < 0.3, rel
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.3


def test_a_tied_head_and_moe_routers_stay_float():
    gpt2 = zoo.get("gpt2").build()
    names = quantize_q4_0(gpt2)
    assert "transformer.h.0.attn.c_attn" in names  # transformers' Conv1D is a linear layer too
    assert "lm_head" not in names and gpt2.lm_head.weight is gpt2.transformer.wte.weight
    moe = zoo.get("qwen2_moe").build()
    names = quantize_q4_0(moe)
    assert "model.layers.0.mlp.shared_expert.up_proj" in names
    assert not [n for n in names if n.endswith("gate")]  # the shared-expert gate picks, as a router does


def test_a_q4_0_carve_of_llama_holds_the_dequantize_ops_on_uint8_and_they_replay(tmp_path, q4_llama):
    carve("llama", tmp_path / "s", max_new_tokens=1, workload=q4_llama, progress=False)
    with CaseStore.open(tmp_path / "s") as st:
        assert st.runs()[0]["options"]["weights"] == "q4_0"
        ops = {(c.op, c.metas[0]["dtype"]) for c in st.cases() if c.metas}
    for op in ("aten.bitwise_and.Scalar", "aten.bitwise_right_shift.Tensor_Scalar", "aten.view.dtype",
               "aten.cat.default"):
        assert (op, "uint8") in ops, op
    # The uint8 half of the dequantize; the float half (sub, mul, _to_copy, mm) is ordinary ops, on lm_head-sized
    # tensors ([32000, 256]) whose fp64 replay takes a minute: too slow for every CI run.
    result = run_tests(str(tmp_path / "s"), "torch", pattern="bitwise or view.dtype", progress=False)
    t = result.totals()
    assert t["cases"] >= 6 and t["pass"] == t["cases"], [r.as_dict() for r in result.results if r.status != "pass"]


def test_unknown_weights_are_refused_before_the_model_is_built():
    with pytest.raises(TapmlError, match="unknown --weights 'q4'; choose float"):
        zoo.get("gpt2").prepare(weights="q4")


@pytest.mark.parametrize("name", ["t5", "resnet"])
def test_q4_0_runs_where_model_code_reads_layer_weight_or_has_no_token_embeddings(name):
    """T5 casts to `wo.weight.dtype` when that is a tensor; a vision model's get_input_embeddings raises."""
    w = zoo.get(name).prepare(max_new_tokens=1, weights="q4_0")
    assert any(isinstance(m, Q4_0Linear) for m in w.model.modules())
    with torch.no_grad():
        w.run()

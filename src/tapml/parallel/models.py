"""The models cache parallelism is measured on: Llama-3-8B's shape (32 layers, 8 KV heads) and a 1-KV-head (MQA)
variant, each with a small CPU variant; transformers' LlamaForCausalLM with fixed-seed random weights, fed long
contexts built from the shipped prompts.

Weights are drawn per parameter from a seed and the parameter's name, so a rank can build only its own slice of
any tensor and still hold exactly the single model's values. Nothing here downloads anything.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import transformers as tf

from tapml.errors import TapmlError

SEED = 0


@dataclass(frozen=True)
class ModelShape:
    """What the cost model and the builders need to know of a decoder-only model."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    summary: str = ""

    def with_layers(self, layers: int | None) -> ModelShape:
        if layers is None or layers == self.layers:
            return self
        if not 1 <= layers <= self.layers:
            raise TapmlError(f"--layers must be between 1 and {self.layers} for {self.name} (got {layers})")
        return replace(self, layers=layers)

    def params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        per_layer = attn + 3 * self.hidden * self.mlp + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def config(self) -> tf.LlamaConfig:
        return tf.LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.mlp,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, max_position_embeddings=1 << 24, rope_theta=500000.0, rms_norm_eps=1e-5,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


SHAPES = {s.name: s for s in (
    ModelShape("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256,
               "Llama-3-8B's shape: 32 layers, 32 heads, 8 KV heads (128 KiB of bf16 KV per token)"),
    ModelShape("llama3-8b-mqa", 32, 4096, 32, 1, 128, 14336, 128256,
               "Llama-3-8B's shape with one KV head (MQA): 16 KiB of bf16 KV per token"),
    ModelShape("llama3-8b-small", 2, 256, 8, 2, 32, 896, 4096,
               "the 8B shape scaled down for the CPU: 2 layers, hidden 256, 8 heads over 2 KV heads"),
    ModelShape("llama3-8b-mqa-small", 2, 256, 8, 1, 32, 896, 4096,
               "the MQA shape scaled down for the CPU: 2 layers, hidden 256, 8 heads over 1 KV head"),
)}


def names() -> list[str]:
    return list(SHAPES)


def shape(name: str, layers: int | None = None) -> ModelShape:
    """A model's shape by name (`zoo:` prefix accepted), optionally cut to `layers`."""
    key = name.removeprefix("zoo:").strip().lower()
    if key not in SHAPES:
        raise TapmlError(f"unknown model {name!r} for cache parallelism; choose one of: {', '.join(SHAPES)}")
    return SHAPES[key].with_layers(layers)


# ----------------------------------------------------------------------------------------------- weights


def _std(name: str, tensor_shape: torch.Size) -> float:
    # 1/sqrt(fan_in) keeps activations O(1) through depth and gives attention scores of order 1, so the
    # attention is far from uniform and a wrong merge weight shows in the logits.
    if name.endswith("embed_tokens.weight"):
        return 1.0
    return 1.0 / math.sqrt(tensor_shape[-1])


def full_param(name: str, tensor_shape: torch.Size | tuple[int, ...], *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = SEED) -> torch.Tensor:
    """The whole value of parameter `name` (a pure function of seed, name, shape, device type)."""
    tensor_shape = torch.Size(tensor_shape)
    if name.endswith("norm.weight"):
        return torch.ones(tensor_shape, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62))
    w = torch.randn(tensor_shape, generator=g, device=device, dtype=torch.float32)
    return (w * _std(name, tensor_shape)).to(dtype)


def skeleton(s: ModelShape) -> tf.LlamaForCausalLM:
    """The model's modules on the meta device (no memory): the plans reshape it before materializing."""
    with torch.device("meta"):
        return tf.LlamaForCausalLM(s.config())


def materialize(model: tf.LlamaForCausalLM, *, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = SEED,
                slices: dict[str, tuple[int, slice]] | None = None) -> tf.LlamaForCausalLM:
    """Give every meta parameter its value: the full tensor of its name, cut along (dim, slice) where `slices`
    says (how a rank keeps only its shard). The rotary tables are rebuilt in fp32 on the device."""
    slices = slices or {}
    for name, p in list(model.named_parameters()):
        full_shape = getattr(p, "_tapml_full_shape", p.shape)
        value = full_param(name, full_shape, device=device, dtype=dtype, seed=seed)
        if name in slices:
            dim, sl = slices[name]
            value = value.narrow(dim, sl.start, sl.stop - sl.start) if sl.step in (None, 1) else \
                torch.cat([value.narrow(dim, i, 1) for i in range(sl.start, sl.stop, sl.step)], dim)
        if tuple(value.shape) != tuple(p.shape):
            raise RuntimeError(f"{name}: built {tuple(value.shape)} for a parameter of {tuple(p.shape)}")
        mod_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, torch.nn.Parameter(value.contiguous(), requires_grad=False))
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(model.config).to(device)
    return model.eval()


def build(name: str, *, layers: int | None = None, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32, seed: int = SEED) -> tf.LlamaForCausalLM:
    """The whole single model, fixed-seed weights, in eval mode."""
    return materialize(skeleton(shape(name, layers)), device=device, dtype=dtype, seed=seed)


# ----------------------------------------------------------------------------------------------- inputs


@lru_cache(maxsize=4)
def _prompt_stream(vocab: int) -> tuple[int, ...]:
    """Every shipped prompt through the zoo's tokenizer (MiniLM's WordPiece), mapped into `vocab` as the zoo maps
    ids, one after another."""
    from tapml.zoo import prompts, token_ids

    lists = token_ids([p["text"] for p in prompts()], vocab)
    stream: list[int] = []
    for ids in lists:
        stream += ids + [2]  # eos between prompts, as documents are joined in long-context data
    return tuple(stream)


def context_ids(length: int, vocab: int, batch: int = 1) -> torch.Tensor:
    """A [batch, length] long context: the shipped prompts one after another, repeated to `length` (row b
    starts b prompts later, so rows differ)."""
    if length < 1 or batch < 1:
        raise TapmlError(f"a context needs at least one token and one row (got {length} × {batch})")
    stream = _prompt_stream(vocab)
    reps = -(-(length + len(stream)) // len(stream))
    full = torch.tensor(stream, dtype=torch.long).repeat(reps)
    starts = [(b * 97) % len(stream) for b in range(batch)]
    return torch.stack([full[s:s + length] for s in starts])


def parse_tokens(text: str | int) -> int:
    """'128k' → 131072, '1M' → 1048576 (binary k and M, as context lengths are quoted), '5000' → 5000."""
    if isinstance(text, int):
        return text
    t = str(text).strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise TapmlError(f"{text!r} is not a token count; write e.g. 4096, 128k or 1M") from None
    if n < 1:
        raise TapmlError(f"a token count must be ≥ 1 (got {text!r})")
    return n


def zoo_specs() -> list:
    """These models as tapml.zoo ModelSpecs (the small CPU variants build; the full shapes count on meta), for
    the lead to list in `tapml zoo`; their workload is the zoo's greedy generate()."""
    from tapml.zoo import ModelSpec

    def workload(spec, model, prompt, max_new_tokens):  # resolved late: the zoo's workloads are moving
        from tapml.zoo.models import llm_workload

        return llm_workload(spec, model, prompt, max_new_tokens)

    out = []
    for s in SHAPES.values():
        out.append(ModelSpec(name=s.name, architecture="LlamaForCausalLM", kind="llm", summary=s.summary,
                             make=lambda s=s: build(s.name), workload=workload, count=s.params))
    return out

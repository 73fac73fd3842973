"""GGUF Q4_0 weight-only quantization (llama.cpp's format): `Q4_0Linear` keeps a linear layer's weight as packed
Q4_0 blocks and dequantizes them with plain ATen ops at every forward, so a carve records the ops the format needs.

Why Q4_0 and not torchao's int4: torchao's layout is tinygemm's packed tile format, read only by its own CPU/CUDA
kernels through one opaque op (`_weight_int4pack_mm`); Q4_0 is a documented byte layout that llama.cpp,
whisper.cpp and browser runtimes read, and it decomposes into ordinary ops a new backend can be tested on one by
one. The quantizer is gguf's own (`gguf.quants.quantize`); this module must not implement one.
"""

from __future__ import annotations

import torch

QK = 32  # weights per block
BLOCK_BYTES = 2 + QK // 2  # float16 scale d, then 16 bytes: weights 0..15 in the low nibbles, 16..31 in the high


class Q4_0Linear(torch.nn.Module):
    """y = x Wᵀ + b with W held as Q4_0 blocks: `blocks` is uint8 [out_features, in_features / 32, 18], each block
    its float16 scale d and 32 4-bit codes q, w = (q - 8) · d. The bias (if any) stays a float parameter."""

    # No dense weight tensor (`dequantize()` makes one): model code that casts to `layer.weight.dtype` when it is
    # a tensor (T5's feed-forward) leaves the activations as they are, as transformers' own quantizers do.
    weight = None

    def __init__(self, blocks: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if blocks.dtype != torch.uint8 or blocks.dim() != 3 or blocks.shape[-1] != BLOCK_BYTES:
            raise ValueError(f"Q4_0 blocks must be uint8 [out, in/{QK}, {BLOCK_BYTES}], got {blocks.dtype} "
                             f"{list(blocks.shape)}")
        self.out_features, self.in_features = blocks.shape[0], blocks.shape[1] * QK
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Q4_0Linear:
        """Quantize a float weight [out, in] (in a multiple of 32) with gguf's Q4_0 quantizer."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        out, n = weight.shape
        if n % QK:
            raise ValueError(f"Q4_0 needs in_features divisible by {QK}, got {n}")
        packed = quantize(weight.detach().to(torch.float32).cpu().numpy(), GGMLQuantizationType.Q4_0)
        return cls(torch.from_numpy(packed).reshape(out, n // QK, BLOCK_BYTES), bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] in `dtype`: computed in float32 (exact: an 11-bit d times a 4-bit q), rounded
        once to `dtype`."""
        d = self.blocks[..., :2].view(torch.float16)  # [out, nb, 1]
        qs = self.blocks[..., 2:]  # [out, nb, 16]
        q = torch.cat([torch.bitwise_and(qs, 0x0F), torch.bitwise_right_shift(qs, 4)], dim=-1)  # [out, nb, 32]
        w = (q.to(torch.int8) - 8).to(torch.float32) * d.to(torch.float32)
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, Q4_0"


def _linear_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The [out, in] weight of a linear layer (nn.Linear and subclasses, transformers' Conv1D, which stores it
    transposed), else None."""
    if isinstance(module, torch.nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return module.weight.t()
    return None


def _is_router(name: str) -> bool:
    # An MoE router or shared-expert gate (`mlp.gate`, `shared_expert_gate`) picks experts: llama.cpp keeps these
    # (`ffn_gate_inp*`) unquantized, and so do we. The SwiGLU `gate_proj` is an ordinary projection.
    last = name.rpartition(".")[2]
    return last == "gate" or last.endswith("_gate")


def quantize_q4_0(model: torch.nn.Module) -> list[str]:
    """Replace, in place, every linear layer whose in_features is a multiple of 32 with a Q4_0Linear, except MoE
    routers and an output head tied to the input embeddings; embeddings, norms and other layers stay as they are.
    Returns the names of the layers replaced."""
    tied: set[int] = set()
    try:
        emb = model.get_input_embeddings()  # transformers' models; vision ones raise NotImplementedError
    except (AttributeError, NotImplementedError):
        emb = None
    if isinstance(getattr(emb, "weight", None), torch.Tensor):
        tied.add(emb.weight.data_ptr())
    made: dict[int, Q4_0Linear] = {}  # a layer reachable under two names is quantized once
    replaced = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        weight = _linear_weight(module)
        if not name or weight is None or weight.shape[1] % QK or _is_router(name) or weight.data_ptr() in tied:
            continue
        if id(module) not in made:
            made[id(module)] = Q4_0Linear.from_weight(weight, module.bias)
            replaced.append(name)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, made[id(module)])
    return replaced

"""The models GraphPipe trains: a multi-modal transformer (2 or 4 branches), DLRM and CANDLE-Uno, each in a tiny
CPU size and a GPU size, with their inputs (shipped prompts, real photos, seeded synthetic features) and losses.

Only model code and inputs live here: no partitioning, no process groups. `pipe_models()` lists them for the zoo.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tapml.errors import TapmlError

SIZES = ("tiny", "gpu")


# ----------------------------------------------------------------------------------------------- building blocks


class Block(nn.Module):
    """A pre-LN transformer encoder block (self-attention + GELU MLP), one pipeline layer."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class Dense(nn.Module):
    """Linear + ReLU: one layer of an MLP tower."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.fc = nn.Linear(i, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


def mlp(widths: list[int]) -> nn.Sequential:
    return nn.Sequential(*[Dense(a, b) for a, b in itertools.pairwise(widths)])


# ----------------------------------------------------------------------------------------------- MMT


class TokenEmbed(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, patch: int, image: int, d: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn((image // patch) ** 2, d) * 0.02)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.conv(img).flatten(2).transpose(1, 2) + self.pos


class FrameEmbed(nn.Module):
    """A sequence of feature frames (audio-like filter banks, or per-row tabular records) projected to tokens."""

    def __init__(self, features: int, seq: int, d: int):
        super().__init__()
        self.proj = nn.Linear(features, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.pos


class Tower(nn.Module):
    """One modality's branch: its embedding, transformer blocks, and a projection into the fused width."""

    def __init__(self, embed: nn.Module, d: int, heads: int, depth: int, fused: int):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList([Block(d, heads, 4 * d) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, fused))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        return self.out(h)


class Fusion(nn.Module):
    """The top of the MMT: the branches' token sequences concatenated, transformer blocks, mean pool, head."""

    def __init__(self, d: int, heads: int, depth: int, classes: int):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, heads, 4 * d) for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, classes))

    def forward(self, seqs: list[torch.Tensor]) -> torch.Tensor:
        h = torch.cat(seqs, dim=1)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h.mean(dim=1))


class MMT(nn.Module):
    """Multi-modal transformer: text, image and (with 4 branches) audio and tabular towers, fused on top."""

    def __init__(self, branches: int, d: int, heads: int, depth: int, fuse_depth: int, vocab: int, text_len: int,
                 image: int, patch: int, audio_len: int, mels: int, rows: int, cols: int, classes: int):
        super().__init__()
        self.text = Tower(TokenEmbed(vocab, text_len, d), d, heads, depth, d)
        self.image = Tower(PatchEmbed(3, patch, image, d), d, heads, depth, d)
        if branches == 4:
            self.audio = Tower(FrameEmbed(mels, audio_len, d), d, heads, depth, d)
            self.table = Tower(FrameEmbed(cols, rows, d), d, heads, depth, d)
        self.branches = branches
        self.fuse = Fusion(d, heads, fuse_depth, classes)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        towers = [self.text, self.image] + ([self.audio, self.table] if self.branches == 4 else [])
        return self.fuse([t(x) for t, x in zip(towers, inputs)])


# ----------------------------------------------------------------------------------------------- DLRM


class SparseArch(nn.Module):
    """torchrec's EmbeddingBagCollection: one sum-pooled table per sparse feature."""

    def __init__(self, tables: int, rows: int, dim: int):
        super().__init__()
        self.tables = nn.ModuleList([nn.EmbeddingBag(rows, dim, mode="sum") for _ in range(tables)])

    def forward(self, idx: torch.Tensor) -> list[torch.Tensor]:
        return [t(idx[:, i]) for i, t in enumerate(self.tables)]


class InteractionArch(nn.Module):
    """torchrec's InteractionArch: pairwise dot products of the dense and pooled sparse embeddings."""

    def __init__(self, features: int):
        super().__init__()
        rows, cols = torch.triu_indices(features, features, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack([dense, *sparse], dim=1)
        dots = torch.bmm(x, x.transpose(1, 2))
        return torch.cat([dense, dots[:, self.rows, self.cols]], dim=1)


class DLRM(nn.Module):
    """DLRM in torchrec's layout: sparse arch (embedding tables), dense arch (bottom MLP), interaction, over arch
    (top MLP) ending in one click logit."""

    def __init__(self, dense_in: int, tables: int, rows: int, dim: int, bottom: list[int], top: list[int]):
        super().__init__()
        self.sparse = SparseArch(tables, rows, dim)
        self.dense = mlp([dense_in, *bottom, dim])
        self.inter = InteractionArch(tables + 1)
        self.over = mlp([dim + (tables + 1) * tables // 2, *top])
        self.out = nn.Linear(top[-1], 1)

    def forward(self, dense_x: torch.Tensor, sparse_idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.over(self.inter(self.dense(dense_x), self.sparse(sparse_idx)))).squeeze(-1)


# ----------------------------------------------------------------------------------------------- CANDLE-Uno


class Uno(nn.Module):
    """CANDLE-Uno (single-drug mode): an MLP encoder per feature type (cell-line gene expression, drug descriptors,
    drug fingerprints), concatenated with the dose into a top MLP that regresses the growth."""

    def __init__(self, genes: int, descriptors: int, fingerprints: int, tower: list[int], top: list[int]):
        super().__init__()
        self.cell = mlp([genes, *tower])
        self.desc = mlp([descriptors, *tower])
        self.fp = mlp([fingerprints, *tower])
        self.top = mlp([3 * tower[-1] + 1, *top])
        self.out = nn.Linear(top[-1], 1)

    def forward(self, genes: torch.Tensor, desc: torch.Tensor, fp: torch.Tensor, dose: torch.Tensor):
        h = torch.cat([self.cell(genes), self.desc(desc), self.fp(fp), dose], dim=1)
        return self.out(self.top(h)).squeeze(-1)


# ----------------------------------------------------------------------------------------------- inputs


@lru_cache(maxsize=1)
def _token_stream() -> tuple[int, ...]:
    """Every shipped prompt through MiniLM's WordPiece tokenizer, concatenated (ids into a 30522 vocabulary)."""
    from tapml import zoo

    texts = [p["text"] for p in zoo.prompts()]
    return tuple(i for ids in zoo.token_ids(texts, 30522) for i in ids)


@lru_cache(maxsize=4)
def _photos(size: int) -> torch.Tensor:
    from tapml import zoo

    return zoo.image_batch(size, zoo.PHOTOS)


def text_batch(n: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """`n` windows of `length` tokens from the shipped prompts, at seeded offsets, mapped into `vocab`."""
    stream = torch.tensor(_token_stream())
    starts = torch.randint(0, len(stream), (n,), generator=gen)
    pos = (starts[:, None] + torch.arange(length)) % len(stream)
    return 4 + stream[pos] % (vocab - 4)


def photo_batch(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """`n` seeded crops (and horizontal flips) of the scikit-image photos, ImageNet-normalized."""
    big = _photos(size + size // 4)
    out = []
    for i in range(n):
        y, x = torch.randint(0, size // 4 + 1, (2,), generator=gen).tolist()
        img = big[i % len(big), :, y:y + size, x:x + size]
        out.append(img.flip(-1) if torch.rand((), generator=gen) < 0.5 else img)
    return torch.stack(out).contiguous()


# ----------------------------------------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class PipeModel:
    """A model GraphPipe can train: how to build it and make a batch (inputs, target), and its loss; `architecture`
    names what it is (the zoo counts distinct ones across its tables)."""

    name: str
    summary: str
    sizes: dict[str, dict[str, Any]] = field(repr=False)  # size -> constructor config
    batch_size: dict[str, int] = field(repr=False)  # size -> default global batch
    make: Callable[..., nn.Module] = field(repr=False)  # (**config) -> module
    inputs: Callable[..., tuple[tuple[torch.Tensor, ...], torch.Tensor]] = field(repr=False)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(repr=False)
    architecture: str

    def config(self, size: str) -> dict[str, Any]:
        if size not in self.sizes:
            raise TapmlError(f"unknown size {size!r} for {self.name}; choose one of: {', '.join(self.sizes)}")
        return self.sizes[size]

    def build(self, size: str = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        """The model with fixed-seed weights (the same on every rank), in train mode."""
        cfg = self.config(size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.make(**_kwargs(cfg, self.make))
        return model.to(dtype).train()

    def batch(self, n: int, size: str = "tiny", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """`n` samples (inputs, target), identical for a given seed on every rank."""
        gen = torch.Generator().manual_seed(seed)
        inputs, target = self.inputs(self.config(size), n, gen)
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t
        return tuple(cast(t) for t in inputs), cast(target)

    def parameters(self, size: str = "tiny") -> int:
        with torch.device("meta"):
            model = self.make(**_kwargs(self.config(size), self.make))
        return sum(p.numel() for p in model.parameters())


def _mmt_inputs(cfg: dict[str, Any], n: int, gen: torch.Generator):
    xs = [text_batch(n, cfg["text_len"], cfg["vocab"], gen), photo_batch(n, cfg["image"], gen)]
    if cfg["branches"] == 4:
        # Audio-like log filter-bank frames (smooth in time, seeded) and tabular records (seeded features).
        t = torch.linspace(0, 1, cfg["audio_len"])[:, None]
        freq = torch.rand(n, 1, cfg["mels"], generator=gen) * 8
        xs.append(torch.sin(2 * math.pi * freq * t) + 0.1 * torch.randn(n, cfg["audio_len"], cfg["mels"],
                                                                           generator=gen))
        xs.append(torch.randn(n, cfg["rows"], cfg["cols"], generator=gen))
    return tuple(xs), torch.randint(0, cfg["classes"], (n,), generator=gen)


def _dlrm_inputs(cfg: dict[str, Any], n: int, gen: torch.Generator):
    # Criteo-like: 13 log-transformed counts, one multi-hot bag per table with a skewed (power-law) id draw.
    dense = torch.log1p(torch.poisson(torch.rand(n, cfg["dense_in"], generator=gen) * 20, generator=gen))
    u = torch.rand(n, cfg["tables"], cfg["bag"], generator=gen)
    idx = (u.pow(3) * cfg["rows"]).long().clamp_max(cfg["rows"] - 1)
    w = torch.randn(cfg["dense_in"], generator=gen)
    logit = (dense - dense.mean()) @ w / math.sqrt(cfg["dense_in"]) + (idx[:, :, 0] % 7 == 0).float().sum(1) - 0.5
    return (dense, idx), (torch.rand(n, generator=gen) < torch.sigmoid(logit)).float()


def _uno_inputs(cfg: dict[str, Any], n: int, gen: torch.Generator):
    genes = torch.randn(n, cfg["genes"], generator=gen)
    desc = torch.randn(n, cfg["descriptors"], generator=gen)
    fp = (torch.rand(n, cfg["fingerprints"], generator=gen) < 0.1).float()
    dose = torch.rand(n, 1, generator=gen) * 2 - 1
    growth = torch.tanh(genes[:, :8].mean(1) + desc[:, :8].mean(1) - fp[:, :16].mean(1) - dose[:, 0])
    return (genes, desc, fp, dose), growth


def _mmt_cfg(branches: int, d: int, heads: int, depth: int, fuse_depth: int, seq: int, image: int,
             patch: int, vocab: int) -> dict[str, Any]:
    return dict(branches=branches, d=d, heads=heads, depth=depth, fuse_depth=fuse_depth, vocab=vocab,
                text_len=seq, image=image, patch=patch, audio_len=seq, mels=40, rows=seq // 2, cols=24, classes=10)


def _ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


def _bce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out, target)


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


MODELS: tuple[PipeModel, ...] = (
    PipeModel("mmt2", "multi-modal transformer, 2 branches (text from the shipped prompts, photos) + fusion",
              {"tiny": _mmt_cfg(2, 32, 2, 2, 1, 16, 32, 8, 1024),
               "gpu": _mmt_cfg(2, 1024, 16, 6, 4, 512, 384, 16, 30522)},
              {"tiny": 8, "gpu": 64}, MMT, _mmt_inputs, _ce, architecture="MMT"),
    PipeModel("mmt4", "multi-modal transformer, 4 branches (text, photos, audio-like frames, tabular) + fusion",
              {"tiny": _mmt_cfg(4, 32, 2, 2, 1, 16, 32, 8, 1024),
               "gpu": _mmt_cfg(4, 1024, 16, 6, 4, 512, 384, 16, 30522)},
              {"tiny": 8, "gpu": 64}, MMT, _mmt_inputs, _ce, architecture="MMT"),
    PipeModel("dlrm", "DLRM in torchrec's layout: embedding tables, bottom MLP, dot interaction, top MLP",
              {"tiny": dict(dense_in=13, tables=4, rows=100, dim=16, bag=3, bottom=[32], top=[32, 16]),
               "gpu": dict(dense_in=13, tables=26, rows=400_000, dim=128, bag=8, bottom=[512, 256],
                           top=[1024, 1024, 512, 256])},
              {"tiny": 8, "gpu": 4096}, DLRM, _dlrm_inputs, _bce, architecture="DLRM"),
    PipeModel("uno", "CANDLE-Uno: MLP towers for gene expression, drug descriptors, fingerprints + top MLP",
              {"tiny": dict(genes=64, descriptors=48, fingerprints=64, tower=[32, 32], top=[32, 32]),
               "gpu": dict(genes=942, descriptors=3820, fingerprints=2048, tower=[4096, 4096, 4096],
                           top=[4096, 4096, 4096])},
              {"tiny": 8, "gpu": 1024}, Uno, _uno_inputs, _mse, architecture="CANDLE-Uno"),
)


def pipe_models() -> list[PipeModel]:
    """Every model GraphPipe ships (the zoo lists them from here)."""
    return list(MODELS)


def get_model(name: str) -> PipeModel:
    for m in MODELS:
        if m.name == name.strip().lower():
            return m
    raise TapmlError(f"unknown graphpipe model {name!r}; choose one of: {', '.join(m.name for m in MODELS)}")


def _kwargs(cfg: dict[str, Any], make: Callable[..., nn.Module]) -> dict[str, Any]:
    """Only the config entries `make` takes (input-only settings such as `bag` stay out)."""
    import inspect

    params = inspect.signature(make).parameters
    return {k: v for k, v in cfg.items() if k in params}

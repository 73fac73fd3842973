"""The placement models (issue 13): ResNeXt50-32x4d, MobileNetV2, a 3D ResNet-18, BERT-base, a DCGAN generator, a
NASNet-style cell network and the zoo's Llama prefill, random-init (fixed seed), on real photos or prompts.

Each is a compact definition following its paper's layout (no torchvision: it does not import beside this torch;
BERT and Llama are transformers' code); `small=True` shrinks widths/depths for CPU tests. It must not place or time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _bn_act(c: int, act: type[nn.Module] = nn.ReLU) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), act()]


class _Bottleneck(nn.Module):
    """ResNeXt bottleneck: 1x1, grouped 3x3 (cardinality `groups`), 1x1 ×4, projection shortcut when needed."""

    def __init__(self, cin: int, width: int, groups: int, stride: int):
        super().__init__()
        cout = width * 2 if groups > 1 else width * 4
        self.body = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), *_bn_act(width),
                                  nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False),
                                  *_bn_act(width), nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())
        self.cout = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def resnext50_32x4d(small: bool = False, classes: int = 1000) -> nn.Module:
    """ResNeXt-50 (32x4d): stages of 3, 4, 6, 3 blocks, group width 4 × 32 groups doubling per stage."""
    blocks, groups, base = ((1, 1, 1, 1), 4, 16) if small else ((3, 4, 6, 3), 32, 128)
    stem = 16 if small else 64
    layers: list[nn.Module] = [nn.Conv2d(3, stem, 7, 2, 3, bias=False), *_bn_act(stem), nn.MaxPool2d(3, 2, 1)]
    cin = stem
    for s, n in enumerate(blocks):
        for b in range(n):
            blk = _Bottleneck(cin, base * 2 ** s, groups, 2 if b == 0 and s > 0 else 1)
            layers.append(blk)
            cin = blk.cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class _Inverted(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, depthwise 3x3, 1x1 linear project; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        pre = [nn.Conv2d(cin, mid, 1, bias=False), *_bn_act(mid, nn.ReLU6)] if expand != 1 else []
        self.body = nn.Sequential(*pre, nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
                                  *_bn_act(mid, nn.ReLU6), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.res else y


def mobilenet_v2(small: bool = False, classes: int = 1000) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018, Table 2): t, c, n, s per stage; width 1.0 (0.25 and 1 block per stage
    when small)."""
    table = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1)]
    mult = 0.25 if small else 1.0
    c = max(8, int(32 * mult))
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, 2, 1, bias=False), *_bn_act(c, nn.ReLU6)]
    for t, ch, n, s in (table[:4] if small else table):
        out = max(8, int(ch * mult))
        for i in range(1 if small else n):
            layers.append(_Inverted(c, out, s if i == 0 else 1, t))
            c = out
    last = 128 if small else 1280
    return nn.Sequential(*layers, nn.Conv2d(c, last, 1, bias=False), *_bn_act(last, nn.ReLU6),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, classes))


class _Block3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(),
                                  nn.Conv3d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm3d(cout))
        self.short = (nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def r3d_18(small: bool = False, classes: int = 400) -> nn.Module:
    """torchvision's r3d_18 layout: a (3,7,7) stem, 4 stages of 2 basic 3D blocks (64..512), global pool, fc."""
    widths = (8, 16, 32, 64) if small else (64, 128, 256, 512)
    layers: list[nn.Module] = [nn.Conv3d(3, widths[0], (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
                               nn.BatchNorm3d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for s, w in enumerate(widths):
        for b in range(1 if small else 2):
            layers.append(_Block3d(cin, w, 2 if b == 0 and s > 0 else 1))
            cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(cin, classes))


def dcgan_generator(small: bool = False, nz: int = 100) -> nn.Module:
    """DCGAN generator (Radford et al. 2016): z → 4×4 → … → 64×64 RGB by stride-2 transposed convolutions."""
    ngf = 8 if small else 64
    nz = 16 if small else nz
    chans = [nz, ngf * 8, ngf * 4, ngf * 2, ngf]
    layers: list[nn.Module] = []
    for k in range(4):
        layers += [nn.ConvTranspose2d(chans[k], chans[k + 1], 4, 1 if k == 0 else 2, 0 if k == 0 else 1,
                                      bias=False), nn.BatchNorm2d(chans[k + 1]), nn.ReLU()]
    return nn.Sequential(*layers, nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh())


class _SepConv(nn.Sequential):
    def __init__(self, c: int, k: int):
        super().__init__(nn.ReLU(), nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))


class _NasCell(nn.Module):
    """A NASNet-A normal cell: five blocks, each the sum of two ops (separable 3x3/5x5, average pool, identity)
    over the cell's two inputs or earlier blocks; the unused block outputs concatenated and projected."""

    def __init__(self, c: int):
        super().__init__()
        self.ops = nn.ModuleList([_SepConv(c, 5), _SepConv(c, 3), _SepConv(c, 5), _SepConv(c, 3),
                                  nn.AvgPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1),
                                  _SepConv(c, 3)])
        self.project = nn.Sequential(nn.ReLU(), nn.Conv2d(5 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        o = self.ops
        b0 = o[0](h) + o[1](prev)
        b1 = o[2](prev) + o[3](prev)
        b2 = o[4](h) + prev
        b3 = o[5](prev) + o[6](prev)
        b4 = o[7](h) + h
        return self.project(torch.cat([b0, b1, b2, b3, b4], 1))


class NasNetCells(nn.Module):
    """A stem, `cells` NASNet-A normal cells (each reading the two previous outputs), a reduction by stride-2
    convolution halfway, global pool and a classifier: NASNet's multi-branch structure at a chosen size."""

    def __init__(self, small: bool = False, classes: int = 1000):
        super().__init__()
        c, cells = (8, 2) if small else (64, 6)
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
        self.cells = nn.ModuleList(_NasCell(c) for _ in range(cells))
        self.reduce = nn.Conv2d(c, c, 3, 2, 1, bias=False)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prev = h = self.stem(x)
        for k, cell in enumerate(self.cells):
            if k == len(self.cells) // 2:
                prev = h = self.reduce(h)
            prev, h = h, cell(h, prev)
        return self.head(torch.relu(h).mean((2, 3)))


class _LastHidden(nn.Module):
    """A transformers model returning one tensor (torch.export and the placed model want tensors out)."""

    def __init__(self, model: nn.Module, field_name: str):
        super().__init__()
        self.model, self.field = model, field_name

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=ids, attention_mask=mask), self.field)


def bert_base(small: bool = False) -> nn.Module:
    """transformers' BertModel, BERT-base config (12 layers, 768 wide, 12 heads) or 2×64 small; eager attention."""
    from transformers import BertConfig, BertModel

    cfg = (BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=128) if small else BertConfig())
    cfg._attn_implementation = "eager"
    return _LastHidden(BertModel(cfg, add_pooling_layer=False), "last_hidden_state")


def llama_prefill(small: bool = False) -> nn.Module:
    """The zoo's Llama (4 layers, 256 wide; 1 layer when small): one prefill forward, logits out."""
    from tapml import zoo

    model = zoo.get("llama").build()
    if small:
        model.model.layers = model.model.layers[:1]
        model.config.num_hidden_layers = 1
    model.config.use_cache = False
    return _LastHidden(model, "logits")


# --- inputs and the catalogue ------------------------------------------------------------------------------------

def _photos(batch: int, size: int) -> torch.Tensor:
    from tapml.zoo.inputs import PHOTOS, image_batch

    x = image_batch(size, PHOTOS)
    return x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch].contiguous()


def _clip(batch: int, size: int, frames: int) -> torch.Tensor:
    """A short clip from the photos: each frame the photo shifted a few pixels (a slow pan), [B, 3, T, H, W]."""
    x = _photos(batch, size + frames)
    clip = [x[:, :, t:t + size, t:t + size] for t in range(frames)]
    return torch.stack(clip, 2).contiguous()


def _text(batch: int, vocab: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tapml.zoo.inputs import left_pad, prompt_texts, token_ids

    ids = token_ids(prompt_texts(None, batch), vocab)
    ids = [(x * ((length // max(1, len(x))) + 1))[:length] for x in ids]  # every row `length` real tokens
    return left_pad(ids, 0)


@dataclass(frozen=True)
class PlaceModel:
    """A placement model: `build(small)` the module (fixed seed), `inputs(batch, small)` its real inputs;
    `architecture` names what it is (the zoo counts distinct ones across its tables)."""

    name: str
    summary: str
    make: Callable[[bool], nn.Module]
    make_inputs: Callable[[int, bool], tuple[torch.Tensor, ...]]
    architecture: str

    def build(self, small: bool = False) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return self.make(small).eval()

    def inputs(self, batch: int = 1, small: bool = False) -> tuple[torch.Tensor, ...]:
        return self.make_inputs(batch, small)


MODELS: dict[str, PlaceModel] = {m.name: m for m in (
    PlaceModel("resnext50", "ResNeXt50-32x4d on photos", resnext50_32x4d,
               lambda b, s: (_photos(b, 32 if s else 224),), architecture="ResNeXt"),
    PlaceModel("mobilenetv2", "MobileNetV2 1.0 on photos", mobilenet_v2,
               lambda b, s: (_photos(b, 32 if s else 224),), architecture="MobileNetV2"),
    PlaceModel("r3d18", "3D ResNet-18 on a clip panned over the photos", r3d_18,
               lambda b, s: (_clip(b, 16 if s else 112, 4 if s else 16),), architecture="R3D (3D ResNet)"),
    PlaceModel("bert", "BERT-base on the shipped prompts", bert_base,
               lambda b, s: _text(b, 1000 if s else 30522, 16 if s else 128), architecture="BertModel"),
    PlaceModel("dcgan", "DCGAN generator (64×64)", dcgan_generator,
               lambda b, s: (torch.randn(b, 16 if s else 100, 1, 1, generator=torch.Generator().manual_seed(0)),),
               architecture="DCGAN generator"),
    PlaceModel("nasnet", "NASNet-A normal cells on photos", NasNetCells,
               lambda b, s: (_photos(b, 32 if s else 224),), architecture="NASNet-A"),
    PlaceModel("llama", "zoo Llama prefill on the shipped prompts", llama_prefill,
               lambda b, s: _text(b, 32000, 16 if s else 128), architecture="LlamaForCausalLM"),
)}


def catalog() -> list[PlaceModel]:
    """Every placement model (the zoo can list these)."""
    return list(MODELS.values())


def get(name: str) -> PlaceModel:
    from tapml.errors import TapmlError

    if name not in MODELS:
        raise TapmlError(f"unknown placement model {name}; choose one of {', '.join(MODELS)}")
    return MODELS[name]

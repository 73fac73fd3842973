import os
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

MODELS = Path(__file__).parent / "models"
TAPML = [sys.executable, "-m", "tapml.cli"]


@pytest.fixture
def tiny() -> str:
    return f"{MODELS / 'tiny.py'}:make_model"


def model_ref(fn: str) -> str:
    return f"{MODELS / 'tiny.py'}:{fn}"


ZOO_NEW_TOKENS = 2  # prefill + one decode step: every phase kind is carved, CI time stays low

# The zoo models the suite carves and replays (on torch, WebGPU, the remote allow-list): one per architecture
# family, so a new zoo entry does not make every backend's zoo test longer. TAPML_ZOO=all takes every entry
# (a coverage run).
ZOO_SAMPLE = (
    "llama",  # dense decoder: RoPE, RMSNorm, SwiGLU, GQA (the flagship)
    "gemma2",  # logit soft-capping, alternating local attention
    "gemma3",  # QK-norm, sliding-window + global layers
    "gpt2",  # learned positions, fused QKV, gelu_new
    "gpt_neox",  # parallel residual, partial rotary, LayerNorm
    "falcon",  # multi-query attention
    "mixtral",  # mixture of experts, top-2
    "deepseek_v3",  # MLA, grouped top-k routing, shared expert
    "gpt_oss",  # attention sinks, sliding/full, MoE
    "mamba2",  # state-space (SSD chunked scan, recurrent decode)
    "jamba",  # hybrid: Mamba selective scan + attention + MoE
    "minilm",  # encoder, real weights
    "vit", "resnet", "convnext",  # vision: patches, bottlenecks + batch norm, depthwise convolutions
    "t5", "bart",  # encoder-decoders
    "whisper",  # speech: espeak-ng audio, conv front end, encoder-decoder
    "clip",  # contrastive image-text
    "qwen2_vl",  # vision-language: patch merger, M-RoPE
)


def zoo_sample() -> tuple[str, ...]:
    from tapml import zoo

    return tuple(zoo.names()) if os.environ.get("TAPML_ZOO") == "all" else ZOO_SAMPLE


class ZooStores(Mapping):
    """Zoo models carved once per session, each the first time a test asks for it; iterating gives the sample."""

    def __init__(self, root: Path):
        self.root, self.carved = root, {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.carved:
            from tapml.recorder import carve

            carve(name, self.root / name, max_new_tokens=ZOO_NEW_TOKENS, progress=False)
            self.carved[name] = self.root / name
        return self.carved[name]

    def __iter__(self):
        return iter(zoo_sample())

    def __len__(self) -> int:
        return len(zoo_sample())


@pytest.fixture(scope="session")
def zoo_stores(tmp_path_factory) -> ZooStores:
    """The zoo's stores (shared by the reference and target-backend tests): `zoo_stores[name]` carves a model
    the first time; `.values()` are the sample's."""
    return ZooStores(tmp_path_factory.mktemp("zoo-stores"))

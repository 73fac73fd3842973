import os
import sys
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


@pytest.fixture(scope="session")
def zoo_stores(tmp_path_factory) -> dict[str, Path]:
    """Every zoo model carved once per session (shared by the reference and target-backend tests)."""
    from tapml import zoo
    from tapml.recorder import carve

    root = tmp_path_factory.mktemp("zoo-stores")
    out = {}
    for spec in zoo.catalog():
        carve(spec.name, root / spec.name, max_new_tokens=ZOO_NEW_TOKENS, progress=False)
        out[spec.name] = root / spec.name
    return out

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

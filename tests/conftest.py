"""Shared fixtures. Tests run offline; real-model tests are marked ``slow``."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The benchmark data folder beside the checkout (``../shared/data``), or ``$SSAH_SHARED_DATA``."""
    env = os.environ.get("SSAH_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data (public benchmark data) is not present beside this checkout")
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random Llama (GQA) with the byte-level tokenizer, shared read-only across tests."""
    from ssah.tiny import build_tiny_model

    return build_tiny_model("llama")

"""Shared fixtures. Tests run offline; real-model tests are marked ``slow``."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@functools.cache
def _tiny(family: str) -> tuple[Any, Any]:
    from ssah.tiny import build_tiny_model

    return build_tiny_model(family)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[[str], tuple[Any, Any]]:
    """``tiny_model(family)``: the tiny random model of ``family`` (seed 0) and the byte-level tokenizer, built once
    per session and shared read-only (a test that edits weights builds its own with ``build_tiny_model``)."""
    return _tiny


@pytest.fixture(scope="session")
def tiny_llama(tiny_model: Callable[[str], tuple[Any, Any]]) -> tuple[Any, Any]:
    """A tiny random Llama (GQA) with the byte-level tokenizer, shared read-only across tests."""
    return tiny_model("llama")


@pytest.fixture
def user_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Callable[..., str]:
    """``user_error(args, needle, watch=tmp_path)``: run the CLI and assert the bad-input promise (exit 2, one
    ``error:`` line containing ``needle``, no traceback, nothing written under ``watch``); see tests/helpers.py."""
    from helpers import assert_user_error

    def check(args: list[str], needle: str, *, watch: Path | None = None) -> str:
        return assert_user_error(args, needle, watch=tmp_path if watch is None else watch, capsys=capsys)

    return check

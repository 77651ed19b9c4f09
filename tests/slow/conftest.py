"""Fixtures of the slow real-model tests: SmolLM2 as shipped (unaligned) and its cached aligned version."""

from __future__ import annotations

from pathlib import Path

import pytest

BASE = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def aligned_smollm2() -> Path:
    """Folder of SmolLM2 aligned by `ssah align`'s default recipe (trained once, then from $SSAH_CACHE)."""
    from ssah.recipes.align.run import aligned_model

    return aligned_model(BASE)

"""Small helpers every forward-only pass shares: eval mode without gradients, and the model's device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def frozen_eval(model: Any, *, inference: bool = False) -> Iterator[None]:
    """Eval mode (no dropout) and no gradients for the block (``torch.inference_mode`` when ``inference``);
    the model's training flag is restored afterwards, also on errors."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def model_device(model: Any) -> torch.device:
    """Where the model's inputs go (its first parameter's device; the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_id(tokenizer: Any, eos: list[int] | None = None) -> int:
    """The id to pad with: the tokenizer's pad token, else its (or the given) first EOS id, else 0; padded
    positions are always masked out, so any id works, but a real token keeps embeddings in range."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        pad = (eos[0] if eos else None) if tok_eos is None else tok_eos
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    return int(pad) if pad is not None else 0

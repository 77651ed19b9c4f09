"""Helpers every forward-only pass shares: eval mode without gradients, the device inputs go to, the pad id."""

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
    """Where the model's inputs go: its input embeddings' execution device when accelerate dispatched the model
    (their weights may be offloaded to the meta device), else its first real parameter's device; the CPU for a
    model without parameters."""
    get_emb = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_emb() if callable(get_emb) else None
    except NotImplementedError:
        emb = None
    hook_device = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(f"cuda:{hook_device}" if isinstance(hook_device, int) else hook_device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
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

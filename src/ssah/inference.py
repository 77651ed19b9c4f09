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


def label_columns(labels: torch.Tensor) -> torch.Tensor:
    """The columns of shifted labels (``labels[:, 1:]``, -100 where nothing is predicted) that hold a label in some
    row: the positions whose logits a response loss or perplexity reads (pass them to :func:`logits_at`)."""
    return (labels != -100).any(dim=0).nonzero().flatten()


def logits_at(model: Any, keep: int | torch.Tensor, **inputs: Any) -> torch.Tensor:
    """The model's logits only where they are read: ``keep`` an int, the last ``keep`` positions; a 1-D tensor,
    those positions (columns). Returns ``[batch, positions, vocab]`` in the model's dtype.

    Why: the vocabulary projection is about a fifth of a small model's forward (a 50k-130k vocabulary), and the
    full logits of a batch take hundreds of MB; perplexity, KL, selection and the training loss read only some
    positions. The values at the kept positions are those of the full pass. A model class without
    ``logits_to_keep`` (or one that ignores a tensor) computes them all and they are cut here.
    """
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep must be at least 1 position, got {keep}")
    try:
        out = model(**inputs, logits_to_keep=keep)
    except TypeError:  # a model class without logits_to_keep
        out = model(**inputs)
    logits = out.logits
    wanted = keep if isinstance(keep, int) else int(keep.numel())
    if logits.shape[1] != wanted:
        logits = logits[:, -keep:] if isinstance(keep, int) else logits[:, keep.to(logits.device)]
    return logits

"""The training loss: cross-entropy of the response tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the response tokens (labels != -100) and their count.

    Only the labelled positions' logits are upcast to float32, which keeps memory low for large vocabularies.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = out.logits[:, :-1][keep].float()
    targets = labels[keep]
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())

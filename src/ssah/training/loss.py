"""The training loss: cross-entropy of the response tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssah.inference import label_columns, logits_at


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the response tokens (labels != -100) and their count.

    Logits are computed only at the positions that predict a response token in some row (prompt positions need
    none; the vocabulary projection of every token would cost time and memory), and only the labelled ones are
    upcast to float32. A batch without response tokens gives a zero loss still connected to the graph.
    """
    labels = batch["labels"][:, 1:]
    positions = label_columns(labels)
    if positions.numel() == 0:
        positions = torch.zeros(1, dtype=torch.long, device=labels.device)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    logits = logits_at(model, positions, **inputs)
    targets = labels[:, positions]
    keep = targets != -100
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"), int(keep.sum())

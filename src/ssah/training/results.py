"""What a training run did (:class:`TrainResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class TrainResult:
    """What a training run did. ``model`` is the trained, plain model (deltas and LoRA merged)."""

    model: nn.Module
    mode: str
    steps: int
    total_steps: int
    losses: list[float]
    seconds: float
    trainable: dict[str, int | float]
    tokens: int
    response_tokens: int
    examples: int
    skipped: int
    epochs: float
    resumed_from: int | None = None
    frozen_max_drift: float | None = None
    unit_slices: dict[str, Any] | None = None  # SliceReport of the frozen / trained units (shares, GQA sharing)
    log: list[dict[str, Any]] = field(default_factory=list)
    fsdp: bool = False

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (everything but the model and the log)."""
        return {
            "mode": self.mode,
            "steps": self.steps,
            "total_steps": self.total_steps,
            "epochs": round(self.epochs, 4),
            "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "trainable": self.trainable,
            "tokens": self.tokens,
            "response_tokens": self.response_tokens,
            "examples": self.examples,
            "skipped_examples": self.skipped,
            "resumed_from": self.resumed_from,
            "frozen_max_drift": self.frozen_max_drift,
            "unit_slices": self.unit_slices,
            "fsdp": self.fsdp,
            "seconds": round(self.seconds, 3),
        }

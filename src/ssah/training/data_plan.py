"""The data order of a run: which examples every rank sees in every micro-batch of every optimizer step."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ssah.data import Encoded
from ssah.errors import DataError


class DataPlan:
    """Which examples every rank sees in every micro-batch of every optimizer step: a pure function of the seed.

    Each epoch shuffles the examples with ``torch.Generator().manual_seed(seed, epoch)``; a global micro-batch is
    ``batch_size * world`` consecutive examples (rank ``r`` takes its ``r``-th slice; with several ranks a short
    last batch wraps around to the epoch's start), and an optimizer step takes ``grad_accum`` micro-batches (the
    last step of an epoch may take fewer).
    """

    def __init__(
        self,
        encoded: Sequence[Encoded],
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        world: int = 1,
        epochs: int | None = None,
        max_steps: int | None = None,
    ) -> None:
        if not encoded:
            raise DataError("no training examples: pass a data set with at least one example")
        self.n = len(encoded)
        self.batch_size, self.grad_accum, self.seed, self.world = batch_size, grad_accum, seed, world
        self.response_tokens = [sum(e.response_mask) for e in encoded]
        self.lengths = [len(e.input_ids) for e in encoded]
        self.micro_per_epoch = math.ceil(self.n / (batch_size * world))
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / grad_accum)
        if epochs is None and max_steps is None:
            epochs = 1
        limits = [x for x in (max_steps, None if epochs is None else epochs * self.steps_per_epoch) if x is not None]
        self.total_steps = min(limits)
        self._cached: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        """The shuffled example order of an epoch."""
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._cached[1]

    def step(self, step: int) -> list[list[list[int]]]:
        """Micro-batches of optimizer step ``step`` (0-based): ``[micro][rank] -> example indices``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.order(epoch)
        width = self.batch_size * self.world
        out = []
        for m in range(k * self.grad_accum, min((k + 1) * self.grad_accum, self.micro_per_epoch)):
            chunk = perm[m * width : (m + 1) * width]
            if len(chunk) < width and self.world > 1:
                chunk = chunk + [perm[j % self.n] for j in range(width - len(chunk))]
            out.append([chunk[r * self.batch_size : (r + 1) * self.batch_size] for r in range(self.world)])
        return out

    def epoch_of(self, step: int) -> float:
        """Epochs completed after ``step`` optimizer steps."""
        return step / self.steps_per_epoch

"""``pruning-sets``: with the same ``sparsity`` for both scores, units pruned under the utility score but kept under
the safety score are SCU, the converse UCU, pruned under both RU, kept under both CU."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ssah.rules.base import Masks, register_rule, take


def split(s: torch.Tensor, u: torch.Tensor, shares: Mapping[str, float]) -> Masks:
    everyone = torch.ones(s.numel(), dtype=torch.bool)
    keep_s = ~take(torch.argsort(s, stable=True), everyone, round(shares["sparsity"] * s.numel()))
    keep_u = ~take(torch.argsort(u, stable=True), everyone, round(shares["sparsity"] * s.numel()))
    return keep_s & ~keep_u, keep_u & ~keep_s, ~keep_s & ~keep_u


register_rule(
    "pruning-sets",
    split,
    shares={"sparsity": 0.5},
    about="prune the same share under each score: pruned only by utility = SCU, only by safety = UCU",
)

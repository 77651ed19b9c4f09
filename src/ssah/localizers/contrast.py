"""``activation-contrast`` and ``aligned-vs-base``: units whose activations differ most between two conditions.

``activation-contrast`` compares harmful with harmless prompts on the aligned model (the neuron-level analogue of
the refusal direction; Chen et al. 2024, CNA's neuron circuits); ``aligned-vs-base`` compares the aligned model with
its base on harmful prompts (Chen et al.'s contrast). The score is a standardised difference of means,
``|m_a - m_b| / sqrt((v_a + v_b) / 2)``: a unit that is large on every prompt has a large raw difference of means by
scale alone, and dividing by its spread keeps it out unless the conditions really separate it."""

from __future__ import annotations

import torch

from ssah.localizers.base import Evidence, register_localizer, top_k
from ssah.units import UnitSet

EPS = 1e-12  # a unit constant under both conditions has no contrast, not an infinite one


def standardised_difference(m_a: torch.Tensor, m_b: torch.Tensor, v_a: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """|m_a - m_b| / pooled standard deviation, per unit (0 where both spreads are 0)."""
    pooled = ((v_a + v_b) / 2).clamp_min(0).sqrt()
    return torch.where(pooled > EPS, (m_a - m_b).abs() / pooled.clamp_min(EPS), torch.zeros_like(pooled))


def harmful_vs_harmless(evidence: Evidence, k: int, seed: int = 0) -> UnitSet:
    d = standardised_difference(
        evidence.mean("harmful"), evidence.mean("harmless"), evidence.var("harmful"), evidence.var("harmless")
    )
    return top_k(d, k, evidence.space, name="activation-contrast")


def aligned_vs_base(evidence: Evidence, k: int, seed: int = 0) -> UnitSet:
    d = standardised_difference(
        evidence.mean("harmful"),
        evidence.mean("harmful", "base"),
        evidence.var("harmful"),
        evidence.var("harmful", "base"),
    )
    return top_k(d, k, evidence.space, name="aligned-vs-base")


register_localizer(
    "activation-contrast",
    harmful_vs_harmless,
    about="units whose mean activation separates harmful from harmless prompts (standardised difference)",
)
register_localizer(
    "aligned-vs-base",
    aligned_vs_base,
    needs_base=True,
    about="units whose activation on harmful prompts differs most between the aligned model and its base",
)

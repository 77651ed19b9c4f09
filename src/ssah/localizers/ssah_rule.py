"""``ssah``: SCU by the paper's rule at a budget. Fluctuation scores on the safety and utility calibration sets,
normalised as the categorisation does (the shipped default), RU (lowest I_S + I_U, the rule's default share) set
aside, then the ``k`` units with the highest I_S - I_U."""

from __future__ import annotations

import torch

from ssah.categorize import normalize_scores
from ssah.localizers.base import Evidence, register_localizer, top_k
from ssah.rules import RULES
from ssah.rules.base import DEFAULT_NORMALIZATION, take
from ssah.units import UnitSet

METRIC = "fluctuation"


def scu_at_budget(evidence: Evidence, k: int, seed: int = 0) -> UnitSet:
    space = evidence.space
    s = normalize_scores(evidence.scores(METRIC, "safety"), space, DEFAULT_NORMALIZATION, "global")
    u = normalize_scores(evidence.scores(METRIC, "utility"), space, DEFAULT_NORMALIZATION, "global")
    everyone = torch.ones(space.total, dtype=torch.bool)
    ru_share = RULES.get("ssah").shares["ru"]
    ru = take(torch.argsort(s + u, stable=True), everyone, round(ru_share * space.total))
    return top_k(s - u, k, space, allowed=~ru, name="ssah")


register_localizer(
    "ssah",
    scu_at_budget,
    about="SSAH's SCU: fluctuation scores, the default normalisation, RU set aside, top I_S - I_U",
)

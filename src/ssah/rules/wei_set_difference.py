"""``wei-set-difference`` (Wei et al. 2024): SCU = top-q by I_S minus top-p by I_U; UCU = top-p by I_U minus top-q
by I_S; CU = in both top sets; RU = in neither (shares ``q``, ``p``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ssah.rules.base import Masks, register_rule, take


def split(s: torch.Tensor, u: torch.Tensor, shares: Mapping[str, float]) -> Masks:
    everyone = torch.ones(s.numel(), dtype=torch.bool)
    keep_s = take(torch.argsort(-s, stable=True), everyone, round(shares["q"] * s.numel()))
    keep_u = take(torch.argsort(-u, stable=True), everyone, round(shares["p"] * s.numel()))
    return keep_s & ~keep_u, keep_u & ~keep_s, ~keep_s & ~keep_u


register_rule(
    "wei-set-difference",
    split,
    shares={"q": 0.05, "p": 0.05},
    about="Wei et al. 2024: top-q by safety minus top-p by utility = SCU, the converse UCU",
)

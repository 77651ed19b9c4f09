"""``ssah``: RU = lowest I_S + I_U; then, among the rest, SCU = highest I_S - I_U and UCU = lowest I_S - I_U;
CU = everything else (shares ``ru``, ``scu``, ``ucu`` of the units in each ranking domain). The default shares
are those the paper reports for Llama-2-7B-Chat (Table 1)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ssah.errors import UserError
from ssah.rules.base import Masks, register_rule, take


def split(s: torch.Tensor, u: torch.Tensor, shares: Mapping[str, float]) -> Masks:
    n = s.numel()
    everyone = torch.ones(n, dtype=torch.bool)
    ru = take(torch.argsort(s + u, stable=True), everyone, round(shares["ru"] * n))
    diff = s - u
    scu = take(torch.argsort(-diff, stable=True), ~ru, round(shares["scu"] * n))
    ucu = take(torch.argsort(diff, stable=True), ~ru & ~scu, round(shares["ucu"] * n))
    return scu, ucu, ru


def check(shares: dict[str, float]) -> None:
    if sum(shares.values()) > 1.0 + 1e-9:
        raise UserError(f"shares {shares} sum to {sum(shares.values()):.3f}, past 1: make scu + ucu + ru at most 1")


register_rule(
    "ssah",
    split,
    shares={"scu": 0.013, "ucu": 0.133, "ru": 0.148},
    check=check,
    about="RU = lowest safety + utility; then SCU / UCU = highest / lowest safety - utility",
)

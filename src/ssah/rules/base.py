"""What every categorisation rule and score normalisation shares: the :class:`Rule` and :class:`Normalization`
they register, their registries, and :func:`register_rule` / :func:`register_normalization`, the one call that
adds either (built-in or a user's)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from ssah.errors import UserError
from ssah.plugins import Registry

__all__ = [
    "CATEGORIES",
    "DEFAULT_NORMALIZATION",
    "NORMALIZATIONS",
    "RULES",
    "Masks",
    "Normalization",
    "Rule",
    "Scope",
    "register_normalization",
    "register_rule",
    "take",
]

CATEGORIES: tuple[str, ...] = ("SCU", "UCU", "CU", "RU")
# Ranking domains (where a rule's shares are applied): all units (heads and neurons apart) or each module.
Ranking = Literal["global", "per-module"]
RANKINGS: tuple[Ranking, ...] = ("global", "per-module")
# The default, chosen by measurement (benchmarks/normalization_study.py on the aligned SmolLM2, see the README):
# with one global mean, magnitude chooses (late MLP units fill RU and ablating RU breaks the model); a z-score
# within each (layer, kind) module keeps RU ablation far milder, keeps SCU ablation specific against stratified
# random units and is the most stable of the per-module choices across data halves.
DEFAULT_NORMALIZATION = "zscore"

Masks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """A categorisation rule: ``split(s, u, shares)`` takes the normalised safety and utility scores of one ranking
    domain and the shares (defaults filled in) and returns three disjoint boolean masks, (SCU, UCU, RU); every
    other unit is CU. ``shares`` are the rule's default shares (their keys are the shares it takes); ``check``,
    if given, refuses a combination of shares with a one-line :class:`UserError`."""

    split: Callable[[torch.Tensor, torch.Tensor, Mapping[str, float]], Masks]
    shares: dict[str, float] = field(default_factory=dict)
    check: Callable[[dict[str, float]], None] | None = None


Scope = Literal["module", "domain", "none"]


@dataclass(frozen=True)
class Normalization:
    """A score normalisation: ``statistic`` maps one float64 vector to its normalised values; ``scope`` is where
    the vector spans: each (layer, kind) ``module``, each ranking ``domain``, or ``none`` (scores unchanged)."""

    statistic: Callable[[torch.Tensor], torch.Tensor]
    scope: Scope


RULES: Registry[Rule] = Registry("rule")
"""Every categorisation rule by name (live: a registered rule is valid in every config and command)."""
NORMALIZATIONS: Registry[Normalization] = Registry("normalization")
"""Every score normalisation by name."""


def register_rule(
    name: str,
    split: Callable[[torch.Tensor, torch.Tensor, Mapping[str, float]], Masks],
    *,
    shares: Mapping[str, float],
    check: Callable[[dict[str, float]], None] | None = None,
    about: str = "",
) -> Rule:
    """Make ``name`` a rule everywhere (``categorize(rule=name)``, ``--rule name``, configs); see :class:`Rule`."""
    if not callable(split):
        raise UserError(f"the split of rule {name!r} is not callable: pass a function (s, u, shares) -> masks")
    return RULES.register(name, Rule(split, dict(shares), check), about=about)


def register_normalization(
    name: str, statistic: Callable[[torch.Tensor], torch.Tensor], *, scope: Scope, about: str = ""
) -> Normalization:
    """Make ``name`` a normalisation everywhere (``categorize(normalization=name)``, ``--normalization name``)."""
    if scope not in ("module", "domain", "none"):
        raise UserError(f"scope of normalization {name!r} must be module, domain or none, not {scope!r}")
    if not callable(statistic):
        raise UserError(f"the statistic of normalization {name!r} is not callable: pass a function of a vector")
    return NORMALIZATIONS.register(name, Normalization(statistic, scope), about=about)


def take(order: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` indices of ``order`` that are allowed, as a bool mask."""
    picked = order[allowed[order]][:k]
    mask = torch.zeros_like(allowed)
    mask[picked] = True
    return mask

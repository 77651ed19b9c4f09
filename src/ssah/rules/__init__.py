"""Categorisation rules and score normalisations: one registry each, the built-ins registering themselves.

A rule splits the units of one ranking domain into safety-critical (SCU), utility-critical (UCU), complex (CU) and
redundant (RU) units from their normalised safety and utility scores; the built-ins, one file each: ``ssah``,
``pruning-sets``, ``wei-set-difference``. The normalisations (``mean``, ``module-mean``, ``zscore``, ``rank``,
``global-rank``, ``none``) are in :mod:`ssah.rules.normalizations`. :func:`ssah.categorize.categorize` applies both.

A rule or a normalisation of your own is one call, the one the built-ins make::

    from ssah.rules import register_rule, take

    def top_safety(s, u, shares):  # (SCU, UCU, RU) masks; the rest is CU
        scu = take(torch.argsort(-s, stable=True), torch.ones_like(s, dtype=torch.bool), round(shares["k"] * len(s)))
        return scu, torch.zeros_like(scu), torch.zeros_like(scu)

    register_rule("top-safety", top_safety, shares={"k": 0.01})
"""

from __future__ import annotations

from ssah.rules.base import (
    CATEGORIES,
    DEFAULT_NORMALIZATION,
    NORMALIZATIONS,
    RANKINGS,
    RULES,
    Masks,
    Normalization,
    Ranking,
    Rule,
    Scope,
    register_normalization,
    register_rule,
    take,
)

__all__ = [
    "CATEGORIES",
    "DEFAULT_NORMALIZATION",
    "NORMALIZATIONS",
    "RANKINGS",
    "RULES",
    "Masks",
    "Normalization",
    "Ranking",
    "Rule",
    "Scope",
    "register_normalization",
    "register_rule",
    "take",
]

# The built-ins register on import, in this order (the order of help texts and error messages).
# isort: off
from ssah.rules import ssah, pruning_sets, wei_set_difference, normalizations  # noqa: F401
# isort: on

RULES.seal()
NORMALIZATIONS.seal()

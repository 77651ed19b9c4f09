"""Localisation methods: which units carry safety, at a fixed budget of units (``ssah localize``).

One registry (:data:`LOCALIZERS`); a method is a function ``(evidence, k, seed) -> UnitSet`` registered with
:func:`register_localizer`, the same call the built-ins make, one file each: ``ssah`` (the paper's SCU),
``wei-snip`` / ``wei-wanda`` (Wei et al. 2024's set difference), ``activation-contrast`` and ``aligned-vs-base``
(standardised differences of mean activations), ``random`` (uniform draws).
"""

from ssah.localizers.base import (
    LOCALIZERS,
    Evidence,
    EvidenceSource,
    Localizer,
    budget_units,
    parse_budgets,
    register_localizer,
    top_k,
)

# The built-ins register on import, in this order (the order of help texts and error messages).
# isort: off
from ssah.localizers import ssah_rule, wei, contrast, uniform  # noqa: F401
# isort: on

LOCALIZERS.seal()

__all__ = [
    "LOCALIZERS",
    "Evidence",
    "EvidenceSource",
    "Localizer",
    "budget_units",
    "parse_budgets",
    "register_localizer",
    "top_k",
]

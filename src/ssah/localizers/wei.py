"""``wei-snip`` and ``wei-wanda``: Wei et al. 2024's set difference, structured per unit as ssah scores units.

Their rule keeps the top-q units by safety importance that are not in the top-p by utility importance. At a budget
of ``k`` units, q is whatever makes the difference hold exactly ``k`` units: the safety ranking is walked and the
top-p utility units skipped. ``p`` is fixed (:data:`UTILITY_SHARE`, the middle of their grid) rather than searched,
because a search would choose it on the prompts the comparison is then evaluated on; register another value with
:func:`set_difference` (``register_localizer("wei-snip-p10", set_difference("snip", 0.10))``)."""

from __future__ import annotations

import torch

from ssah.localizers.base import Evidence, LocalizeFn, register_localizer, top_k
from ssah.units import UnitSet

UTILITY_SHARE = 0.05  # p: the share of units kept for utility, excluded from the safety set


def set_difference(metric: str, p: float = UTILITY_SHARE) -> LocalizeFn:
    """A method: the top units by ``metric`` on the safety set, minus the top-``p`` share on the utility set."""

    def localize(evidence: Evidence, k: int, seed: int = 0) -> UnitSet:
        space = evidence.space
        u = evidence.scores(metric, "utility")
        top_u = torch.zeros(space.total, dtype=torch.bool)
        top_u[torch.argsort(-u, stable=True)[: round(p * space.total)]] = True
        return top_k(evidence.scores(metric, "safety"), k, space, allowed=~top_u, name=f"wei-{metric}")

    return localize


register_localizer(
    "wei-snip",
    set_difference("snip"),
    about=f"Wei et al. 2024: top SNIP on safety minus the top {UTILITY_SHARE:.0%} SNIP on utility",
)
register_localizer(
    "wei-wanda",
    set_difference("wanda"),
    about=f"Wei et al. 2024: top Wanda on safety minus the top {UTILITY_SHARE:.0%} Wanda on utility",
)

"""``random``: ``k`` units drawn uniformly from all units, one set per seed (the chance row). Each method's own
control is drawn differently, with its set's count in every (layer, kind) cell (``ssah.measure.random_control``)."""

from __future__ import annotations

import torch

from ssah.localizers.base import Evidence, register_localizer
from ssah.units import UnitSet


def uniform(evidence: Evidence, k: int, seed: int = 0) -> UnitSet:
    g = torch.Generator().manual_seed(seed)
    return UnitSet.from_indices(evidence.space, torch.randperm(evidence.space.total, generator=g)[:k], name="random")


register_localizer("random", uniform, seeded=True, about="k units drawn uniformly at random (one set per seed)")

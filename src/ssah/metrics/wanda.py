"""``wanda`` (Sun et al. 2023): sum_i |W[i, j]| * ||X_j||_2, where ||X_j||_2 is the L2 norm of channel j over all
calibration tokens (from the streaming statistics: sum x^2 = M2 + n * mean^2)."""

from __future__ import annotations

import torch

from ssah.metrics.base import ScoreInputs, per_unit, register_metric


def wanda(x: ScoreInputs) -> torch.Tensor:
    return x.stats.l2_norm * per_unit(x.reader_weight().detach().abs(), x.group)


register_metric("wanda", wanda, about="Wanda: |W| summed over the unit's reader slice x activation L2 norm")

"""``fluctuation`` (FLAP, An et al. 2024): variance of x_j over calibration tokens x ||W[:, j]||_2^2."""

from __future__ import annotations

import torch

from ssah.metrics.base import ScoreInputs, register_metric


def fluctuation(x: ScoreInputs) -> torch.Tensor:
    return x.stats.var * x.reader_column_norms().to(torch.float64).square()


register_metric("fluctuation", fluctuation, about="FLAP: activation variance x squared reader-column norm")

"""``magnitude``: ||W[:, j]||_2, the norm of the unit's reader column (data-free)."""

from __future__ import annotations

import torch

from ssah.metrics.base import ScoreInputs, register_metric


def magnitude(x: ScoreInputs) -> torch.Tensor:
    return x.reader_column_norms().to(torch.float64)


register_metric("magnitude", magnitude, about="reader-column L2 norm (data-free)")

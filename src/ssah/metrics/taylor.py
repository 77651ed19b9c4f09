"""``taylor`` (first-order Taylor score of the set loss): sum_i |W[i, j] * dL/dW[i, j]| with L = (1/N) sum_e L_e,
the gradient of the whole set (per-example gradients can cancel: this is not SNIP)."""

from __future__ import annotations

import torch

from ssah.metrics.base import ScoreInputs, per_unit, register_metric


def taylor(x: ScoreInputs) -> torch.Tensor:
    w = x.reader_weight().detach().to(torch.float64).cpu()
    return per_unit((w * x.statistics.grad_sum[x.group.key]).abs(), x.group) / x.examples


register_metric("taylor", taylor, gradients="set", about="first-order Taylor: |W * dL/dW| of the whole set's loss")

"""``snip`` (SNIP as used by Wei et al. 2024, arXiv 2402.05162): (1/N) sum_e sum_i |W[i, j] * dL_e/dW[i, j]|, with
L_e the mean response-token cross-entropy of example e and N the examples; per-example gradients are taken before
the absolute value, so they cannot cancel (the sums come from the pass: ``statistics.example_sum``)."""

from __future__ import annotations

import torch

from ssah.metrics.base import ScoreInputs, register_metric


def snip(x: ScoreInputs) -> torch.Tensor:
    return x.statistics.example_sum[x.group.key] / x.examples


register_metric("snip", snip, gradients="example", about="SNIP: per-example |W * dL_e/dW|, averaged over examples")

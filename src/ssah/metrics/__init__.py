"""Importance metrics: one raw, non-negative score per unit, one file per metric, each registering itself.

Unit j of a group is input channel j of its reader weight W (column j of an ``nn.Linear`` weight ``[out, in]``,
row j of a GPT-2 ``Conv1D``); per-weight scores are reduced to a unit by summing over its reader slice
(:func:`per_unit`). The built-ins, each named after the paper whose formula it computes (formula in its module):
``fluctuation`` (FLAP), ``wanda``, ``snip``, ``taylor`` and ``magnitude``.

A metric of your own is one call, the one the built-ins make::

    from ssah.metrics import ScoreInputs, register_metric

    def l1(x: ScoreInputs) -> torch.Tensor:        # one float64 value per unit of x.group
        return x.stats.l2_norm * x.reader_column_norms().to(torch.float64)

    register_metric("l1", l1, about="activation norm x reader norm")

after which ``score_units(..., metric="l1")``, ``metric: l1`` in a config and ``--metric l1`` all work.
"""

from __future__ import annotations

from ssah.metrics.base import (
    GRADIENT_MODES,
    METRICS,
    GradientMode,
    Metric,
    ScoreInputs,
    check_metric,
    metric_names,
    per_unit,
    register_metric,
)

__all__ = [
    "GRADIENT_MODES",
    "METRICS",
    "GradientMode",
    "Metric",
    "ScoreInputs",
    "check_metric",
    "metric_names",
    "per_unit",
    "register_metric",
]

# The built-ins register on import, in this order (the order of help texts and error messages).
# isort: off
from ssah.metrics import fluctuation, wanda, snip, taylor, magnitude  # noqa: F401
# isort: on

METRICS.seal()

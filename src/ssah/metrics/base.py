"""What every importance metric shares: the :class:`Metric` it registers, the inputs it reads for one unit group
(:class:`ScoreInputs`), the registry and :func:`register_metric`, the one call that adds a metric (built-in or
a user's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ssah.errors import UserError
from ssah.plugins import Registry

if TYPE_CHECKING:
    from ssah.arch import ArchAdapter, UnitGroup
    from ssah.stats import RunningStats, UnitStatistics

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

# Which gradients a pass collects: none, the set gradient (taylor), per-example |W * grad| sums (snip), or both.
GradientMode = Literal["none", "set", "example", "both"]
GRADIENT_MODES: tuple[GradientMode, ...] = ("none", "set", "example", "both")


@dataclass(frozen=True)
class ScoreInputs:
    """What a metric reads to score the units of one group: the group, its reader (through the adapter), the
    streaming statistics of the calibration pass and the number of examples that had a gradient."""

    adapter: ArchAdapter
    group: UnitGroup
    statistics: UnitStatistics
    examples: int

    @property
    def stats(self) -> RunningStats:
        """The group's activation statistics (``var``, ``l2_norm``, ``mean`` ... per input channel)."""
        return self.statistics.groups[self.group.key]

    def reader_weight(self) -> torch.Tensor:
        """The group's reader weight (``[out, in]`` for ``nn.Linear``, ``[in, out]`` for GPT-2's ``Conv1D``)."""
        return self.adapter.reader_weight(self.group)

    def reader_column_norms(self) -> torch.Tensor:
        """||W[:, j]||_2 of every unit j of the group."""
        return self.adapter.reader_column_norms(self.group)


@dataclass(frozen=True)
class Metric:
    """An importance metric: ``score`` maps a group's :class:`ScoreInputs` to one raw non-negative value per
    unit (negative values are clamped to 0); ``gradients`` says what the calibration pass must collect:
    ``"none"``, ``"set"`` (``statistics.grad_sum``) or ``"example"`` (``statistics.example_sum``)."""

    score: Callable[[ScoreInputs], torch.Tensor]
    gradients: GradientMode = "none"


METRICS: Registry[Metric] = Registry("metric")
"""Every importance metric by name (live: a registered metric is valid in every config and command)."""


def register_metric(
    name: str, score: Callable[[ScoreInputs], torch.Tensor], *, gradients: GradientMode = "none", about: str = ""
) -> Metric:
    """Make ``name`` a metric everywhere (``score_units(metric=name)``, ``--metric name``, configs): ``score``
    gets a group's :class:`ScoreInputs` and returns one value per unit; ``about`` is its line in help texts."""
    if gradients not in GRADIENT_MODES:
        raise UserError(f"gradients of metric {name!r} must be one of {', '.join(GRADIENT_MODES)}, not {gradients!r}")
    if not callable(score):
        raise UserError(f"the score of metric {name!r} is not callable: pass a function of ScoreInputs")
    return METRICS.register(name, Metric(score, gradients), about=about)


def metric_names() -> tuple[str, ...]:
    """The registered metrics, built-ins first."""
    return METRICS.names()


def check_metric(metric: str) -> str:
    """``metric`` if it is registered, else a one-line :class:`UserError` naming the metrics."""
    return METRICS.check(metric)


def per_unit(per_weight: torch.Tensor, g: UnitGroup) -> torch.Tensor:
    """Sum a per-weight score (shape of the reader weight) over each unit's reader slice: float64 [g.size]."""
    rows = per_weight.movedim(g.reader.dim, 0)
    summed = rows.reshape(rows.shape[0], -1).to(torch.float64).sum(dim=1)
    return summed[g.reader.index.to(summed.device)].cpu()

"""Evidence computed from a model and its data: one statistics pass per (data set, model, gradients needed),
shared by every method that reads it (fluctuation and Wanda read the same pass; SNIP adds per-example gradients)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ssah.data.prompt_sets import PromptSet
from ssah.errors import UserError
from ssah.localizers.base import Key
from ssah.scoring import collect_statistics, compute_scores, gradient_mode
from ssah.stats import UnitStatistics
from ssah.units import UnitSpace


@dataclass
class ModelEvidence:
    """An :class:`~ssah.localizers.base.EvidenceSource` over ``model`` (and ``base``, for the aligned-vs-base
    contrast): scores on the ``safety`` / ``utility`` calibration sets (prompt and response tokens, as ``ssah units``
    scores them), activation statistics over the prompt tokens of ``harmful`` / ``harmless``."""

    model: Any
    tokenizer: Any
    space: UnitSpace
    data: dict[str, PromptSet]  # "safety", "utility", "harmful", "harmless"
    base: Any = None  # the base model (same architecture), or None
    batch_size: int = 8
    max_length: int | None = 512
    progress: bool = True
    _stats: dict[tuple[str, str, str], UnitStatistics] = field(default_factory=dict, repr=False)

    def statistics(self, which: str, model: str = "aligned", gradients: str = "none") -> UnitStatistics:
        """The statistics pass over ``which`` (a key of ``data``) on ``model``, computed once."""
        key = (which, model, gradients)
        if key not in self._stats:
            net = self.model if model == "aligned" else self.base
            if net is None:
                raise UserError("the aligned-vs-base method needs the base model: pass --base BASE_MODEL")
            region = "prompt" if which in ("harmful", "harmless") else "prompt+response"
            self._stats[key] = collect_statistics(
                net,
                self.tokenizer,
                self.data[which],
                region=region,  # type: ignore[arg-type]
                batch_size=self.batch_size,
                max_length=self.max_length,
                gradients=gradients,  # type: ignore[arg-type]
                progress=self.progress,
                desc=f"{which} ({model})",
            )
        return self._stats[key]

    def compute(self, key: Key) -> torch.Tensor:
        """The piece ``key`` (see :class:`~ssah.localizers.base.EvidenceSource`)."""
        if key[0] == "scores":
            _, metric, which = key
            stats = self.statistics(which, "aligned", gradient_mode(metric))
            return compute_scores(self.model, stats, metric, self.space).flat()
        what, model, which = key
        stats = self.statistics(which, model, "none")
        per_group = {k: getattr(g, what).to(torch.float64) for k, g in stats.groups.items()}
        return self.space.join(per_group)

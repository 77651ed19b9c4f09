"""Stratified random controls: random unit sets with the controlled set's count in every stratum (by default every
(layer, kind) cell, and every routed expert), the control of every unit-set effect ssah measures.

Split out of :mod:`ssah.measure` (which re-exports it) so each module keeps to one concern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ssah.errors import UserError
from ssah.units import UnitSet, UnitSpace

Strata = Literal["layer-kind", "layer", "kind", "none"]
STRATA: tuple[str, ...] = ("layer-kind", "layer", "kind", "none")


def _cell_keys(space: UnitSpace, strata: str) -> list[tuple[str, slice]]:
    """(stratum label, flat slice) for every group; groups sharing a label form one stratum. Under ``layer-kind``
    each routed expert is a stratum of its own (``3.expert.5``): a control keeps its count per expert."""
    out = []
    for sh in space.shapes:
        cell = f"{sh.layer}.{sh.kind}" if sh.expert is None else f"{sh.layer}.{sh.kind}.{sh.expert}"
        label = {"layer-kind": cell, "layer": str(sh.layer), "kind": sh.kind, "none": "all"}[strata]
        out.append((label, space.group_slice(sh.layer, sh.kind, sh.expert)))
    return out


@dataclass
class Control:
    """A random control of one unit set: the drawn units and the per-stratum counts they keep."""

    units: UnitSet
    seed: int
    strata: str
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"seed": self.seed, "strata": self.strata, "count": len(self.units), "per_stratum": self.counts}


def random_control(
    units: UnitSet,
    seed: int,
    *,
    strata: str = "layer-kind",
    exclude: UnitSet | None = None,
    match_scores: torch.Tensor | None = None,
    bins: int = 4,
) -> Control:
    """Random units with the same count as ``units`` in every stratum (by default every (layer, kind) cell).

    ``strata="none"`` draws uniformly over all units (count matched only: the old control, kept for
    comparison). ``exclude`` keeps those units out of the draw (e.g. the controlled set itself).
    ``match_scores`` (flat, one value per unit) also matches the score quantile: within each stratum the units
    are split into ``bins`` quantile bins and each bin keeps its count. Units whose ``match_scores`` are NaN
    (unscored: experts with too few routed tokens) are never drawn. Reproducible by seed.
    """
    if strata not in STRATA:
        raise UserError(f"unknown control strata {strata!r}: use one of {', '.join(STRATA)}")
    if isinstance(seed, bool) or not 0 <= int(seed) < 2**63:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if bins < 1:
        raise UserError(f"bins must be at least 1, got {bins}")
    space = units.space
    g = torch.Generator().manual_seed(int(seed))
    mask = torch.zeros(space.total, dtype=torch.bool)
    allowed = ~exclude.mask if exclude is not None else torch.ones(space.total, dtype=torch.bool)
    if match_scores is not None:
        allowed = allowed & ~torch.isnan(match_scores.to(torch.float64))
    cells: dict[str, list[slice]] = {}
    for label, sl in _cell_keys(space, strata):
        cells.setdefault(label, []).append(sl)
    counts: dict[str, int] = {}
    for label, slices in cells.items():
        idx = torch.cat([torch.arange(sl.start, sl.stop) for sl in slices])
        parts = [idx]
        if match_scores is not None:
            # quantile bins of the score inside this stratum: ranks cut into `bins` equal runs
            order = idx[torch.argsort(match_scores[idx].to(torch.float64), stable=True)]
            parts = [p for p in torch.tensor_split(order, bins) if p.numel()]
        for part in parts:
            need = int(units.mask[part].sum())
            if need == 0:
                continue
            pool = part[allowed[part]]
            if need > pool.numel():
                raise UserError(
                    f"cannot draw {need} control units in stratum {label} from {pool.numel()} allowed units: "
                    "use a coarser --control-strata (layer, kind or none) or do not exclude the set"
                )
            mask[pool[torch.randperm(pool.numel(), generator=g)[:need]]] = True
            counts[label] = counts.get(label, 0) + need
    name = f"random({units.name},seed={seed},strata={strata})"
    return Control(UnitSet(space, mask, name), int(seed), strata, counts)


def check_seeds(seeds: int, *, quick: bool) -> int:
    """Controls need several seeds to have a distribution: at least 3 quick, 5 full."""
    least = 3 if quick else 5
    if isinstance(seeds, bool) or int(seeds) < least:
        raise UserError(f"seeds={seeds}: random controls need at least {least} seeds {'quick' if quick else 'full'}")
    return int(seeds)

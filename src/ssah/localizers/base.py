"""The contract of a localisation method: evidence in, a unit set of an exact size out.

A localisation method answers "which ``k`` units carry safety?" from evidence about the model: importance scores
on the safety and utility calibration sets (by metric), and activation statistics of the units over harmful and
harmless prompts (of the aligned model and, when given, of its base). Methods are small registered functions
``(evidence, k, seed) -> UnitSet`` with exactly ``k`` units, so they can be compared at the same budget
(``ssah localize``). :class:`Evidence` computes each piece once, on first use, through an
:class:`EvidenceSource`; tests and users can also :meth:`Evidence.put` pieces they computed themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ssah.errors import UserError
from ssah.plugins import Registry
from ssah.units import UnitSet, UnitSpace

Calibration = Literal["safety", "utility"]
Prompts = Literal["harmful", "harmless"]
Model = Literal["aligned", "base"]
Key = tuple[str, ...]


class EvidenceSource(Protocol):
    """Computes one piece of evidence, a flat float64 vector over the unit space, by key:
    ``("scores", metric, "safety" | "utility")``, ``("mean" | "var", "aligned" | "base", "harmful" | "harmless")``."""

    def compute(self, key: Key) -> torch.Tensor: ...


class Evidence:
    """What methods read, each piece computed once (flat float64 vectors over ``space``, neuron granularity)."""

    def __init__(self, space: UnitSpace, source: EvidenceSource | None = None) -> None:
        self.space = space
        self._source = source
        self._cache: dict[Key, torch.Tensor] = {}

    def put(self, key: Key, value: torch.Tensor) -> None:
        """Provide a piece directly (constructed scores in tests, or statistics computed elsewhere)."""
        if value.numel() != self.space.total:
            raise UserError(
                f"evidence {key} has {value.numel()} values for {self.space.total} units: pass one value per unit"
            )
        self._cache[key] = value.detach().to("cpu", torch.float64).flatten()

    def get(self, key: Key) -> torch.Tensor:
        """The piece ``key``, computed by the source on first use."""
        if key not in self._cache:
            if self._source is None:
                raise UserError(f"no evidence {'/'.join(key)} and no model to compute it from: put it first")
            self.put(key, self._source.compute(key))
        return self._cache[key]

    def has(self, key: Key) -> bool:
        """Whether ``key`` is cached (computed or put)."""
        return key in self._cache

    def scores(self, metric: str, calibration: Calibration) -> torch.Tensor:
        """Raw importance scores of every unit on a calibration set."""
        return self.get(("scores", metric, calibration))

    def mean(self, prompts: Prompts, model: Model = "aligned") -> torch.Tensor:
        """Mean activation of every unit over the prompt tokens of ``prompts``."""
        return self.get(("mean", model, prompts))

    def var(self, prompts: Prompts, model: Model = "aligned") -> torch.Tensor:
        """Variance of every unit's activation over the prompt tokens of ``prompts``."""
        return self.get(("var", model, prompts))


LocalizeFn = Callable[[Evidence, int, int], UnitSet]


@dataclass(frozen=True)
class Localizer:
    """A registered method: its function ``(evidence, k, seed) -> UnitSet`` and whether it needs a base model."""

    fn: LocalizeFn
    needs_base: bool = False
    seeded: bool = False  # True: the set depends on the seed (random draws), so it is run once per seed

    def __call__(self, evidence: Evidence, k: int, seed: int = 0) -> UnitSet:
        if not 0 < k <= evidence.space.total:
            raise UserError(f"a budget of {k} units for {evidence.space.total} units: pass a share in (0, 1]")
        units = self.fn(evidence, k, seed)
        if len(units) != k:  # the comparison is at equal budgets: a method that misses it is a bug, not a result
            raise RuntimeError(f"a localisation method returned {len(units)} units for a budget of {k}")
        return units


LOCALIZERS: Registry[Localizer] = Registry("localisation method")


def register_localizer(
    name: str, fn: LocalizeFn, *, about: str = "", needs_base: bool = False, seeded: bool = False
) -> LocalizeFn:
    """Register a localisation method under ``name`` (the call the built-ins make); returns ``fn``."""
    LOCALIZERS.register(name, Localizer(fn, needs_base=needs_base, seeded=seeded), about=about)
    return fn


def top_k(
    score: torch.Tensor, k: int, space: UnitSpace, allowed: torch.Tensor | None = None, name: str = ""
) -> UnitSet:
    """The ``k`` highest-scoring units (ties broken by position, so the set is deterministic), within ``allowed``."""
    order = torch.argsort(-score.to(torch.float64), stable=True)
    if allowed is not None:
        order = order[allowed[order]]
    if order.numel() < k:
        raise UserError(f"only {order.numel()} units are eligible for a budget of {k}: pass a smaller budget")
    return UnitSet.from_indices(space, order[:k], name=name or "units")


def parse_budgets(value: object) -> list[float]:
    """Budget shares from ``"0.5%,1.3%"``, ``"0.005,0.013"`` or a list of either; sorted, without repeats."""
    from ssah.fields import parse_unit_shares

    return parse_unit_shares(value, what="budget", flag="--budgets", whole=True)


def budget_units(share: float, space: UnitSpace) -> int:
    """The number of units a budget share means (at least one)."""
    if not 0 < share <= 1:
        raise UserError(f"budget share {share} is outside (0, 1]: pass shares like 0.001,0.005,0.013,0.03")
    return max(1, round(share * space.total))

"""The measurement core every experiment shares: proportions with intervals, comparisons with one verdict rule,
unit selections (``"SCU,CU@6%"``), stratified random controls and weight restoration between conditions.

Everything here is a pure function of its inputs (no files, no CLI), so recipes stay thin and the rules a
reviewer checks live in one place:

- every measured proportion is a :class:`Proportion` (counts ``k`` of ``n``, Wilson 95% interval), never a rate
  rebuilt from a rounded float;
- every comparison is a :class:`Comparison` (difference with a 95% interval: Newcombe's hybrid score interval,
  the control widened by its seed-to-seed spread when it is a distribution of random draws);
- a published effect is ``reproduced`` only when that interval excludes zero in the published direction
  (:func:`verdict`);
- a random control keeps the controlled set's count in every (layer, kind) cell (:func:`random_control`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ssah.errors import UserError
from ssah.units import UnitSet, UnitSpace

Direction = Literal["higher", "lower"]
Strata = Literal["layer-kind", "layer", "kind", "none"]
STRATA: tuple[str, ...] = ("layer-kind", "layer", "kind", "none")
Z95 = 1.959963984540054


# ------------------------------------------------------------------------------------------------ proportions
def _wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class Proportion:
    """``k`` of ``n`` (e.g. harmful prompts answered), with its Wilson 95% interval.

    Wilson's interval stays inside [0, 1] and is not empty at 0 or n successes, which small evaluation sets
    often have; the normal approximation is neither.
    """

    k: int
    n: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or isinstance(self.n, bool) or int(self.k) != self.k or int(self.n) != self.n:
            raise UserError(f"a proportion needs whole counts, got k={self.k!r}, n={self.n!r}")
        if self.n < 1 or not 0 <= self.k <= self.n:
            raise UserError(
                f"a proportion needs 0 <= k <= n and n >= 1, got k={self.k}, n={self.n}: "
                "pass counts from a non-empty set"
            )

    @classmethod
    def of(cls, flags: Sequence[bool]) -> Proportion:
        """The share of true flags (one per item)."""
        return cls(sum(bool(f) for f in flags), len(flags))

    @property
    def rate(self) -> float:
        return self.k / self.n

    @property
    def ci95(self) -> tuple[float, float]:
        return _wilson(self.k, self.n)

    def to_dict(self) -> dict[str, Any]:
        """The one JSON shape of a proportion in every ``results.json``."""
        lo, hi = self.ci95
        return {"k": self.k, "n": self.n, "rate": self.rate, "ci95": [lo, hi]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Proportion:
        return cls(int(d["k"]), int(d["n"]))

    def __str__(self) -> str:
        lo, hi = self.ci95
        return f"{self.rate:.1%} [{lo:.0%}, {hi:.0%}] ({self.k}/{self.n})"


# Student t quantiles (two-sided 95%) for small numbers of seeds; beyond the table the normal quantile is close.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t95(df: int) -> float:
    """The two-sided 95% Student t quantile for ``df`` degrees of freedom (table; conservative between rows)."""
    if df < 1:
        raise ValueError("t quantile needs df >= 1")
    for d in sorted(_T95, reverse=True):
        if df >= d:
            return _T95[d]
    return _T95[1]  # unreachable: df >= 1


@dataclass(frozen=True)
class ControlDistribution:
    """The same measurement on several random controls (one :class:`Proportion` per seed).

    A comparison uses the whole distribution, not its maximum: the mean rate with an interval that is the wider
    of the pooled Wilson interval and the t interval of the seed rates (so seed-to-seed spread widens it), and
    ``range95``, where one more control draw would fall with 95% probability (a t prediction interval).
    """

    draws: tuple[Proportion, ...]

    def __post_init__(self) -> None:
        if not self.draws:
            raise UserError("a control distribution needs at least one draw: use seeds >= 1")

    @property
    def pooled(self) -> Proportion:
        return Proportion(sum(d.k for d in self.draws), sum(d.n for d in self.draws))

    @property
    def rates(self) -> list[float]:
        return [d.rate for d in self.draws]

    @property
    def rate(self) -> float:
        return sum(self.rates) / len(self.draws)

    @property
    def sd(self) -> float:
        m = len(self.draws)
        if m < 2:
            return 0.0
        mu = self.rate
        return math.sqrt(sum((r - mu) ** 2 for r in self.rates) / (m - 1))

    @property
    def ci95(self) -> tuple[float, float]:
        lo, hi = self.pooled.ci95
        m = len(self.draws)
        if m >= 2:
            half = t95(m - 1) * self.sd / math.sqrt(m)
            lo, hi = min(lo, self.rate - half), max(hi, self.rate + half)
        return max(0.0, lo), min(1.0, hi)

    @property
    def range95(self) -> tuple[float, float]:
        """Where one more control draw falls with 95% probability (the seeds' spread, floored by binomial noise)."""
        m = len(self.draws)
        p = self.pooled.rate
        n = self.pooled.n / m
        binom_sd = math.sqrt(max(p * (1 - p), 1.0 / n) / n)  # a floor so that 3 equal draws are not "certain"
        sd = max(self.sd, binom_sd)
        half = (t95(m - 1) if m >= 2 else Z95) * sd * math.sqrt(1 + 1 / m)
        return max(0.0, self.rate - half), min(1.0, self.rate + half)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "ci95": list(self.ci95),
            "range95": list(self.range95),
            "sd": self.sd,
            "seeds": len(self.draws),
            "pooled": self.pooled.to_dict(),
            "draws": [d.to_dict() for d in self.draws],
        }


Measured = Proportion | ControlDistribution


def _center_and_bounds(x: Measured) -> tuple[float, float, float]:
    lo, hi = x.ci95
    return x.rate, lo, hi


# ------------------------------------------------------------------------------------------------ comparisons
@dataclass(frozen=True)
class Comparison:
    """``effect - control`` with a 95% interval, and which way it points (``higher`` / ``lower`` /
    ``no difference`` when the interval contains zero)."""

    difference: float
    ci95: tuple[float, float]
    effect: float
    control: float
    n_effect: int
    n_control: int
    method: str

    @property
    def direction(self) -> str:
        lo, hi = self.ci95
        if lo > 0:
            return "higher"
        if hi < 0:
            return "lower"
        return "no difference"

    def to_dict(self) -> dict[str, Any]:
        return {
            "difference": self.difference,
            "ci95": list(self.ci95),
            "direction": self.direction,
            "effect": self.effect,
            "control": self.control,
            "n_effect": self.n_effect,
            "n_control": self.n_control,
            "method": self.method,
        }


def compare(effect: Measured, control: Measured) -> Comparison:
    """The difference ``effect - control`` of two measured rates with Newcombe's hybrid score interval
    (method 10 of Newcombe 1998), built from each side's own 95% interval.

    A :class:`ControlDistribution` enters with its widened interval (pooled Wilson or the t interval of its
    seeds, whichever is wider), so a control whose seeds disagree is not mistaken for a precise one.
    """
    p1, l1, u1 = _center_and_bounds(effect)
    p2, l2, u2 = _center_and_bounds(control)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    n1 = effect.n if isinstance(effect, Proportion) else effect.pooled.n
    n2 = control.n if isinstance(control, Proportion) else control.pooled.n
    method = "newcombe-hybrid-score"
    if isinstance(control, ControlDistribution) or isinstance(effect, ControlDistribution):
        method += "+seed-spread"
    return Comparison(d, (max(-1.0, lo), min(1.0, hi)), p1, p2, n1, n2, method)


@dataclass(frozen=True)
class Verdict:
    """The one verdict on a published effect: ``reproduced`` / ``not reproduced`` / ``inconclusive``."""

    verdict: Literal["reproduced", "not reproduced", "inconclusive"]
    expected: Direction
    comparison: Comparison
    reason: str
    n_needed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "expected": self.expected,
            "reason": self.reason,
            "n_needed": self.n_needed,
            "comparison": self.comparison.to_dict(),
        }


def verdict(comparison: Comparison, expected: Direction, *, margin: float = 0.05) -> Verdict:
    """Decide a published effect from its comparison with its control (or baseline).

    - ``reproduced``: the 95% interval of the difference excludes zero in the published direction;
    - ``not reproduced``: it excludes zero the other way, or it lies within ``±margin`` (narrow around zero:
      any effect is smaller than the margin);
    - ``inconclusive`` otherwise, with ``n_needed``: about how many items per side would make the interval
      narrow enough to decide (the half-width shrinks as 1/sqrt(n)).
    """
    if expected not in ("higher", "lower"):
        raise UserError(f"expected direction must be 'higher' or 'lower', got {expected!r}")
    if not 0 < margin < 1:
        raise UserError(f"margin must be in (0, 1), got {margin}")
    lo, hi = comparison.ci95
    d = comparison.difference
    sign = 1 if expected == "higher" else -1
    if (lo > 0 and sign > 0) or (hi < 0 and sign < 0):
        return Verdict("reproduced", expected, comparison, "the 95% interval excludes zero in the published direction")
    if (lo > 0 and sign < 0) or (hi < 0 and sign > 0):
        return Verdict("not reproduced", expected, comparison, "the 95% interval excludes zero the other way")
    if -margin <= lo and hi <= margin:
        return Verdict(
            "not reproduced",
            expected,
            comparison,
            f"the 95% interval lies within ±{margin:.0%} of zero: no effect of that size",
        )
    half = (hi - lo) / 2
    target = abs(d) if abs(d) > margin else margin
    n = min(comparison.n_effect, comparison.n_control)
    n_needed = math.ceil(n * (half / target) ** 2) if target > 0 else None
    return Verdict(
        "inconclusive",
        expected,
        comparison,
        "the 95% interval contains zero and is wider than the margin",
        n_needed,
    )


# ------------------------------------------------------------------------------------------------ selections
_ITEM = re.compile(r"^(?P<name>[A-Za-z]+)(?:@(?P<value>[0-9.]+)(?P<pct>%)?(?P<of>[A-Za-z]+)?)?$")


@dataclass(frozen=True)
class SelectionItem:
    """One part of a selection: a whole category, or its top share by safety rank.

    ``of`` is ``"all"`` when the share counts all units (``CU@6%``: 6% of every unit, taken from CU, as the
    paper's "SCU + 6%" protection) or the category itself (``CU@6%cu``: 6% of the CU units).
    """

    category: str
    share: float | None = None
    of: Literal["all", "category"] = "all"

    def label(self) -> str:
        if self.share is None:
            return self.category
        return f"{self.category}@{self.share * 100:g}%" + (self.category.lower() if self.of == "category" else "")


def parse_selection(text: str, categories: Sequence[str] = ("SCU", "UCU", "CU", "RU")) -> list[SelectionItem]:
    """Parse ``"SCU,CU@6%"`` (or ``CU@0.06``, ``CU@6%cu``) into items; unknown names and shares outside (0, 1]
    are user errors."""
    by_lower = {c.lower(): c for c in categories}
    items: list[SelectionItem] = []
    for raw in str(text).split(","):
        item = raw.strip()
        if not item:
            continue
        m = _ITEM.match(item)
        if m is None:
            raise UserError(f"bad selection {item!r}: write CATEGORY or CATEGORY@SHARE, e.g. SCU,CU@6% or CU@6%cu")
        name = by_lower.get(m["name"].lower())
        if name is None:
            raise UserError(f"unknown category {m['name']!r} in {text!r}: use one of {', '.join(categories)}")
        if m["value"] is None:
            items.append(SelectionItem(name))
            continue
        try:
            share = float(m["value"]) / (100 if m["pct"] else 1)
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise UserError(f"share in {item!r} is outside (0, 1]: give e.g. CU@6% or CU@0.06")
        of = m["of"]
        if of is not None and of.lower() != name.lower():
            raise UserError(f"bad selection {item!r}: the suffix after the share must be the category ({name.lower()})")
        items.append(SelectionItem(name, share, "category" if of else "all"))
    if not items:
        raise UserError(f"empty selection {text!r}: name at least one category, e.g. SCU")
    return items


@dataclass(frozen=True)
class Selection:
    """A selected unit set and how it was made (labels, counts, share of all units)."""

    units: UnitSet
    items: tuple[SelectionItem, ...]
    counts: dict[str, int]

    @property
    def label(self) -> str:
        return ",".join(i.label() for i in self.items)

    def summary(self) -> dict[str, Any]:
        return {
            "selection": self.label,
            "count": len(self.units),
            "share_of_units": self.units.fraction,
            "parts": self.counts,
        }


def select(sets: Mapping[str, UnitSet], ranking: torch.Tensor, spec: str) -> Selection:
    """The union of the categories a spec names, each cut to its top share by ``ranking`` (flat, one value per
    unit, higher = more safety-critical). Pure: no files.

    ``CU@6%`` takes ``round(0.06 * all units)`` CU units (at most all of CU); ``CU@6%cu`` takes 6% of CU.
    """
    items = parse_selection(spec, tuple(sets))
    space = next(iter(sets.values())).space
    if ranking.shape != (space.total,):
        raise UserError(f"the ranking must have one value per unit ({space.total}), got {tuple(ranking.shape)}")
    order = torch.argsort(-ranking.to(torch.float64), stable=True)
    mask = torch.zeros(space.total, dtype=torch.bool)
    counts: dict[str, int] = {}
    for item in items:
        members = sets[item.category].mask
        if item.share is None:
            chosen = members
        else:
            base = space.total if item.of == "all" else int(members.sum())
            k = min(round(item.share * base), int(members.sum()))
            picked = order[members[order]][:k]
            chosen = torch.zeros_like(members)
            chosen[picked] = True
        counts[item.label()] = int(chosen.sum())
        mask |= chosen
    units = UnitSet(space, mask, ",".join(i.label() for i in items))
    return Selection(units, tuple(items), counts)


# ------------------------------------------------------------------------------------------------ controls
def _cell_keys(space: UnitSpace, strata: str) -> list[tuple[str, slice]]:
    """(stratum label, flat slice) for every group; groups sharing a label form one stratum."""
    out = []
    for sh in space.shapes:
        label = {"layer-kind": f"{sh.layer}.{sh.kind}", "layer": str(sh.layer), "kind": sh.kind, "none": "all"}[strata]
        out.append((label, space.group_slice(sh.layer, sh.kind)))
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
    are split into ``bins`` quantile bins and each bin keeps its count. Reproducible by seed.
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


# ------------------------------------------------------------------------------------------------ weights
def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit (proves a condition left the weights untouched)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextmanager
def restored_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Run a condition that changes weights in place (a fine-tune, an edit) and get the original weights back
    on exit, bit for bit, whatever happened inside. The snapshot lives on CPU."""
    snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(snapshot[k].to(v.device))
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
            p.grad = None
        model.train(training)

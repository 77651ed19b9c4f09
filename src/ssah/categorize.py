"""Split units into safety-critical (SCU), utility-critical (UCU), complex (CU) and redundant (RU) units.

Pure functions of two score vectors (safety I_S, utility I_U). The rules (``ssah``, ``pruning-sets``,
``wei-set-difference`` and any registered one) and the score normalisations (``mean``, ``module-mean``,
``zscore``, ``rank``, ``global-rank``, ``none``) live in :mod:`ssah.rules`, one registry each, with their
formulas. Safety and utility scores are normalised before the sum and difference, so that the two scales are
comparable; a normalisation is computed over each (layer, kind) module or over each ranking domain.

Ranking domains (where the shares are applied): ``global`` = all units, except at head granularity, where
attention heads and MLP neurons are two separate domains (a head sums many channels' scores and is never ranked
against a single neuron; each domain gets the shares); ``per-module`` = each (layer, kind) module.
The choice, its scope and the domains are recorded with the result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ssah.errors import UserError
from ssah.rules import CATEGORIES, DEFAULT_NORMALIZATION, NORMALIZATIONS, RANKINGS, RULES, Ranking
from ssah.scoring import Scores
from ssah.units import Granularity, UnitSet, UnitSpace, load_unit_sets, save_unit_sets

__all__ = [
    "CATEGORIES",
    "DEFAULT_NORMALIZATION",
    "NORMALIZATIONS",
    "RANKINGS",
    "RULES",
    "Categorization",
    "Ranking",
    "categorize",
    "check_normalization",
    "check_shares",
    "expected_random_jaccard",
    "load_categorization",
    "normalization_scope",
    "normalize_scores",
    "parse_shares",
    "ranking_domains",
]


def parse_shares(text: str | None) -> dict[str, float]:
    """Parse ``"scu=0.013,ucu=0.1"`` into a mapping (validated later against the rule)."""
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip().lower()] = float(value)
        except ValueError:
            raise UserError(
                f"bad share {item.strip()!r}: write shares as name=fraction, e.g. scu=0.013,ru=0.15"
            ) from None
    return out


def check_shares(rule: str, shares: Mapping[str, float] | None) -> dict[str, float]:
    """The rule's shares with defaults filled in; each in [0, 1] and passing the rule's own check (``ssah``: summing
    to at most 1)."""
    spec = RULES.get(rule)
    full = dict(spec.shares)
    for k, v in (shares or {}).items():
        if k not in full:
            raise UserError(f"rule {rule!r} takes shares {', '.join(full)}, not {k!r}")
        full[k] = float(v)
    for k, v in full.items():
        if not 0.0 <= v <= 1.0:
            raise UserError(f"share {k}={v} is outside 0..1: give a fraction of the units, e.g. {k}=0.05")
    if spec.check is not None:
        spec.check(full)
    return full


def check_normalization(normalization: str) -> str:
    """``normalization`` if registered, else :class:`UserError` naming the choices."""
    return NORMALIZATIONS.check(normalization)


def ranking_domains(space: UnitSpace, ranking: str) -> list[torch.Tensor]:
    """Flat unit indices of each ranking domain (see the module docstring); shares apply within each."""
    if ranking not in RANKINGS:
        raise UserError(f"unknown ranking {ranking!r}: use one of {', '.join(RANKINGS)}")
    modules = [torch.arange(space.offsets[i], space.offsets[i + 1]) for i in range(len(space.shapes))]
    if ranking == "per-module":
        return modules
    if space.granularity == "head":  # heads and neurons never in one ranking
        by_kind = [
            torch.cat([m for m, sh in zip(modules, space.shapes, strict=True) if sh.kind == kind] or [torch.arange(0)])
            for kind in ("attn", "mlp")
        ]
        return [d for d in by_kind if d.numel()]
    return [torch.arange(space.total)]


def normalization_scope(normalization: str) -> str:
    """Where ``normalization``'s statistic is computed: ``module``, ``domain`` (ranking domain) or ``none``."""
    return NORMALIZATIONS.get(normalization).scope


def normalize_scores(x: torch.Tensor, space: UnitSpace, normalization: str, ranking: str) -> torch.Tensor:
    """A flat score vector over ``space`` normalised as ``categorize`` does it (float64)."""
    norm = NORMALIZATIONS.get(normalization)
    x = x.to(torch.float64)
    out = x.clone()
    parts = (
        [torch.arange(space.offsets[i], space.offsets[i + 1]) for i in range(len(space.shapes))]
        if norm.scope == "module"
        else ranking_domains(space, ranking)
    )
    for idx in parts:
        out[idx] = norm.statistic(x[idx])
    return out


def _labels(s: torch.Tensor, u: torch.Tensor, rule: str, shares: Mapping[str, float]) -> torch.Tensor:
    """Category index (position in CATEGORIES) of every unit of one ranking domain."""
    scu, ucu, ru = RULES.get(rule).split(s, u, shares)
    labels = torch.full((s.numel(),), CATEGORIES.index("CU"), dtype=torch.long)
    labels[ru] = CATEGORIES.index("RU")
    labels[scu] = CATEGORIES.index("SCU")
    labels[ucu] = CATEGORIES.index("UCU")
    return labels


@dataclass
class Categorization:
    """The four unit categories of one model, with the settings that produced them."""

    sets: dict[str, UnitSet]
    rule: str
    shares: dict[str, float]
    normalization: str
    ranking: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def space(self) -> UnitSpace:
        return self.sets["SCU"].space

    def __getitem__(self, name: str) -> UnitSet:
        try:
            return self.sets[name]
        except KeyError:
            raise UserError(f"unknown category {name!r}: use one of {', '.join(self.sets)}") from None

    def summary(self) -> dict[str, Any]:
        """Counts and fractions per category, and counts per layer and kind (JSON-ready)."""
        by_layer = []
        per_cat = {c: s.counts_by_layer() for c, s in self.sets.items()}
        for layer in range(self.space.num_layers):
            by_layer.append({"layer": layer, **{c: per_cat[c][layer] for c in self.sets}})
        return {
            "categories": {c: {"count": len(s), "fraction": s.fraction} for c, s in self.sets.items()},
            "by_layer": by_layer,
            "rule": self.rule,
            "shares": self.shares,
            "normalization": self.normalization,
            "normalization_scope": _scope_or_unknown(self.normalization),
            "ranking": self.ranking,
            "ranking_domains": _domains_label(self.space, self.ranking),
            "granularity": self.space.granularity,
            "units_total": self.space.total,
        }

    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> None:
        meta = {
            "rule": self.rule,
            "normalization": self.normalization,
            "normalization_scope": _scope_or_unknown(self.normalization),
            "ranking": self.ranking,
            "shares": ",".join(f"{k}={v}" for k, v in self.shares.items()),
        }
        save_unit_sets(path, self.sets, {**meta, **(metadata or {})})

    def transition(self, after: Categorization) -> torch.Tensor:
        """4x4 counts: row = category before, column = category after (same unit space)."""
        return torch.tensor([[len(self.sets[a] & after.sets[b]) for b in CATEGORIES] for a in CATEGORIES])


def _scope_or_unknown(normalization: str) -> str:
    return normalization_scope(normalization) if normalization in NORMALIZATIONS else "?"


def _domains_label(space: UnitSpace, ranking: str) -> str:
    """How the units were split into ranking domains, in words (recorded in summaries)."""
    if ranking == "per-module":
        return "each (layer, kind) module"
    if ranking == "global":
        return "attention heads and MLP neurons separately" if space.granularity == "head" else "all units"
    return "?"


def load_categorization(
    path: str | os.PathLike[str], space: UnitSpace, *, allow_other_weights: bool = False
) -> Categorization:
    """Read a unit file written by ``Categorization.save`` and check it against ``space``."""
    from ssah.units import read_unit_file_metadata

    meta = read_unit_file_metadata(path)
    sets = load_unit_sets(path, space, names=list(CATEGORIES), allow_other_weights=allow_other_weights)
    normalization = meta.get("normalization", "?")
    if normalization == "rank" and "normalization_scope" not in meta:
        normalization = "global-rank"  # files written before per-module ranks: "rank" was over the ranking domain
    return Categorization(
        sets,
        meta.get("rule", "?"),
        parse_shares(meta.get("shares")),
        normalization,
        meta.get("ranking", "?"),
    )


def categorize(
    safety: Scores | torch.Tensor,
    utility: Scores | torch.Tensor,
    *,
    rule: str = "ssah",
    shares: Mapping[str, float] | None = None,
    normalization: str = DEFAULT_NORMALIZATION,
    ranking: str = "global",
    granularity: Granularity = "neuron",
    space: UnitSpace | None = None,
) -> Categorization:
    """Split the units of a space into SCU / UCU / CU / RU from safety and utility scores.

    ``safety`` and ``utility`` are ``Scores`` (channel level; summed into heads for head granularity) or flat
    tensors over ``space``. ``normalization`` and ``ranking`` as in the module docstring (at head granularity
    the global ranking keeps heads and neurons apart). Deterministic: ties are broken by unit order.
    """
    full_shares = check_shares(rule, shares)
    check_normalization(normalization)
    if ranking not in RANKINGS:
        raise UserError(f"unknown ranking {ranking!r}: use one of {', '.join(RANKINGS)}")
    s_flat, u_flat, space = _as_flat(safety, utility, granularity, space)
    s = normalize_scores(s_flat, space, normalization, ranking)
    u = normalize_scores(u_flat, space, normalization, ranking)
    labels = torch.empty(space.total, dtype=torch.long)
    for d in ranking_domains(space, ranking):
        labels[d] = _labels(s[d], u[d], rule, full_shares)
    sets = {c: UnitSet(space, labels == i, c) for i, c in enumerate(CATEGORIES)}
    return Categorization(sets, rule, full_shares, normalization, ranking)


def _as_flat(
    safety: Scores | torch.Tensor, utility: Scores | torch.Tensor, granularity: Granularity, space: UnitSpace | None
) -> tuple[torch.Tensor, torch.Tensor, UnitSpace]:
    if isinstance(safety, Scores) and isinstance(utility, Scores):
        if safety.space != utility.space:
            raise UserError("safety and utility scores come from models with different unit layouts")
        if space is None:
            if granularity != "neuron":
                raise UserError(
                    "head granularity needs the model's unit space: pass space=UnitSpace.from_groups(..., 'head')"
                )
            space = safety.space
        if space.granularity != granularity:
            raise UserError(f"space granularity {space.granularity!r} differs from the requested {granularity!r}")

        def flat(sc: Scores) -> torch.Tensor:
            return space.join({k: space.aggregate(k, v) for k, v in sc.values.items()}).to(torch.float64)

        return flat(safety), flat(utility), space
    if isinstance(safety, torch.Tensor) and isinstance(utility, torch.Tensor):
        if space is None:
            raise UserError("flat score tensors need the unit space they index: pass space=...")
        if safety.shape != (space.total,) or utility.shape != (space.total,):
            raise UserError(f"score vectors must have {space.total} entries, one per unit")
        return safety.to(torch.float64), utility.to(torch.float64), space
    raise UserError("pass both scores as Scores objects or both as flat tensors")


def expected_random_jaccard(k: int, n: int) -> float:
    """Expected Jaccard overlap of two independent random k-subsets of n units (the chance level)."""
    if n == 0 or k == 0:
        return 1.0 if k == 0 else 0.0
    inter = k * k / n
    return inter / (2 * k - inter)

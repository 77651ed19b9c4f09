"""Unit selections: ``"SCU,CU@6%"``-style specs (categories, and top shares of a category by safety rank) parsed
and resolved into one unit set.

Split out of :mod:`ssah.measure` (which re-exports it) so each module keeps to one concern.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ssah.errors import UserError
from ssah.units import UnitSet

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

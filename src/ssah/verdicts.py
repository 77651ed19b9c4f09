"""Proportions, comparisons and the one verdict rule: the statistics every experiment's verdicts come from.

- every measured proportion is a :class:`Proportion` (counts ``k`` of ``n``, Wilson 95% interval, and its
  per-prompt outcomes), never a rate rebuilt from a rounded float;
- conditions measured on the same prompts are compared prompt by prompt (:func:`compare_prompts`,
  :func:`compare_measured`; :mod:`ssah.paired` has the interval), a random control being a prompts x seeds table
  (:class:`ControlDistribution`); :func:`compare` is for genuinely unpaired data;
- a published effect is ``reproduced`` only when the 95% interval of its difference to the control excludes zero in
  the published direction (:func:`verdict`); the rule's own error rates are measured in
  ``benchmarks/verdict_calibration.py``.

Pure functions of their inputs (no model, no files); ``ssah.measure`` re-exports every name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ssah.errors import UserError
from ssah.intervals import Z95, wilson_bounds
from ssah.paired import as_table, mean_interval, paired_interval

Direction = Literal["higher", "lower"]


# ------------------------------------------------------------------------------------------------ proportions
@dataclass(frozen=True)
class Proportion:
    """``k`` of ``n`` (e.g. harmful prompts answered), with its Wilson 95% interval, and where measured its
    per-prompt ``outcomes`` (in prompt order) and the digest of those ``prompts``, so that two conditions measured
    on the same prompts are compared prompt by prompt (:func:`compare_measured`).

    Wilson's interval stays inside [0, 1] and is not empty at 0 or n successes, which small evaluation sets
    often have; the normal approximation is neither.
    """

    k: int
    n: int
    outcomes: tuple[bool, ...] | None = field(default=None, compare=False, repr=False)
    prompts: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or isinstance(self.n, bool) or int(self.k) != self.k or int(self.n) != self.n:
            raise UserError(f"a proportion needs whole counts, got k={self.k!r}, n={self.n!r}")
        if self.n < 1 or not 0 <= self.k <= self.n:
            raise UserError(
                f"a proportion needs 0 <= k <= n and n >= 1, got k={self.k}, n={self.n}: "
                "pass counts from a non-empty set"
            )
        if self.outcomes is not None and (len(self.outcomes) != self.n or sum(self.outcomes) != self.k):
            raise UserError(
                f"a proportion's outcomes must hold n={self.n} flags with k={self.k} true: the stored outcomes "
                "were edited or damaged"
            )

    @classmethod
    def of(cls, flags: Sequence[bool], prompts: str | None = None) -> Proportion:
        """The share of true flags (one per item, kept as the outcomes); ``prompts``: :func:`prompts_digest` of
        the items, in the same order."""
        outcomes = tuple(bool(f) for f in flags)
        return cls(sum(outcomes), len(outcomes), outcomes, prompts)

    def complement(self) -> Proportion:
        """The share of false flags (e.g. refusal from attack success), outcomes flipped."""
        flipped = None if self.outcomes is None else tuple(not o for o in self.outcomes)
        return Proportion(self.n - self.k, self.n, flipped, self.prompts)

    @property
    def rate(self) -> float:
        return self.k / self.n

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_bounds(self.k, self.n)

    def to_dict(self) -> dict[str, Any]:
        """The one JSON shape of a proportion in every ``results.json`` (outcomes as a string of 0/1)."""
        lo, hi = self.ci95
        out: dict[str, Any] = {"k": self.k, "n": self.n, "rate": self.rate, "ci95": [lo, hi]}
        if self.outcomes is not None:
            out["outcomes"] = "".join("1" if o else "0" for o in self.outcomes)
        if self.prompts is not None:
            out["prompts"] = self.prompts
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Proportion:
        raw = d.get("outcomes")
        if raw is not None and (not isinstance(raw, str) or set(raw) - {"0", "1"}):
            raise UserError("a stored proportion's outcomes must be a string of 0 and 1: the results were edited")
        outcomes = None if raw is None else tuple(c == "1" for c in raw)
        prompts = d.get("prompts")
        return cls(int(d["k"]), int(d["n"]), outcomes, None if prompts is None else str(prompts))

    def __str__(self) -> str:
        lo, hi = self.ci95
        return f"{self.rate:.1%} [{lo:.0%}, {hi:.0%}] ({self.k}/{self.n})"


def prompts_digest(prompts: Sequence[str]) -> str:
    """A short SHA-256 of prompts in order: two measurements pair only when their digests are equal."""
    blob = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


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
    """The same measurement on several random controls (one :class:`Proportion` per seed, on the same prompts).

    A comparison uses the whole distribution, not its maximum. Its interval counts each prompt once, not once per
    seed: with per-prompt outcomes it is :func:`ssah.paired.mean_interval` of the prompts x seeds table (prompts
    and seeds as crossed random factors); without them (runs from before outcomes were stored) the wider of the
    Wilson interval of one draw's size and the t interval of the seed rates. ``range95`` is where one more control
    draw would fall with 95% probability (a t prediction interval).
    """

    draws: tuple[Proportion, ...]

    def __post_init__(self) -> None:
        if not self.draws:
            raise UserError("a control distribution needs at least one draw: use seeds >= 1")

    @property
    def n(self) -> int:
        """Prompts per draw (the mean when draws differ; every draw of a control measures the same prompts)."""
        return round(sum(d.n for d in self.draws) / len(self.draws))

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
    def outcomes(self) -> list[tuple[bool, ...]] | None:
        """The per-prompt outcomes of every seed, when every draw has them on the same prompts."""
        if any(d.outcomes is None for d in self.draws) or len({d.prompts for d in self.draws}) != 1:
            return None
        return [d.outcomes for d in self.draws]  # type: ignore[misc]

    @property
    def prompts(self) -> str | None:
        return self.draws[0].prompts if self.outcomes is not None else None

    @property
    def ci95(self) -> tuple[float, float]:
        table = self.outcomes
        if table is not None:
            return mean_interval(as_table(table, "control"))
        lo, hi = wilson_bounds(self.rate * self.n, self.n)  # one draw's size: a prompt counts once
        m = len(self.draws)
        if m >= 2:
            half = t95(m - 1) * self.sd / math.sqrt(m)
            lo, hi = min(lo, self.rate - half), max(hi, self.rate + half)
        return max(0.0, lo), min(1.0, hi)

    @property
    def range95(self) -> tuple[float, float]:
        """Where one more control draw falls with 95% probability (the seeds' spread, floored by binomial noise)."""
        m = len(self.draws)
        p, n = self.rate, self.n
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
            "n": self.n,
            "draws": [d.to_dict() for d in self.draws],
        }


Measured = Proportion | ControlDistribution


def stored_measurement(stored: Mapping[str, Any]) -> Measured:
    """One rate read back from results.json: a :class:`ControlDistribution` when it holds its seeds' draws (the
    shape :meth:`ControlDistribution.to_dict` writes), else a :class:`Proportion`."""
    if "draws" in stored:
        return ControlDistribution(tuple(Proportion.from_dict(d) for d in stored["draws"]))
    return Proportion.from_dict(stored)


def compare_stored(effect: Mapping[str, Any], control: Mapping[str, Any]) -> Comparison:
    """:func:`compare_measured` of two rates as results.json stores them (see :func:`stored_measurement`)."""
    return compare_measured(stored_measurement(effect), stored_measurement(control))


def _mean_min_max(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": list(values)}


def over_seeds(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One random control's rows (one per seed, as results.json stores conditions) as one entry: ``seeds``; each
    rate that every row holds as a ControlDistribution over the seeds (the verdicts compare with that
    distribution, never with the best seed); perplexity and each KL part as mean / min / max / values."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
    for key in rows[0]:
        if all(isinstance(r.get(key), Mapping) and {"k", "n"} <= r[key].keys() for r in rows):
            out[key] = ControlDistribution(tuple(Proportion.from_dict(r[key]) for r in rows)).to_dict()
    if all(isinstance(r.get("perplexity"), int | float) for r in rows):
        out["perplexity"] = _mean_min_max([r["perplexity"] for r in rows])
    if all("kl" in r for r in rows):
        parts = [p for p in rows[0]["kl"] if all(isinstance(r["kl"].get(p), Mapping) for r in rows)]
        out["kl"] = {p: _mean_min_max([r["kl"][p]["mean"] for r in rows]) for p in parts}
    return out


def measured_from(stored: Sequence[Mapping[str, Any]], *, distribution: bool) -> Measured | None:
    """Stored proportions (:meth:`Proportion.to_dict` shapes) read back as one measurement: the first, or for a
    random control the distribution over its seeds' draws; None when there are none."""
    xs = tuple(Proportion.from_dict(d) for d in stored)
    return None if not xs else ControlDistribution(xs) if distribution else xs[0]


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
    prompts: str | None = None  # prompts_digest of the prompts a paired comparison was computed on

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
            **({"prompts": self.prompts} if self.prompts is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Comparison:
        """A comparison read back from its :meth:`to_dict` shape (``direction`` is derived, so it is not read)."""
        lo, hi = d["ci95"]
        return cls(
            float(d["difference"]),
            (float(lo), float(hi)),
            float(d["effect"]),
            float(d["control"]),
            int(d["n_effect"]),
            int(d["n_control"]),
            str(d["method"]),
            None if d.get("prompts") is None else str(d["prompts"]),
        )


def compare_prompts(
    effect: Sequence[bool] | Sequence[Sequence[bool]], control: Sequence[bool] | Sequence[Sequence[bool]]
) -> Comparison:
    """The paired comparison ``effect - control`` of two conditions measured on the same prompts, in the same
    prompt order: the prompt is the unit.

    ``effect`` and ``control`` are each one outcome (bool) per prompt (a fixed condition or a baseline), or one
    list of per-prompt outcomes per seed (a random control). The interval is Newcombe's paired score interval,
    widened by a two-way (prompts x seeds) random-effects t interval when an arm has seeds
    (:mod:`ssah.paired`); :func:`verdict` decides it. Arms of different lengths are refused."""
    res = paired_interval(as_table(effect, "effect"), as_table(control, "control"))
    method = res.method + (f" (seeds {res.seeds[0]}/{res.seeds[1]}, df {res.df})" if res.df is not None else "")
    return Comparison(res.difference, res.ci95, res.effect, res.control, res.prompts, res.prompts, method)


def _paired_outcomes(x: Measured) -> tuple[Any, str | None] | None:
    """A measurement's per-prompt outcomes (a list, or one list per seed) and prompts digest; None without."""
    if isinstance(x, Proportion):
        return None if x.outcomes is None else (list(x.outcomes), x.prompts)
    table = x.outcomes
    return None if table is None else ([list(t) for t in table], x.prompts)


def compare_measured(effect: Measured, control: Measured) -> Comparison:
    """Two conditions measured on the same prompts, compared prompt by prompt (:func:`compare_prompts`).

    Both must carry their per-prompt outcomes on the same prompts (the same :func:`prompts_digest`): anything
    else is refused with one line, never compared as if the prompts were independent samples."""
    pe, pc = _paired_outcomes(effect), _paired_outcomes(control)
    if pe is None or pc is None:
        raise UserError(
            "a rate to compare has no per-prompt outcomes (measured before ssah stored them, or the seeds of a "
            "control were measured on different prompts): re-run the recipe to compare prompt by prompt"
        )
    if pe[1] != pc[1]:
        raise UserError(
            f"the effect was measured on prompts {pe[1]} and the control on {pc[1]}: a paired comparison needs "
            "the same prompts in the same order (re-run both on one prompt set)"
        )
    return dataclasses.replace(compare_prompts(pe[0], pc[0]), prompts=pe[1])


def compare(effect: Measured, control: Measured) -> Comparison:
    """The difference ``effect - control`` of two rates measured on *different, independent* samples (two prompt
    sets, two unit sets) with Newcombe's hybrid score interval (method 10 of Newcombe 1998, unpaired), built from
    each side's own 95% interval. Conditions measured on the same prompts are compared with
    :func:`compare_prompts` / :func:`compare_measured` instead (paired: the correct and usually tighter one).

    A :class:`ControlDistribution` enters with its own interval (:attr:`ControlDistribution.ci95`, which counts
    each prompt once and widens with the seeds' spread).
    """
    p1, l1, u1 = _center_and_bounds(effect)
    p2, l2, u2 = _center_and_bounds(control)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    n1, n2 = effect.n, control.n
    method = "newcombe-hybrid-score"
    if isinstance(control, ControlDistribution) or isinstance(effect, ControlDistribution):
        method += "+seed-spread"
    return Comparison(d, (max(-1.0, lo), min(1.0, hi)), p1, p2, n1, n2, method)


VERDICTS: tuple[str, ...] = ("reproduced", "not reproduced", "inconclusive")


@dataclass(frozen=True)
class Verdict:
    """The one verdict on a published effect: ``reproduced`` / ``not reproduced`` / ``inconclusive``."""

    verdict: Literal["reproduced", "not reproduced", "inconclusive"]
    expected: Direction
    comparison: Comparison
    reason: str
    n_needed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields in order, the comparison last (as its own dict)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "comparison"}
        return {**own, "comparison": self.comparison.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        """A verdict read back from its :meth:`to_dict` shape (extra keys beside it are ignored); a ``UserError``
        when the words are not the rule's."""
        word, expected = d["verdict"], d["expected"]
        if word not in VERDICTS or expected not in ("higher", "lower"):
            raise UserError(f"not a verdict: {word!r} expecting {expected!r} (the rule's words: {', '.join(VERDICTS)})")
        n_needed = d.get("n_needed")
        comparison = Comparison.from_dict(d["comparison"])
        return cls(word, expected, comparison, str(d["reason"]), None if n_needed is None else int(n_needed))


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
    # Deciding needs a half-width below |d| (then the interval excludes zero) or below margin - |d| (then it lies
    # within the margin), whichever comes first.
    target = abs(d) if abs(d) > margin else max(abs(d), margin - abs(d))
    n = min(comparison.n_effect, comparison.n_control)
    n_needed = math.ceil(n * (half / target) ** 2) if target > 0 else None
    return Verdict(
        "inconclusive",
        expected,
        comparison,
        "the 95% interval contains zero and is wider than the margin",
        n_needed,
    )

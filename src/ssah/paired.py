"""Paired intervals for rates measured on the same prompts: the prompt is the unit.

Two conditions measured on the same prompts (a model ablated and as it is; a category and its random controls)
are compared prompt by prompt. Each arm is a table of 0/1 outcomes, prompts x seeds: one column for a fixed
condition (a baseline, an effect), one per seed for a random control. A prompt is never counted once per seed.

The interval of the difference of the two arms' mean rates has two parts, added in quadrature (the "method of
variance estimates recovery", MOVER: Zou & Donner 2008, Stat. Med. 27:1693-1702, of which Newcombe's own
square-and-add is an instance):

- **the prompts**: Newcombe's paired score interval with continuity correction (Newcombe 1998, "Improved
  confidence intervals for the difference between binomial proportions based on paired data", Stat. Med.
  17:2635-2650, method 11): continuity-corrected Wilson intervals of each arm's rate combined with the correlation
  of the pairs. It stays sensible at 0 and n successes and with few prompts. Without the correction (method 10)
  one tail was measured at up to 3.0% instead of 2.5% (4,000 simulated experiments per setting); with it, at most
  2.5%, for a small loss of power. With seeds, each prompt enters with its mean over the seeds (fractional
  counts; n is the number of prompts, never prompts x seeds). Without seeds this is the whole interval.
- **the seeds**, when an arm has several: random controls differ in strength from seed to seed, so a seeded
  arm's mean carries the variance of its seed means (their sample variance over the number of seeds), read with a
  t quantile on the seeds' degrees of freedom (Satterthwaite 1946 when both arms have seeds). The seed means also
  hold some prompt-by-seed noise that the prompt part counts already: counting it twice keeps the interval on the
  safe side. An unbiased split of the two (the crossed-design ANOVA estimate ``(MS_seed - MS_residual) / n``,
  truncated at zero) was measured to say *reproduced* falsely 3.1% of the time at 400 prompts and 3 seeds, over the
  promised 2.5%, because with 3 seeds it is often estimated as zero. More seeds narrow only this part; identical
  seeds add nothing (they are one draw's evidence).

This module is pure arithmetic on arrays; :func:`ssah.measure.compare_prompts` wraps it into a ``Comparison``.
Its error rates are measured by simulation in ``benchmarks/verdict_calibration.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ssah.errors import UserError
from ssah.intervals import wilson_bounds, wilson_cc_bounds

__all__ = ["PairedInterval", "as_table", "mean_interval", "newcombe_paired", "paired_interval"]


@dataclass(frozen=True)
class PairedInterval:
    """The difference of two arms' mean rates on the same prompts, with its 95% interval and how it was made."""

    difference: float
    ci95: tuple[float, float]
    effect: float
    control: float
    prompts: int
    seeds: tuple[int, int]  # columns of the effect and the control table
    method: str
    df: float | None = None  # Satterthwaite degrees of freedom of the seed part (None: no seeds; inf: no spread)


def as_table(outcomes: Sequence[bool] | Sequence[Sequence[bool]], what: str) -> np.ndarray:
    """Outcomes as a float array prompts x seeds: one list per prompt order gives one column, a list of such lists
    (one per seed) gives one column per seed. Every seed must hold the same number of prompts."""
    if len(outcomes) == 0:
        raise UserError(f"the {what} has no outcomes: measure it on at least one prompt")
    first = outcomes[0]
    if isinstance(first, bool | int | np.bool_ | np.integer):
        cols = [list(outcomes)]
    else:
        cols = [list(s) for s in outcomes]  # type: ignore[arg-type]
        sizes = {len(c) for c in cols}
        if len(sizes) != 1:
            raise UserError(
                f"the {what}'s seeds hold different numbers of prompts ({sorted(sizes)}): measure every "
                "seed on the same prompts"
            )
    table = np.asarray(cols, dtype=np.float64).T
    if table.shape[0] == 0:
        raise UserError(f"the {what} has no outcomes: measure it on at least one prompt")
    if not np.isin(table, (0.0, 1.0)).all():
        raise UserError(f"the {what}'s outcomes must be 0/1 (true/false), one per prompt")
    return table


def newcombe_paired(a: float, b: float, c: float, d: float, *, corrected: bool = True) -> tuple[float, float]:
    """Newcombe's (1998) interval of ``p1 - p2`` from a paired 2x2 table: ``a`` both yes, ``b`` yes in arm 1 only,
    ``c`` yes in arm 2 only, ``d`` both no (fractional counts allowed, e.g. means over seeds); method 11 (with
    continuity-corrected Wilson intervals) by default, method 10 with ``corrected=False``."""
    n = a + b + c + d
    if n <= 0:
        raise UserError("a paired comparison needs at least one prompt: measure both arms on a non-empty set")
    p1, p2 = (a + b) / n, (a + c) / n
    bounds = wilson_cc_bounds if corrected else wilson_bounds
    l1, u1 = bounds(a + b, n)
    l2, u2 = bounds(a + c, n)
    cross = a * d - b * c
    den = math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    # Newcombe's continuity-corrected correlation: the numerator shrinks by n/2 toward 0 when positive
    phi = 0.0 if den == 0 else (max(cross - n / 2, 0.0) if cross > 0 else cross) / den
    diff = p1 - p2
    down = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    up = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return max(-1.0, diff - math.sqrt(max(down, 0.0))), min(1.0, diff + math.sqrt(max(up, 0.0)))


def _seed_variance(table: np.ndarray) -> float:
    """The sample variance of one arm's seed means (prompts x seeds); 0 with one seed."""
    return float(np.var(table.mean(0), ddof=1)) if table.shape[1] > 1 else 0.0


def _seed_half(tables: list[np.ndarray]) -> tuple[float, float]:
    """The 95% t half-width of the seed part of the seeded arms' means (independent parts added), with
    Satterthwaite's (1946) degrees of freedom; and those degrees of freedom (``inf`` when the part is 0)."""
    parts = [(_seed_variance(t) / t.shape[1], t.shape[1] - 1) for t in tables]
    var = sum(v for v, _ in parts)
    if var <= 0:
        return 0.0, math.inf
    df = var * var / sum(v * v / k for v, k in parts if v > 0)
    return float(stats.t.ppf(0.975, df)) * math.sqrt(var), df


def paired_interval(effect: np.ndarray, control: np.ndarray) -> PairedInterval:
    """The 95% interval of ``mean(effect) - mean(control)`` for two prompts x seeds tables on the same prompts
    (rows in the same prompt order); see the module docstring for the method."""
    if effect.shape[0] != control.shape[0]:
        raise UserError(
            f"the effect was measured on {effect.shape[0]} prompts and the control on {control.shape[0]}: "
            "a paired comparison needs the same prompts in the same order"
        )
    n = effect.shape[0]
    e, c = effect.mean(1), control.mean(1)  # per-prompt means over seeds
    diff = float(e.mean() - c.mean())
    a = float((e * c).sum())
    lo, hi = newcombe_paired(a, float(e.sum()) - a, float(c.sum()) - a, float(((1 - e) * (1 - c)).sum()))
    seeds = (effect.shape[1], control.shape[1])
    if max(seeds) < 2:
        return PairedInterval(diff, (lo, hi), float(e.mean()), float(c.mean()), n, seeds, "paired-newcombe-cc")
    half, df = _seed_half([t for t in (effect, control) if t.shape[1] > 1])
    ci = (max(-1.0, diff - math.hypot(diff - lo, half)), min(1.0, diff + math.hypot(hi - diff, half)))
    method = "paired-newcombe-cc+seed-variance"
    return PairedInterval(diff, ci, float(e.mean()), float(c.mean()), n, seeds, method, round(df, 2))


def mean_interval(table: np.ndarray) -> tuple[float, float]:
    """The 95% interval of one arm's mean rate (prompts x seeds): the Wilson interval of the per-prompt means
    (fractional count, n prompts) with the seed part of :func:`paired_interval` added in quadrature."""
    n, m = table.shape
    per_prompt = table.mean(1)
    mean = float(per_prompt.mean())
    lo, hi = wilson_bounds(float(per_prompt.sum()), n)
    if m < 2:
        return lo, hi
    half, _ = _seed_half([table])
    return max(0.0, mean - math.hypot(mean - lo, half)), min(1.0, mean + math.hypot(hi - mean, half))
